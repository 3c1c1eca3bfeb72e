"""The training batch as one typed record, and the collate function that builds it from the dataset's examples.

One UNet forward covers every chunk of a step, concatenated in this order: the instance chunk (B
photos), the class chunk (B class images, with prior preservation) and the PDM chunk (the centre
crops of the same B photos, with the PDM loss). ``num_instance`` and ``num_pdm`` mark the splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class PDMExample:
    """The PDM chunk's part of one example: the photo's centre crop at one timestep of the teacher's trajectory."""

    pixel_values: torch.Tensor  # [3, R, R] in [-1, 1]
    timestep: int
    teacher: Tensors  # what the teacher stored for (photo, timestep): "queries", or "latents" + "condition"
    mask: torch.Tensor | None = None  # [1, R, R] in [0, 1]


@dataclass
class Example:
    """One item of ``DreamBoothDataset``: an instance crop, optionally a class crop and a PDM entry."""

    instance_pixel_values: torch.Tensor  # [3, R, R] in [-1, 1]
    instance_input_ids: torch.Tensor  # [77]
    instance_mask: torch.Tensor | None = None  # [1, R, R] in [0, 1]
    class_pixel_values: torch.Tensor | None = None
    class_input_ids: torch.Tensor | None = None
    class_mask: torch.Tensor | None = None
    pdm: PDMExample | None = None


@dataclass
class Batch:
    """What ``training_step`` receives (Lightning moves every tensor field to the device)."""

    pixel_values: torch.Tensor  # [N, 3, R, R]: instance, class, PDM chunks
    input_ids: torch.Tensor  # [N, 77]: each row's prompt
    num_instance: int
    num_pdm: int = 0
    instance_mask: torch.Tensor | None = None  # [B, 1, R, R], with masks on the instance photos
    class_mask: torch.Tensor | None = None  # [B, 1, R, R], with masks on the class images
    pdm_mask: torch.Tensor | None = None  # [B, 1, R, R]
    pdm_timesteps: torch.Tensor | None = None  # [B], from the teacher's trajectory
    teacher: Tensors = field(default_factory=dict)  # [B, ...] each: the PDM chunk's teacher entries

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
    return None if tensors[0] is None else torch.stack(tensors)


def collate_examples(examples: list[Example]) -> Batch:
    """Concatenates the chunks of ``examples`` into one ``Batch``: [instance, class (if present), PDM (if present)]."""
    pixel_values = [e.instance_pixel_values for e in examples]
    input_ids = [e.instance_input_ids for e in examples]
    with_class = examples[0].class_pixel_values is not None
    if with_class:
        pixel_values += [e.class_pixel_values for e in examples]
        input_ids += [e.class_input_ids for e in examples]
    pdm = [e.pdm for e in examples] if examples[0].pdm is not None else []
    pixel_values += [entry.pixel_values for entry in pdm]
    input_ids += [e.instance_input_ids for e in examples[: len(pdm)]]  # the PDM chunk is seen with the instance prompt
    return Batch(
        pixel_values=torch.stack(pixel_values).contiguous(memory_format=torch.contiguous_format).float(),
        input_ids=torch.stack(input_ids),
        num_instance=len(examples),
        num_pdm=len(pdm),
        instance_mask=_stack([e.instance_mask for e in examples]),
        class_mask=_stack([e.class_mask for e in examples]) if with_class else None,
        pdm_mask=_stack([entry.mask for entry in pdm]) if pdm else None,
        pdm_timesteps=torch.tensor([entry.timestep for entry in pdm]) if pdm else None,
        teacher={name: torch.stack([entry.teacher[name] for entry in pdm]) for name in pdm[0].teacher} if pdm else {},
    )
