"""The PDM teacher: one object from the bank on disk to the loss's targets (docs/method.md).

``PDMTeacher`` serves both sides of a run with the same ``PDMSettings``:
- data side: ``prepare`` builds (or reuses) the teacher bank of the photos before training,
  ``entries`` opens it for the dataset, which reads one row per PDM example;
- model side: ``attach`` hooks the student's query layer (and keeps a frozen teacher copy when
  the teacher is recomputed on the fly under full fine-tuning), ``student_queries`` and
  ``targets`` give the two sides of the PDM loss for a batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pdm_lightning.core.loading import ModelSource
from pdm_lightning.pdm.bank import (
    MODEL_HASHES_FILE,
    BuildReport,
    QueryBank,
    cached_bank_folder,
    class_condition,
    ensure_cached_bank,
    open_bank,
)
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled
from pdm_lightning.pdm.settings import PDMSettings

# (latents [B, 4, h, w], timesteps [B]) -> teacher queries [B, tokens, dim], both on the UNet's device
QueryFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TeacherEntries:
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


class PDMTeacher:
    """The pretrained model's PDM queries of the photos, and the student's, for the PDM loss."""

    def __init__(self, settings: PDMSettings, source: ModelSource) -> None:
        self.settings = settings
        self.source = source
        self.capture: QueryCapture | None = None  # the student's query layer, once attached
        self.teacher_unet: torch.nn.Module | None = None  # full fine-tuning with an on-the-fly teacher only
        self._student_unet: torch.nn.Module | None = None
        self._lora = False

    # ---------------------------------------------------------------- data side (prepare_data, setup)

    def bank_folder(self, class_prompt: str, resolution: int) -> Path:
        """The user's precomputed folder, or the cache folder named after everything that determines the bank."""
        if self.settings.features_dir is not None:
            return Path(self.settings.features_dir)
        return cached_bank_folder(self.settings.bank_settings(self.source, class_prompt, resolution), self.settings.cache_root())

    def prepare(self, images: Sequence[Path], class_prompt: str, resolution: int, device: torch.device) -> BuildReport | None:
        """Builds the bank of ``images`` in the cache, or reuses it after checking every row of it.

        With a user's ``features_dir`` nothing is built (None): its files are checked against the run
        and every row against its checksum, so a damaged file stops the run here, named, and is never
        rewritten.
        """
        if self.settings.features_dir is not None:
            settings = self.settings.bank_settings(self.source, class_prompt, resolution)
            root = self.settings.cache_root()
            open_bank(self.settings.features_dir, images, settings, root / MODEL_HASHES_FILE, naming="stem", verify=True)
            return None
        return ensure_cached_bank(
            self.settings.bank_settings(self.source, class_prompt, resolution),
            images,
            self.settings.cache_root(),
            batch_size=self.settings.batch_size,
            device=device,
        )

    def entries(self, images: Sequence[Path], class_prompt: str, resolution: int, tokenizer) -> TeacherEntries:  # noqa: ANN001
        """The bank of ``images`` opened for the dataset (checked against this run's settings)."""
        settings = self.settings.bank_settings(self.source, class_prompt, resolution)
        root = self.settings.cache_root()
        # The model's weights are hashed once and remembered in the cache root (not again on every rank).
        # A user's folder names files after the photos' stems, the cache after their content (bank.bank_file).
        naming = "stem" if self.settings.features_dir is not None else "content"
        bank = open_bank(self.bank_folder(class_prompt, resolution), images, settings, root / MODEL_HASHES_FILE, naming=naming)
        condition = None
        if self.settings.on_the_fly:
            # The pretrained text encoder's class condition (the trained one may drift from it).
            condition = class_condition(tokenizer, self.source.text_encoder(), class_prompt)
        return TeacherEntries(bank, self.settings.on_the_fly, condition)

    # ---------------------------------------------------------------- model side (configure_model, training_step)

    def attach(self, unet: torch.nn.Module, lora: bool, teacher_dtype: torch.dtype) -> None:
        """Hooks the student's query layer of ``unet``; call after LoRA injection and before any training step."""
        self._student_unet, self._lora = unet, lora
        if self.settings.on_the_fly and not lora:
            # Copied before any training step (and before a checkpoint is restored): the pretrained weights.
            self.teacher_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype=teacher_dtype).eval()
        # Registered after LoRA injection, so the student's query includes the adapter's delta.
        self.capture = QueryCapture(unet, self.settings.layer)

    def release(self) -> None:
        """Removes the hook and drops the teacher copy."""
        if self.capture is not None:
            self.capture.remove()
        self.capture = self.teacher_unet = self._student_unet = None

    def student_queries(self) -> torch.Tensor:
        """The student's queries of the UNet forward that just ran (every chunk's rows)."""
        return self.capture.pop()

    def targets(self, teacher: dict[str, torch.Tensor], timesteps: torch.Tensor) -> torch.Tensor:
        """The pretrained model's queries for a batch's PDM chunk: read from the bank, or recomputed."""
        if "queries" in teacher:
            return teacher["queries"]
        # Full fine-tuning: the frozen copy. LoRA: the same UNet with its adapters off (no second copy).
        unet = self.teacher_unet if self.teacher_unet is not None else self._student_unet
        query = unet_query_fn(unet, teacher["condition"], self.settings.layer, disable_adapters=self._lora)
        return query(teacher["latents"], timesteps)


def unet_query_fn(
    unet: torch.nn.Module, condition: torch.Tensor, layer: str = DEFAULT_PDM_LAYER, disable_adapters: bool = True
) -> QueryFunction:
    """The frozen teacher as a query function: ``unet`` conditioned on ``condition`` (the class prompt).

    ``condition`` is [1, 77, d] (expanded to the batch) or [B, 77, d]. The stored reconstruction
    latent at t is exactly what the extraction fed to the UNet at t, so ``query(latent_t, t)``
    reproduces the bank's query up to the dtype the UNet runs in. Under LoRA pass the student's
    own UNet: its adapters are switched off for the call (no second copy). Under full fine-tuning
    pass a frozen copy of the pretrained UNet. The capture hook lives only for the call; a
    student's QueryCapture on the same layer also sees this forward, so pop the student's query
    before asking for targets.
    """

    def query(latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        context = condition.to(device=latents.device, dtype=dtype).expand(len(latents), -1, -1)
        with torch.no_grad(), QueryCapture(unet, layer) as capture:
            if disable_adapters:
                with adapters_disabled(unet):
                    unet(latents.to(dtype), timesteps, context)
            else:
                unet(latents.to(dtype), timesteps, context)
            return capture.pop()

    return query
