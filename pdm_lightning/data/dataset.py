"""The training examples: instance photos (and class images, and the PDM chunk's centre crops) as tensors.

Each example is a ``data.batch.Example``; ``data.batch.collate_examples`` makes the step's ``Batch``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset

from pdm_lightning.core.seeding import derive_seed
from pdm_lightning.data.batch import Example, PDMExample
from pdm_lightning.data.crops import load_training_crop


class TeacherEntries(Protocol):
    """Where the PDM chunk's teacher entries come from (``pdm.teacher.PDMTeacher.entries``)."""

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
        pdm_targets: TeacherEntries | None = None,
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
        self._pdm_crops: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, key: int | tuple[int, int]) -> Example:
        # A plain integer index (outside the sampler) seeds its crop with itself.
        index, crop_seed = key if isinstance(key, tuple) else (key, key)
        rng = None if self.center_crop else random.Random(crop_seed)
        image_index = index % len(self.instance_images)
        pixels, mask = self._crop(self.instance_images[image_index], self.instance_masks, rng)
        example = Example(instance_pixel_values=pixels, instance_input_ids=self.instance_input_ids, instance_mask=mask)
        if self.class_images is not None:
            class_image = self.class_images[index % len(self.class_images)]
            example.class_pixel_values, example.class_mask = self._crop(class_image, self.class_masks, rng)
            example.class_input_ids = self.class_input_ids
        if self.pdm_targets is not None:
            example.pdm = self._pdm_example(image_index, crop_seed)
        return example

    def _crop(
        self, path: Path, masks: dict[Path, Path] | None, rng: random.Random | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return load_training_crop(path, self.resolution, rng, masks[path] if masks is not None else None)

    def _pdm_crop(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The centre crop never changes: decoded once per image (per worker), not again every step.
        if image_index not in self._pdm_crops:
            self._pdm_crops[image_index] = self._crop(self.instance_images[image_index], self.instance_masks, None)
        return self._pdm_crops[image_index]

    def _pdm_example(self, image_index: int, crop_seed: int) -> PDMExample:
        # The PDM chunk is the centre crop of the same image (what its teacher entries were computed
        # from), at a timestep of the teacher's trajectory, drawn from its own stream so the crops
        # are the same with PDM on or off.
        timesteps = self.pdm_targets.timesteps
        timestep = int(timesteps[random.Random(derive_seed(crop_seed, 1)).randrange(len(timesteps))])
        pixels, mask = self._pdm_crop(image_index)
        return PDMExample(pixels, timestep, self.pdm_targets.item(image_index, timestep), mask)
