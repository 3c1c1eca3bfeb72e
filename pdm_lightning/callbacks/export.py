"""Exporting the trained weights in the formats users load, at the end of fit and optionally every N steps."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L

from pdm_lightning.callbacks.run_outputs import run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_module
from pdm_lightning.export.weights import (
    ExportOptions,
    check_export_possible,
    export_weights,
)


class ExportWeights(L.Callback):
    """Writes the exports under ``<log dir>/<dirname>`` when fit ends (not after an interrupted fit).

    Full fine-tuning: ``pipeline/`` (diffusers folder) and ``<name>.safetensors`` (original SD
    layout, for AUTOMATIC1111 / ComfyUI / ``from_single_file``). LoRA: ``lora/`` (diffusers
    ``load_lora_weights`` folder, UNet and text-encoder adapters) and ``<name>_lora.safetensors``
    (kohya / AUTOMATIC1111 layout). Every export is loaded back right after it is written and the
    run fails on any missing, unexpected or different weight.

    Args:
        dirname: export folder under the run's log directory.
        pipeline: write the diffusers pipeline folder. Default (null): yes for a full fine-tune, no
            for LoRA; true with LoRA writes the base model with the LoRA fused in.
        single_file: with the pipeline folder, also write it as one ``<name>.safetensors`` in the
            original Stable Diffusion key layout (SD1.x models).
        lora_folder: LoRA runs: the diffusers LoRA folder (always written when a merged pipeline is asked for).
        lora_kohya: LoRA runs: ``<name>_lora.safetensors`` in the kohya / AUTOMATIC1111 key layout.
        name: file name stem of the single-file checkpoint and of the kohya LoRA.
        pipeline_dirname: folder name of the pipeline under ``dirname``.
        lora_dirname: folder name of the diffusers LoRA under ``dirname``.
        dtype: dtype of the exported weights.
        every_n_train_steps: also export every N optimizer steps into ``<dirname>/step_<N>/``
            (null: only at the end of fit).
        verify: load every export back and compare it with the trained weights.
    """

    def __init__(
        self,
        dirname: str = "export",
        pipeline: bool | None = None,
        single_file: bool = True,
        lora_folder: bool = True,
        lora_kohya: bool = True,
        name: str = "pdm_lightning",
        pipeline_dirname: str = "pipeline",
        lora_dirname: str = "lora",
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        every_n_train_steps: int | None = None,
        verify: bool = True,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"export.every_n_train_steps must be a positive number of steps or null, got {every_n_train_steps}.")
        self.dirname = dirname
        self.every_n_train_steps = every_n_train_steps
        self.options = ExportOptions(
            pipeline=pipeline,
            single_file=single_file,
            lora_folder=lora_folder,
            lora_kohya=lora_kohya,
            name=name,
            pipeline_dirname=pipeline_dirname,
            lora_dirname=lora_dirname,
            dtype=dtype,
            verify=verify,
        )
        self._last_exported_step: int | None = None

    def export_dir(self, trainer: L.Trainer) -> Path:
        return run_dir(trainer) / self.dirname

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An impossible export fails now, not after training.
        check_export_possible(dreambooth_module(pl_module, "ExportWeights"), self.options)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_train_steps is None or step == 0 or step % self.every_n_train_steps:
            return
        # With gradient accumulation several batches end on one step; the final step's export is on_fit_end's.
        if step == self._last_exported_step or step == trainer.max_steps:
            return
        self._last_exported_step = step
        self._export(trainer, pl_module, self.export_dir(trainer) / f"step_{step:06d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        self._export(trainer, pl_module, self.export_dir(trainer))

    def _export(self, trainer: L.Trainer, module: L.LightningModule, destination: Path) -> None:
        """Rank 0 writes; every rank learns whether it worked, so none hangs waiting for a failed one."""
        failure, error = None, None
        if trainer.is_global_zero:
            try:
                export_weights(module, destination, self.options)
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks are told
                failure, error = f"{type(caught).__name__}: {caught}", caught
        failure = trainer.strategy.broadcast(failure, src=0)  # also keeps other ranks until the files are on disk
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"The export on rank 0 failed: {failure}")

