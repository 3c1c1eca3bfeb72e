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

from pdm_lightning.core.conditioning import PromptEmbeddings, unet_conditioning
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.data.crops import centre_crop_time_ids
from pdm_lightning.pdm.bank import (
    MODEL_HASHES_FILE,
    BuildReport,
    QueryBank,
    bank_file,
    cached_bank_folder,
    class_condition,
    ensure_cached_bank,
    open_bank,
)
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture, adapters_disabled
from pdm_lightning.pdm.settings import PDMSettings

# (latents [B, 4, h, w], timesteps [B], SDXL time ids [B, 6] or None) -> teacher queries [B, tokens, dim], on the UNet's device
QueryFunction = Callable[..., torch.Tensor]


class TeacherEntries:
    """One instance image's teacher entry at one timestep, for the dataset (memory-mapped slice reads).

    Reading happens in the DataLoader (worker processes included), so a training step receives just
    its B rows and Lightning moves them to the device with the batch: device memory does not grow
    with the number of images or timesteps. On the fly, an entry is the reconstruction latent and the
    class prompt's condition (``condition`` [77, d]; SDXL adds ``pooled`` [d'] and the photo's centre-crop
    ``time_ids`` [6], as the bank was built with).
    """

    def __init__(
        self,
        bank: QueryBank,
        on_the_fly: bool,
        condition: PromptEmbeddings | None = None,
        time_ids: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if on_the_fly and (not bank.has_latents or condition is None):
            raise ValueError("On-the-fly PDM targets need a bank with latents and the class prompt's condition.")
        if on_the_fly and condition.pooled is not None and (time_ids is None or len(time_ids) != len(bank)):
            raise ValueError("On-the-fly SDXL PDM targets need each photo's time ids (original size, crop, target size).")
        self.bank = bank
        self.on_the_fly = on_the_fly
        self.condition = condition[0] if condition is not None else None  # one prompt: [77, d] (and [d'])
        self.time_ids = list(time_ids) if time_ids is not None else None
        self.timesteps = bank.timesteps.tolist()

    def item(self, image_index: int, timestep: int) -> dict[str, torch.Tensor]:
        index, step = torch.tensor([image_index]), torch.tensor([timestep])
        if not self.on_the_fly:
            return {"queries": self.bank.queries(index, step)[0]}
        entry = {"latents": self.bank.latents(index, step)[0], "condition": self.condition.encoder_hidden_states}
        if self.condition.pooled is not None:
            entry["pooled"] = self.condition.pooled
            entry["time_ids"] = self.time_ids[image_index % len(self.time_ids)]
        return entry


class PDMTeacher:
    """The pretrained model's PDM queries of the photos, and the student's, for the PDM loss."""

    def __init__(self, settings: PDMSettings, source: ModelSource) -> None:
        self.settings = settings
        self.source = source
        self.capture: QueryCapture | None = None  # the student's query layer, once attached
        self.layer: str | None = settings.layer  # the concrete layer once attached (None: the model's own by the rule)
        self.teacher_unet: torch.nn.Module | None = None  # full fine-tuning with an on-the-fly teacher only
        self._student_unet: torch.nn.Module | None = None
        self._lora = False

    # ---------------------------------------------------------------- data side (prepare_data, setup)

    def bank_folder(self, class_prompt: str, resolution: int) -> Path:
        """The user's precomputed folder, or the cache folder named after everything that determines the bank."""
        if self.settings.features_dir is not None:
            return Path(self.settings.features_dir)
        return cached_bank_folder(self.settings.bank_settings(self.source, class_prompt, resolution), self.settings.cache_root())

    def prepare(
        self, images: Sequence[Path], class_prompt: str, resolution: int, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> BuildReport | None:
        """Builds the bank of ``images`` in the cache, or reuses it after checking every row of it.

        With a user's ``features_dir`` nothing is built (None): its files are checked against the run
        and every row against its checksum, so a damaged file stops the run here, named, and is never
        rewritten. Rank ``rank`` of ``world_size`` builds (or checks) photos rank, rank + W, ...; wait
        for every rank before ``entries``.
        """
        settings = self.settings.bank_settings(self.source, class_prompt, resolution)
        root = self.settings.cache_root()
        if self.settings.features_dir is not None:
            share = list(images)[rank::world_size]
            if share:
                open_bank(self.settings.features_dir, share, settings, root / MODEL_HASHES_FILE, naming="stem", verify=True)
            return None
        return ensure_cached_bank(
            settings,
            images,
            root,
            batch_size=self.settings.batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            progress=rank == 0,
            compile_unet=self.settings.compile,
        )

    def missing_files(self, images: Sequence[Path], class_prompt: str, resolution: int) -> list[Path]:
        """The photos whose file is not in the cache folder (by name: what another node built may not be here)."""
        if self.settings.features_dir is not None:
            return []  # a user's folder is only read: open_bank names what it lacks
        folder = self.bank_folder(class_prompt, resolution)
        return [image for image in images if not bank_file(folder, Path(image), "content").is_file()]

    def entries(
        self, images: Sequence[Path], class_prompt: str, resolution: int, tokenizers: Sequence | None = None
    ) -> TeacherEntries:
        """The bank of ``images`` opened for the dataset (checked against this run's settings).

        ``tokenizers``: the run's, already loaded (default: the base model's); used on the fly only.
        """
        settings = self.settings.bank_settings(self.source, class_prompt, resolution)
        root = self.settings.cache_root()
        # The model's weights are hashed once and remembered in the cache root (not again on every rank).
        # A user's folder names files after the photos' stems, the cache after their content (bank.bank_file).
        naming = "stem" if self.settings.features_dir is not None else "content"
        bank = open_bank(self.bank_folder(class_prompt, resolution), images, settings, root / MODEL_HASHES_FILE, naming=naming)
        condition = time_ids = None
        if self.settings.on_the_fly:
            # The pretrained text encoders' class condition (the trained ones may drift from it).
            tokenizers = self.source.tokenizers() if tokenizers is None else tokenizers
            condition = class_condition(tokenizers, self.source.text_encoders(), class_prompt)
            if condition.pooled is not None:  # SDXL: each photo's centre-crop size conditioning, as the bank was built
                time_ids = [centre_crop_time_ids(Path(image), resolution) for image in images]
        return TeacherEntries(bank, self.settings.on_the_fly, condition, time_ids)

    # ---------------------------------------------------------------- model side (configure_model, training_step)

    def attach(self, unet: torch.nn.Module, lora: bool, teacher_dtype: torch.dtype) -> None:
        """Hooks the student's query layer of ``unet``; call after LoRA injection and before any training step."""
        self._student_unet, self._lora = unet, lora
        if self.settings.on_the_fly and not lora:
            # Copied before any training step (and before a checkpoint is restored): the pretrained weights.
            self.teacher_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype=teacher_dtype).eval()
        # Registered after LoRA injection, so the student's query includes the adapter's delta.
        # layer None: the model's own by the rule (pdm.capture.default_pdm_layer; SD1.5: the paper's layer).
        self.capture = QueryCapture(unet, self.settings.layer)
        self.layer = self.capture.layer

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
        condition = PromptEmbeddings(teacher["condition"], teacher.get("pooled"))
        query = unet_query_fn(unet, condition, self.layer, disable_adapters=self._lora)
        return query(teacher["latents"], timesteps, teacher.get("time_ids"))


def unet_query_fn(
    unet: torch.nn.Module,
    condition: PromptEmbeddings | torch.Tensor,
    layer: str = DEFAULT_PDM_LAYER,
    disable_adapters: bool = True,
) -> QueryFunction:
    """The frozen teacher as a query function: ``unet`` conditioned on ``condition`` (the class prompt).

    ``condition`` is [1, 77, d] (expanded to the batch) or [B, 77, d], as a tensor or as
    ``PromptEmbeddings`` (SDXL: with the pooled embedding; each call then takes the time ids [B, 6]).
    The stored reconstruction latent at t is exactly what the extraction fed to the UNet at t, so
    ``query(latent_t, t)`` reproduces the bank's query up to the dtype the UNet runs in. Under LoRA
    pass the student's own UNet: its adapters are switched off for the call (no second copy). Under
    full fine-tuning pass a frozen copy of the pretrained UNet. The capture hook lives only for the
    call; a student's QueryCapture on the same layer also sees this forward, so pop the student's
    query before asking for targets.
    """
    embeddings = condition if isinstance(condition, PromptEmbeddings) else PromptEmbeddings(condition)

    def query(latents: torch.Tensor, timesteps: torch.Tensor, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        batch = len(latents)
        hidden, pooled = embeddings.encoder_hidden_states, embeddings.pooled
        context = PromptEmbeddings(
            hidden.to(device=latents.device, dtype=dtype).expand(batch, -1, -1),
            None if pooled is None else pooled.to(device=latents.device, dtype=dtype).expand(batch, -1),
        )
        kwargs = unet_conditioning(context, time_ids)
        with torch.no_grad(), QueryCapture(unet, layer) as capture:
            if disable_adapters:
                with adapters_disabled(unet):
                    unet(latents.to(dtype), timesteps, **kwargs)
            else:
                unet(latents.to(dtype), timesteps, **kwargs)
            return capture.pop()

    return query
