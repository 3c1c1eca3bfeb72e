"""The training batch as one typed record, and the collate function that builds it from the dataset's examples.

One UNet forward covers every chunk of a step, concatenated in this order: the instance chunk (B
photos), the class chunk (B class images, with prior preservation) and the PDM chunk (the centre
crops of the same B photos, with the PDM loss). ``num_instance`` and ``num_pdm`` mark the splits.

A chunk whose VAE latents are cached for the run (``training.latent_cache``) carries no pixels, only
which image each row is (and, for latent crops, where the crop lies); ``pixel_values`` holds the
rows of the other chunks, the ones encoded at this step.

SDXL rows also carry the second tokenizer's ids (``input_ids_2``) and their crop's size conditioning
(``time_ids``: original size, crop top-left, target size; ``data.crops.crop_time_ids``); both are None for SD.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

Tensors = dict[str, torch.Tensor]
CHUNKS = ("instance", "class", "pdm")  # the order of the rows of a batch


@dataclass
class PDMExample:
    """The PDM chunk's part of one example: the photo's centre crop at one timestep of the teacher's trajectory."""

    pixel_values: torch.Tensor | None  # [3, R, R] in [-1, 1]; None when the centre crops' latents are cached
    timestep: int
    teacher: Tensors  # what the teacher stored for (photo, timestep): "queries", or "latents" + "condition" (SDXL: + "pooled", "time_ids")
    mask: torch.Tensor | None = None  # [1, R, R] in [0, 1]
    image_index: int = 0  # which instance photo
    time_ids: torch.Tensor | None = None  # SDXL: [6], the centre crop's size conditioning


@dataclass
class Example:
    """One item of ``DreamBoothDataset``: an instance crop, optionally a class crop and a PDM entry.

    A chunk served from the latent cache has no pixel values: ``class_index`` names its class image,
    ``instance_index`` its photo (with ``instance_cell``, the crop's corner in latent cells, for latent
    crops; without, the photo's fixed centre crop).
    """

    instance_pixel_values: torch.Tensor | None  # [3, R, R] in [-1, 1]
    instance_input_ids: torch.Tensor  # [77]
    instance_mask: torch.Tensor | None = None  # [1, R, R] in [0, 1]
    class_pixel_values: torch.Tensor | None = None
    class_input_ids: torch.Tensor | None = None
    class_mask: torch.Tensor | None = None
    pdm: PDMExample | None = None
    instance_index: int | None = None  # cached instance latents: which instance photo
    instance_cell: tuple[int, int] | None = None  # latent crops: (top, left) of the crop, in latent cells
    class_index: int | None = None  # cached class latents: which class image
    # SDXL only: the second tokenizer's ids ([77]) and each crop's time ids ([6]).
    instance_input_ids_2: torch.Tensor | None = None
    class_input_ids_2: torch.Tensor | None = None
    instance_time_ids: torch.Tensor | None = None
    class_time_ids: torch.Tensor | None = None


@dataclass
class Batch:
    """What ``training_step`` receives (Lightning moves every tensor field to the device)."""

    pixel_values: torch.Tensor | None  # [M, 3, R, R]: the rows VAE-encoded this step (chunks not served from the cache)
    input_ids: torch.Tensor  # [N, 77]: each row's prompt, all chunks
    num_instance: int
    num_pdm: int = 0
    instance_mask: torch.Tensor | None = None  # [B, 1, R, R], with masks on the instance photos
    class_mask: torch.Tensor | None = None  # [B, 1, R, R], with masks on the class images
    pdm_mask: torch.Tensor | None = None  # [B, 1, R, R]
    pdm_timesteps: torch.Tensor | None = None  # [B], from the teacher's trajectory
    teacher: Tensors = field(default_factory=dict)  # [B, ...] each: the PDM chunk's teacher entries
    # Chunks served from the latent cache: which image each row is ([B] each).
    instance_index: torch.Tensor | None = None  # the photo (its fixed crop, or with instance_cell a latent crop)
    instance_cell: torch.Tensor | None = None  # latent crops: the crop's (top, left) in latent cells, [B, 2]
    class_index: torch.Tensor | None = None  # the class image
    pdm_index: torch.Tensor | None = None  # the photo (its centre crop)
    # SDXL only, rows in the order of input_ids: the second tokenizer's ids [N, 77] and each row's time ids [N, 6].
    input_ids_2: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def num_class(self) -> int:
        return self.input_ids.shape[0] - self.num_instance - self.num_pdm

    def chunk_sizes(self) -> list[tuple[str, int]]:
        """(chunk, rows) of the chunks present, in row order."""
        sizes = {"instance": self.num_instance, "class": self.num_class, "pdm": self.num_pdm}
        return [(chunk, sizes[chunk]) for chunk in CHUNKS if sizes[chunk]]

    def cache_index(self, chunk: str) -> torch.Tensor | None:
        """Which cached image each row of ``chunk`` is; None when the chunk's rows are in ``pixel_values``."""
        return getattr(self, f"{chunk}_index")

    def mask(self, chunk: str) -> torch.Tensor | None:
        """The pixel masks of ``chunk`` (``instance``, ``class`` or ``pdm``), None without masks."""
        return getattr(self, f"{chunk}_mask")

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``) for faster host-to-GPU copies."""
        pinned = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                value = value.pin_memory()
            elif isinstance(value, dict):
                value = {key: tensor.pin_memory() for key, tensor in value.items()}
            pinned[item.name] = value
        return Batch(**pinned)


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not tensors or tensors[0] is None else torch.stack(tensors)


def _indices(values: list[int | tuple[int, int] | None]) -> torch.Tensor | None:
    return None if not values or values[0] is None else torch.tensor(values)


def collate_examples(examples: list[Example]) -> Batch:
    """Concatenates the chunks of ``examples`` into one ``Batch``: [instance, class (if present), PDM (if present)]."""
    with_class = examples[0].class_input_ids is not None
    classes = examples if with_class else []
    pdm = [e.pdm for e in examples] if examples[0].pdm is not None else []
    # Rows to encode this step, in chunk order; a cached chunk has none.
    pixel_values = [e.instance_pixel_values for e in examples if e.instance_pixel_values is not None]
    pixel_values += [e.class_pixel_values for e in classes if e.class_pixel_values is not None]
    pixel_values += [entry.pixel_values for entry in pdm if entry.pixel_values is not None]
    input_ids = [e.instance_input_ids for e in examples] + [e.class_input_ids for e in classes]
    input_ids += [e.instance_input_ids for e in examples[: len(pdm)]]  # the PDM chunk is seen with the instance prompt
    input_ids_2 = [e.instance_input_ids_2 for e in examples] + [e.class_input_ids_2 for e in classes]
    input_ids_2 += [e.instance_input_ids_2 for e in examples[: len(pdm)]]
    time_ids = [e.instance_time_ids for e in examples] + [e.class_time_ids for e in classes]
    time_ids += [entry.time_ids for entry in pdm]
    return Batch(
        pixel_values=torch.stack(pixel_values).contiguous(memory_format=torch.contiguous_format).float()
        if pixel_values else None,
        input_ids=torch.stack(input_ids),
        num_instance=len(examples),
        num_pdm=len(pdm),
        instance_mask=_stack([e.instance_mask for e in examples]),
        class_mask=_stack([e.class_mask for e in classes]),
        pdm_mask=_stack([entry.mask for entry in pdm]),
        pdm_timesteps=torch.tensor([entry.timestep for entry in pdm]) if pdm else None,
        teacher={name: torch.stack([entry.teacher[name] for entry in pdm]) for name in pdm[0].teacher} if pdm else {},
        instance_index=_indices([e.instance_index for e in examples]),
        instance_cell=_indices([e.instance_cell for e in examples]),
        class_index=_indices([e.class_index for e in classes]),
        pdm_index=_indices([entry.image_index for entry in pdm if entry.pixel_values is None]),
        input_ids_2=_stack(input_ids_2),
        time_ids=_stack(time_ids),
    )
