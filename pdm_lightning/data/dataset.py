"""The training examples: instance photos (and class images) as cropped tensors with prompt token ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pdm_lightning.data.images import load_rgb_image


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
    image = resize_shorter_side(load_rgb_image(path), resolution)
    return to_tensor(image.crop(crop_box(*image.size, resolution, rng)))


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

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        # A plain integer index (outside the sampler) seeds its crop with itself.
        index, crop_seed = key if isinstance(key, tuple) else (key, key)
        rng = None if self.center_crop else random.Random(crop_seed)
        example = {
            "instance_pixel_values": load_training_image(
                self.instance_images[index % len(self.instance_images)], self.resolution, rng
            ),
            "instance_input_ids": self.instance_input_ids,
        }
        if self.class_images is not None:
            example["class_pixel_values"] = load_training_image(
                self.class_images[index % len(self.class_images)], self.resolution, rng
            )
            example["class_input_ids"] = self.class_input_ids
        return example


def collate_examples(examples: list[dict[str, Any]], with_prior_preservation: bool) -> dict[str, Any]:
    """Concatenates the instance chunk and, with prior preservation, the class chunk into one batch.

    One UNet forward then covers both chunks; ``num_instance`` tells the loss where the split is.
    """
    pixel_values = [e["instance_pixel_values"] for e in examples]
    input_ids = [e["instance_input_ids"] for e in examples]
    if with_prior_preservation:
        pixel_values += [e["class_pixel_values"] for e in examples]
        input_ids += [e["class_input_ids"] for e in examples]
    return {
        "pixel_values": torch.stack(pixel_values).contiguous(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack(input_ids),
        "num_instance": len(examples),
    }
