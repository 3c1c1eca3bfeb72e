"""The training examples: instance photos (and class images, and the PDM chunk's centre crops) as tensors.

Each example is a ``data.batch.Example``; ``data.batch.collate_examples`` makes the step's ``Batch``.
When the model caches VAE latents (``use_latent_cache``), the cached chunks carry image indices
instead of pixels, and their images are not decoded again. For SDXL (``with_time_ids``) every crop
also carries its size conditioning: the photo's original size and the corner of the crop really taken.
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
from pdm_lightning.data.crops import (
    LATENT_CELL,
    centre_box,
    crop_box,
    crop_time_ids,
    latent_crop_box,
    load_mask_crop,
    load_training_crop,
    oriented_size,
    resized_size,
)

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in the resized photo


class TeacherEntries(Protocol):
    """Where the PDM chunk's teacher entries come from (``pdm.teacher.PDMTeacher.entries``)."""

    timesteps: Sequence[int]

    def item(self, image_index: int, timestep: int) -> dict[str, torch.Tensor]:
        """The stored entries of one instance image at one timestep (only that slice is read)."""


class DreamBoothDataset(Dataset):
    """Pairs instance images with class images; ``len`` is max(#instance, #class), cycling the shorter list.

    Indexed by ``(index, crop_seed)`` as yielded by ResumableSampler, so each random crop is a pure
    function of the sampler's seed and position (reproducible in worker processes and on resume).
    SDXL: ``instance_input_ids_2`` / ``class_input_ids_2`` are the second tokenizer's ids, and
    ``with_time_ids`` gives every crop its time ids (``data.crops.crop_time_ids``).
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
        instance_input_ids_2: torch.Tensor | None = None,
        class_input_ids_2: torch.Tensor | None = None,
        with_time_ids: bool = False,
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
        self.instance_input_ids_2 = instance_input_ids_2
        self.class_input_ids_2 = class_input_ids_2
        self.with_time_ids = with_time_ids
        self._centre_crops: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._centre_masks: dict[int, torch.Tensor] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}  # each image's (width, height), from its header
        # Chunks whose latents the model caches (use_latent_cache): served as indices, not pixels.
        self.cached_instance_chunk = self.cached_class_chunk = self.cached_pdm_chunk = self.latent_crops = False

    def crops_are_fixed(self, chunk: str) -> bool:
        """Whether every image of ``chunk`` (``instance`` or ``class``) always gives the same crop (centre crops,
        or images that resize to the resolution exactly: square photos, generated class images); only then
        can its latents be cached exactly. Reads image headers only."""
        images = self.instance_images if chunk == "instance" else self.class_images
        if images is None:
            return False
        size = self.resolution
        return self.center_crop or all(resized_size(*self._size(path), size) == (size, size) for path in images)

    def use_latent_cache(self, instance_chunk: bool, class_chunk: bool, pdm_chunk: bool, latent_crops: bool) -> None:
        """Serves the chunks whose latents the model caches as image indices (and, with latent crops, the
        instance chunk as crop positions); call before the DataLoader starts its workers.

        ``instance_chunk`` and ``class_chunk`` need fixed crops (``crops_are_fixed``); ``latent_crops``
        applies to an instance chunk whose crops move."""
        for chunk, cached in (("instance", instance_chunk), ("class", class_chunk)):
            if cached and not self.crops_are_fixed(chunk):
                raise ValueError(f"The {chunk} chunk can be cached only when every one of its images has one fixed crop.")
        self.cached_instance_chunk = instance_chunk
        self.cached_class_chunk = class_chunk and self.class_images is not None
        self.cached_pdm_chunk = pdm_chunk and self.pdm_targets is not None
        self.latent_crops = latent_crops and not instance_chunk

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images or ()))

    def __getitem__(self, key: int | tuple[int, int]) -> Example:
        # A plain integer index (outside the sampler) seeds its crop with itself.
        index, crop_seed = key if isinstance(key, tuple) else (key, key)
        rng = None if self.center_crop else random.Random(crop_seed)
        image_index = index % len(self.instance_images)
        photo = self.instance_images[image_index]
        example = Example(
            instance_pixel_values=None, instance_input_ids=self.instance_input_ids, instance_input_ids_2=self.instance_input_ids_2
        )
        if self.cached_instance_chunk:  # a fixed crop: the photo's centre crop
            if rng is not None:  # the draws of the crop (a no-op box), so that the class crops after it do not change
                crop_box(self.resolution, self.resolution, self.resolution, rng)
            example.instance_index = image_index
            example.instance_mask = self._centre_mask(image_index)
            box = self._centre_box(photo)
        elif self.latent_crops:
            example.instance_index = image_index
            example.instance_cell, example.instance_mask, box = self._latent_crop(image_index, rng)
        else:
            example.instance_pixel_values, example.instance_mask, box = self._crop(photo, self.instance_masks, rng)
        example.instance_time_ids = self._time_ids(photo, box)
        if self.class_images is not None:
            class_index = index % len(self.class_images)
            class_image = self.class_images[class_index]
            if self.cached_class_chunk:  # a fixed crop: nothing to draw, nothing to decode but the mask
                example.class_index = class_index
                box = self._centre_box(class_image)
                if self.class_masks is not None:
                    example.class_mask = load_mask_crop(
                        self.class_masks[class_image], class_image, self.resolution, box, self._size(class_image)
                    )
            else:
                example.class_pixel_values, example.class_mask, box = self._crop(class_image, self.class_masks, rng)
            example.class_input_ids, example.class_input_ids_2 = self.class_input_ids, self.class_input_ids_2
            example.class_time_ids = self._time_ids(class_image, box)
        if self.pdm_targets is not None:
            example.pdm = self._pdm_example(image_index, crop_seed)
        return example

    def _size(self, path: Path) -> tuple[int, int]:
        """The image's (width, height) as decoded (EXIF orientation applied), read once from its header."""
        if path not in self._sizes:
            self._sizes[path] = oriented_size(path)
        return self._sizes[path]

    def _centre_box(self, path: Path) -> Box:
        return centre_box(*self._size(path), self.resolution)

    def _time_ids(self, path: Path, box: Box) -> torch.Tensor | None:
        """SDXL's size conditioning of the ``box`` crop of ``path`` (None without ``with_time_ids``)."""
        return crop_time_ids(self._size(path), box, self.resolution) if self.with_time_ids else None

    def _latent_crop(
        self, image_index: int, rng: random.Random | None
    ) -> tuple[tuple[int, int], torch.Tensor | None, Box]:
        """The crop's (top, left) in latent cells of the resized photo, its mask crop (with masks) and its box."""
        path = self.instance_images[image_index]
        box = latent_crop_box(*resized_size(*self._size(path), self.resolution), self.resolution, rng)
        mask = None
        if self.instance_masks is not None:
            mask = load_mask_crop(self.instance_masks[path], path, self.resolution, box, self._size(path))
        return (box[1] // LATENT_CELL, box[0] // LATENT_CELL), mask, box

    def _crop(
        self, path: Path, masks: dict[Path, Path] | None, rng: random.Random | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, Box]:
        """The crop of ``path`` (random with ``rng``) as pixels, its mask crop, and its box. The box is drawn
        from the header's size exactly as ``load_training_crop`` would draw it from the decoded photo."""
        box = crop_box(*resized_size(*self._size(path), self.resolution), self.resolution, rng)
        pixels, mask = load_training_crop(path, self.resolution, None, masks[path] if masks is not None else None, box=box)
        return pixels, mask, box

    def _centre_crop(self, image_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The centre crop never changes: decoded once per image (per worker), not again every step.
        if image_index not in self._centre_crops:
            self._centre_crops[image_index] = self._crop(self.instance_images[image_index], self.instance_masks, None)[:2]
        return self._centre_crops[image_index]

    def _centre_mask(self, image_index: int) -> torch.Tensor | None:
        """The centre crop's mask alone (None without masks), for chunks whose latents come from the cache: the
        photo is not decoded. The same mask as ``_centre_crop``'s (same resize, same box)."""
        if self.instance_masks is None:
            return None
        if image_index not in self._centre_masks:
            path = self.instance_images[image_index]
            self._centre_masks[image_index] = load_mask_crop(
                self.instance_masks[path], path, self.resolution, self._centre_box(path), self._size(path)
            )
        return self._centre_masks[image_index]

    def _pdm_example(self, image_index: int, crop_seed: int) -> PDMExample:
        # The PDM chunk is the centre crop of the same image (what its teacher entries were computed
        # from), at a timestep of the teacher's trajectory, drawn from its own stream so the crops
        # are the same with PDM on or off.
        timesteps = self.pdm_targets.timesteps
        timestep = int(timesteps[random.Random(derive_seed(crop_seed, 1)).randrange(len(timesteps))])
        if self.cached_pdm_chunk:
            pixels = None
            mask = self._centre_mask(image_index)
        else:
            pixels, mask = self._centre_crop(image_index)
        photo = self.instance_images[image_index]
        time_ids = self._time_ids(photo, self._centre_box(photo))
        return PDMExample(pixels, timestep, self.pdm_targets.item(image_index, timestep), mask, image_index, time_ids)
