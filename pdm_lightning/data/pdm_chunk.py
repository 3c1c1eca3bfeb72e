"""What the data module needs for the PDM chunk: where the teacher bank comes from, and per-example reads of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pdm_lightning.pdm.bank import QueryBank


@dataclass
class PDMFeatures:
    """The teacher feature bank of the PDM loss (built before training, once per node).

    Args:
        features_dir: a folder written by ``python -m pdm_lightning.features`` (one ``<stem>.safetensors``
            per instance image); used as it is, checked against this run's settings. None: the bank is
            built (or reused) in ``cache_dir``.
        cache_dir: root of the bank cache (default ``$PDM_LIGHTNING_CACHE`` or ``~/.cache/pdm_lightning/pdm_bank``);
            a second run with the same model, images, prompt, resolution, layer and steps reuses it.
        inversion_steps: DDIM inversion steps; None is the method's faithful 999 (a row for every
            timestep). Fewer (e.g. 50) is ~20x cheaper; PDM timesteps are then drawn from that trajectory.
        dtype: storage dtype of the teacher queries (float16 halves the disk and I/O of float32).
        compute_dtype: dtype the frozen model runs in during extraction.
        batch_size: instance images inverted together (one UNet call per step for all of them).
    """

    features_dir: str | None = None
    cache_dir: str | None = None
    inversion_steps: int | None = None
    dtype: Literal["float16", "float32"] = "float16"
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = 4


class BankItems:
    """One instance image's teacher entry at one timestep, for the dataset (memory-mapped slice reads).

    Reading happens in the DataLoader (worker processes included), so a training step receives just
    its B rows and Lightning moves them to the device with the batch: device memory does not grow
    with the number of images or timesteps.
    """

    def __init__(self, bank: QueryBank, on_the_fly: bool, condition: torch.Tensor | None = None) -> None:
        if on_the_fly and (not bank.has_latents or condition is None):
            raise ValueError("On-the-fly PDM targets need a bank with latents and the class prompt's condition.")
        self.bank = bank
        self.on_the_fly = on_the_fly
        self.condition = condition[0] if condition is not None else None  # [77, d]
        self.timesteps = bank.timesteps.tolist()

    def item(self, image_index: int, timestep: int) -> dict[str, torch.Tensor]:
        index, step = torch.tensor([image_index]), torch.tensor([timestep])
        if self.on_the_fly:
            return {"latents": self.bank.latents(index, step)[0], "condition": self.condition}
        return {"queries": self.bank.queries(index, step)[0]}

