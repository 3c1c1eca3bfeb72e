"""The PDM regularizer's options: one group, ``--model.pdm.*`` (unset: PDM off)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pdm_lightning.core.dtypes import DTypeName
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.pdm.bank import BankSettings, default_cache_root
from pdm_lightning.pdm.capture import default_pdm_layer_for_config


@dataclass
class PDMSettings:
    """The PDM loss (PDMBooth, docs/method.md) and its teacher.

    Args:
        weight: weight of the PDM loss; None takes the reference's: 0.1 full fine-tune, 0.05 with LoRA.
        layer: module path of the UNet's ``to_q`` whose output is the appearance query; None (default): the
            model's own by the rule "``attn1.to_q`` of the first transformer block of the last attention module of
            the highest-resolution up block with attention": the paper's
            ``up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q`` on SD 1.x/2.x,
            ``up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q`` on SDXL (docs/sdxl.md).
        teacher: ``bank`` reads the teacher's queries from the bank; ``on_the_fly`` stores only the
            reconstruction latents and recomputes the queries each step with the pretrained UNet (the
            same UNet with adapters off under LoRA, a frozen copy in the compute dtype under full fine-tuning).
        inversion_steps: DDIM inversion steps of the bank; None is the faithful 999 (a row for every
            timestep). Fewer (e.g. 50) is ~20x cheaper; PDM timesteps are then drawn from that trajectory.
        dtype: storage dtype of the teacher queries (float16 halves the disk and I/O of float32).
        compute_dtype: dtype the frozen model runs in while the bank is built.
        batch_size: instance images inverted together (one UNet call per step for all of them).
        compile: run the frozen UNet through ``torch.compile`` while the bank is built (on CUDA in mode
            ``reduce-overhead``: CUDA graphs). The rows then match the eager ones to float rounding, not bit
            for bit; the bank's cache key does not change. Off: eager, traced for long builds (bit for bit).
        cache_dir: root of the bank cache (default ``$PDM_LIGHTNING_CACHE`` or ``~/.cache/pdm_lightning/pdm_bank``);
            a second run with the same model, images, prompt, resolution, layer and steps reuses it.
        features_dir: a folder written by ``python -m pdm_lightning.features`` (one ``<stem>.safetensors``
            per instance image), used as it is and checked against this run's settings, instead of the cache.
    """

    weight: float | None = None
    layer: str | None = None
    teacher: Literal["bank", "on_the_fly"] = "bank"
    inversion_steps: int | None = None
    dtype: Literal["float16", "float32"] = "float16"
    compute_dtype: DTypeName = "float32"
    batch_size: int = 4
    compile: bool = False
    cache_dir: str | None = None
    features_dir: str | None = None

    def __post_init__(self) -> None:
        # Checked when the CLI builds the settings, before any model loads.
        if self.weight is not None and self.weight < 0:
            raise InputDataError(f"--model.pdm.weight must be at least 0, got {self.weight}.")
        if self.inversion_steps is not None and self.inversion_steps < 1:
            raise InputDataError(f"--model.pdm.inversion_steps must be at least 1 (or null for the faithful 999), got {self.inversion_steps}.")
        if self.batch_size < 1:
            raise InputDataError(f"--model.pdm.batch_size must be at least 1, got {self.batch_size}.")

    def loss_weight(self, lora: bool) -> float:
        """The PDM loss weight: as set, else the reference's for the kind of fine-tuning."""
        if self.weight is not None:
            return self.weight
        return 0.05 if lora else 0.1

    @property
    def on_the_fly(self) -> bool:
        return self.teacher == "on_the_fly"

    def resolved_layer(self, source: ModelSource) -> str:
        """The PDM layer as set, else the base model's own by the rule (read from its UNet's config.json)."""
        return self.layer if self.layer is not None else default_pdm_layer_for_config(source.unet_config())

    def bank_settings(self, source: ModelSource, class_prompt: str, resolution: int) -> BankSettings:
        """Everything besides the photos that determines the bank (its cache key). The layer is the concrete
        module path (an SD1.5 bank built before the rule existed keeps its key), and a replacement VAE joins it."""
        return BankSettings(
            pretrained_model_name_or_path=source.pretrained_model_name_or_path,
            class_prompt=class_prompt,
            resolution=resolution,
            revision=source.revision,
            variant=source.variant,
            layer=self.resolved_layer(source),
            vae_name_or_path=source.vae_name_or_path,
            inversion_steps=self.inversion_steps,
            dtype=self.dtype,
            mode="latents" if self.on_the_fly else "bank",
            compute_dtype=self.compute_dtype,
        )

    def cache_root(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_root()
