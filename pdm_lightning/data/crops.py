"""Photo -> training tensor: resize the shorter side, crop a square (random or centred), scale to [-1, 1].

The subject mask of a photo gets the same resize and the same crop box as the photo.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pdm_lightning.core.images import load_rgb_image
from pdm_lightning.data.masks import load_subject_mask, mask_to_tensor


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the shorter side is ``size`` (antialiased when shrinking)."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, resample=Image.BILINEAR)


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """A ``size`` square inside a ``width`` x ``height`` image: random with ``rng``, centred without."""
    if rng is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return left, top, left + size, top + size


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image as a float CHW tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_training_image(path: Path, resolution: int, rng: random.Random | None) -> torch.Tensor:
    """Decode, resize the shorter side to ``resolution``, crop a square (random with ``rng``), scale to [-1, 1]."""
    return load_training_crop(path, resolution, rng)[0]


def load_training_crop(
    image_path: Path, resolution: int, rng: random.Random | None, mask_path: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training crop of a photo (3 x R x R in [-1, 1]) and the same crop of its subject mask (1 x R x R in [0, 1]).

    Image and mask get the same resize and ONE crop box, drawn from ``rng`` exactly as without a
    mask, so masking changes no crop (of this image or of the class images drawn after it).
    """
    image = load_rgb_image(image_path)
    mask = load_subject_mask(mask_path, image_path, image.size) if mask_path is not None else None
    image = resize_shorter_side(image, resolution)
    box = crop_box(*image.size, resolution, rng)
    if mask is None:
        return to_tensor(image.crop(box)), None
    return to_tensor(image.crop(box)), mask_to_tensor(resize_shorter_side(mask, resolution).crop(box))
