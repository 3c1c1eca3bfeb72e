"""The training examples: instance photos (and class images) as cropped tensors with prompt token ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pdm_lightning.data.images import load_rgb_image
from pdm_lightning.data.masks import load_subject_mask, mask_to_tensor
from pdm_lightning.data.sampler import derive_seed


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


class PDMTargetSource(Protocol):
    """Where the PDM chunk's teacher targets come from (a feature bank, or latents for on-the-fly teachers)."""

    timesteps: Sequence[int]

    def item(self, image_index: int, timestep: int) -> dict[str, torch.Tensor]:
        """The stored entries of one instance image at one timestep (only that slice is read)."""


class DreamBoothDataset(Dataset):
    """Pairs instance images with class images; ``len`` is max(#instance, #class), cycling the shorter list.

    Indexed by ``(index, crop_seed)`` as yielded by ResumableSampler, so each random crop is a pure
    function of the sampler's seed and position (reproducible in worker processes and on resume).
    """

    def __init__(
        self,
        instance_images: Sequence[Path],
        instance_input_ids: torch.Tensor,
        resolution: int,
        center_crop: bool = False,
        class_images: Sequence[Path] | None = None,
        class_input_ids: torch.Tensor | None = None,
        pdm_targets: PDMTargetSource | None = None,
        instance_masks: dict[Path, Path] | None = None,
        class_masks: dict[Path, Path] | None = None,
    ) -> None:
        if not instance_images:
            raise ValueError("DreamBoothDataset needs at least one instance image.")
        if class_images is not None and (not class_images or class_input_ids is None):
            raise ValueError("class_images needs at least one image and class_input_ids.")
        self.instance_images = list(instance_images)
        self.instance_input_ids = instance_input_ids
        self.class_images = list(class_images) if class_images is not None else None
        self.class_input_ids = class_input_ids
        self.resolution = resolution
        self.center_crop = center_crop
        self.pdm_targets = pdm_targets
        self.instance_masks = instance_masks
        self.class_masks = class_masks
        self._pdm_crops: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        # A plain integer index (outside the sampler) seeds its crop with itself.
        index, crop_seed = key if isinstance(key, tuple) else (key, key)
        rng = None if self.center_crop else random.Random(crop_seed)
        image_index = index % len(self.instance_images)
        example = {"instance_input_ids": self.instance_input_ids}
        self._add_crop(example, "instance", self.instance_images[image_index], self.instance_masks, rng)
        if self.class_images is not None:
            self._add_crop(example, "class", self.class_images[index % len(self.class_images)], self.class_masks, rng)
            example["class_input_ids"] = self.class_input_ids
        if self.pdm_targets is not None:
            example.update(self._pdm_example(image_index, crop_seed))
        return example

    def _add_crop(
        self, example: dict[str, Any], chunk: str, path: Path, masks: dict[Path, Path] | None, rng: random.Random | None
    ) -> None:
        pixels, mask = load_training_crop(path, self.resolution, rng, masks[path] if masks is not None else None)
        example[f"{chunk}_pixel_values"] = pixels
        if mask is not None:
            example[f"{chunk}_mask"] = mask

    def _pdm_crop(self, image_index: int) -> dict[str, torch.Tensor]:
        # The centre crop never changes: decoded once per image (per worker), not again every step.
        if image_index not in self._pdm_crops:
            crop: dict[str, Any] = {}
            self._add_crop(crop, "pdm", self.instance_images[image_index], self.instance_masks, None)
            self._pdm_crops[image_index] = crop
        return self._pdm_crops[image_index]

    def _pdm_example(self, image_index: int, crop_seed: int) -> dict[str, Any]:
        # The PDM chunk is the centre crop of the same image (what its teacher entries were computed
        # from), at a timestep of the teacher's trajectory, drawn from its own stream so the crops
        # are the same with PDM on or off.
        timesteps = self.pdm_targets.timesteps
        timestep = int(timesteps[random.Random(derive_seed(crop_seed, 1)).randrange(len(timesteps))])
        example = {"pdm_timestep": timestep, **self._pdm_crop(image_index)}
        example.update({f"pdm_{name}": value for name, value in self.pdm_targets.item(image_index, timestep).items()})
        return example


def collate_examples(examples: list[dict[str, Any]], with_prior_preservation: bool) -> dict[str, Any]:
    """Concatenates the instance chunk and, with prior preservation, the class chunk into one batch.

    One UNet forward then covers all chunks: [instance, class (prior preservation), PDM]. ``num_instance``
    and ``num_pdm`` tell the losses where the splits are; the PDM chunk's own entries (timesteps, teacher
    targets, condition) are stacked under their ``pdm_`` names.
    """
    pixel_values = [e["instance_pixel_values"] for e in examples]
    input_ids = [e["instance_input_ids"] for e in examples]
    if with_prior_preservation:
        pixel_values += [e["class_pixel_values"] for e in examples]
        input_ids += [e["class_input_ids"] for e in examples]
    with_pdm = "pdm_pixel_values" in examples[0]
    if with_pdm:
        pixel_values += [e["pdm_pixel_values"] for e in examples]
        input_ids += [e["instance_input_ids"] for e in examples]
    batch = {
        "pixel_values": torch.stack(pixel_values).contiguous(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack(input_ids),
        "num_instance": len(examples),
        "num_pdm": len(examples) if with_pdm else 0,
    }
    # Per-chunk entries (masks, the PDM chunk's timesteps, teacher targets) stacked as they are.
    skip = {"instance_pixel_values", "class_pixel_values", "pdm_pixel_values", "instance_input_ids", "class_input_ids"}
    if not with_prior_preservation:
        skip.add("class_mask")
    for key in examples[0].keys() - skip:
        batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
    return batch
