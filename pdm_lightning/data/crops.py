"""Photo -> training tensor: resize the shorter side, crop a square (random or centred), scale to [-1, 1].

The subject mask of a photo gets the same resize and the same crop box as the photo. For latent
crops (``--model.latent_crops``) the whole resized photo is encoded once and each step crops its
latent: the crop box then starts at multiples of ``LATENT_CELL`` pixels. SDXL conditions on the crop
(``crop_time_ids``): the photo's original size and the corner of the box taken from the resized photo.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from pdm_lightning.core.conditioning import sdxl_time_ids
from pdm_lightning.core.images import load_rgb_image
from pdm_lightning.data.masks import load_subject_mask, mask_to_tensor

LATENT_CELL = 8  # pixels per latent cell (the VAE's downsampling factor)
# EXIF orientations that turn the photo by 90 degrees (load_rgb_image applies them: width and height swap).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) that ``resize_shorter_side`` gives a ``width`` x ``height`` image."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the shorter side is ``size`` (antialiased when shrinking)."""
    return image.resize(resized_size(*image.size, size), resample=Image.BILINEAR)


def oriented_size(path: Path) -> tuple[int, int]:
    """The (width, height) ``load_rgb_image`` gives ``path`` (EXIF orientation applied), read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """A ``size`` square inside a ``width`` x ``height`` image: random with ``rng``, centred without."""
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return left, top, left + size, top + size


def latent_crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """A ``size`` square whose corner lies on the latent grid (multiples of ``LATENT_CELL`` pixels) of
    ``latent_crop_image``'s picture: random with ``rng`` (uniform over the grid positions), centred without."""
    cells_x, cells_y = (width - size) // LATENT_CELL, (height - size) // LATENT_CELL
    if rng is None:
        left, top = cells_x // 2, cells_y // 2
    else:
        left, top = rng.randint(0, cells_x), rng.randint(0, cells_y)
    left, top = left * LATENT_CELL, top * LATENT_CELL
    return left, top, left + size, top + size


def centre_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The centre ``size`` square of a photo of ``width`` x ``height`` (its orientated size) once resized: the fixed
    crop of cached chunks, the PDM chunk and the teacher bank."""
    return crop_box(*resized_size(width, height, size), size, None)


def crop_time_ids(original_size: tuple[int, int], box: tuple[int, int, int, int], resolution: int) -> torch.Tensor:
    """SDXL's time ids [6] of a training crop: the photo's original (height, width) before resizing
    (``original_size`` is (width, height), as ``oriented_size`` gives it), the crop box's (top, left) in the
    resized photo, and the target (R, R), as diffusers' SDXL DreamBooth script computes them (no flips here)."""
    width, height = original_size
    left, top = box[0], box[1]
    return sdxl_time_ids((height, width), (top, left), (resolution, resolution))


def centre_crop_time_ids(path: Path, resolution: int) -> torch.Tensor:
    """SDXL's time ids of ``path``'s centre crop (header read only): what the PDM chunk and its teacher bank use."""
    size = oriented_size(path)
    return crop_time_ids(size, centre_box(*size, resolution), resolution)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image as a float CHW tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_training_image(path: Path, resolution: int, rng: random.Random | None) -> torch.Tensor:
    """Decode, resize the shorter side to ``resolution``, crop a square (random with ``rng``), scale to [-1, 1]."""
    return load_training_crop(path, resolution, rng)[0]


def load_training_crop(
    image_path: Path,
    resolution: int,
    rng: random.Random | None,
    mask_path: Path | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training crop of a photo (3 x R x R in [-1, 1]) and the same crop of its subject mask (1 x R x R in [0, 1]).

    Image and mask get the same resize and ONE crop box, drawn from ``rng`` exactly as without a
    mask, so masking changes no crop (of this image or of the class images drawn after it). ``box``:
    the crop box, when the caller drew it already (``crop_box`` of the resized size, the same draw).
    """
    image = load_rgb_image(image_path)
    mask = load_subject_mask(mask_path, image_path, image.size) if mask_path is not None else None
    image = resize_shorter_side(image, resolution)
    box = box if box is not None else crop_box(*image.size, resolution, rng)
    if mask is None:
        return to_tensor(image.crop(box)), None
    return to_tensor(image.crop(box)), mask_to_tensor(resize_shorter_side(mask, resolution).crop(box))


def load_mask_crop(
    mask_path: Path, image_path: Path, resolution: int, box: tuple[int, int, int, int], image_size: tuple[int, int]
) -> torch.Tensor:
    """The ``box`` crop of a photo's subject mask after the photo's resize (1 x R x R in [0, 1]), without decoding the
    photo; ``image_size``: the photo's (width, height) as decoded (``oriented_size``, which the caller keeps)."""
    mask = load_subject_mask(mask_path, image_path, image_size)
    return mask_to_tensor(resize_shorter_side(mask, resolution).crop(box))


def latent_crop_image(image_path: Path, resolution: int) -> torch.Tensor:
    """The whole photo resized (shorter side ``resolution``) and cut to whole latent cells from its top-left
    corner (3 x H x W in [-1, 1], H and W multiples of ``LATENT_CELL``): what latent crops encode once.

    Its latent cell (i, j) sees pixels [8i, 8i + 8) x [8j, 8j + 8), so the crop ``latent_crop_box`` draws
    is a slice of its latent. At most 7 pixel rows or columns at the far edges are left out.
    """
    image = resize_shorter_side(load_rgb_image(image_path), resolution)
    width, height = image.size
    return to_tensor(image.crop((0, 0, width - width % LATENT_CELL, height - height % LATENT_CELL)))
