"""Exporting the trained weights in the formats users load, at the end of fit and optionally every N steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.callbacks.run_outputs import run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_module
from pdm_lightning.export.export_set import config_hash, remove_partial_outputs, remove_set_leftovers
from pdm_lightning.export.weights import (
    ExportOptions,
    check_export_possible,
    export_weights,
)

STEP_PREFIX = "step_"


class ExportWeights(L.Callback):
    """Writes the exports under ``<log dir>/<dirname>`` when fit ends (not after an interrupted fit).

    Each export is a set, from one step: written into one staging folder with ``manifest.json``
    (step, settings hash, each file's size and sha256), checked, then switched into place with one
    rename; a kill at any moment leaves the previous complete set. ``<dirname>`` is replaced whole.
    Unfinished exports a killed run left are removed when fit starts.

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
            original Stable Diffusion key layout (SD1.x and SDXL models).
        lora_folder: LoRA runs: the diffusers LoRA folder (always written when a merged pipeline is asked for).
        lora_kohya: LoRA runs: ``<name>_lora.safetensors`` in the kohya / AUTOMATIC1111 key layout.
        name: file name stem of the single-file checkpoint and of the kohya LoRA.
        pipeline_dirname: folder name of the pipeline under ``dirname``.
        lora_dirname: folder name of the diffusers LoRA under ``dirname``.
        dtype: dtype of the exported weights.
        every_n_train_steps: also export every N optimizer steps into ``<dirname>_steps/step_<N>/``
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

    def steps_dir(self, trainer: L.Trainer) -> Path:
        """Where the periodic sets go: beside the final one, since that one is replaced whole."""
        return run_dir(trainer) / f"{self.dirname}_steps"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An impossible export fails now, not after training.
        check_export_possible(dreambooth_module(pl_module, "ExportWeights"), self.options)
        export_dir, steps_dir = self.export_dir(trainer), self.steps_dir(trainer)  # every rank: a collective
        if trainer.is_global_zero:
            for action in self.clean_up(export_dir, steps_dir):
                rank_zero_info(f"Export start-up: {action}")

    def clean_up(self, export_dir: Path, steps_dir: Path) -> list[str]:
        """Removes what killed exports left (staging folders, partial files), restores a set a kill left
        aside, and moves periodic exports of the older layout (``<dirname>/step_N``) to ``<dirname>_steps``."""
        actions = remove_set_leftovers(export_dir.parent) + remove_set_leftovers(steps_dir)
        actions += self._move_old_step_exports(export_dir, steps_dir)
        names = (self.options.pipeline_dirname, self.options.lora_dirname)
        for folder in [export_dir, *sorted(steps_dir.glob(f"{STEP_PREFIX}*"))]:
            actions += remove_partial_outputs(folder, names)
        return actions

    @staticmethod
    def _move_old_step_exports(export_dir: Path, steps_dir: Path) -> list[str]:
        # The final set replaces <dirname> whole: older periodic exports inside it must move out first.
        actions = []
        for old in sorted(export_dir.glob(f"{STEP_PREFIX}*")):
            if old.is_dir() and not (steps_dir / old.name).exists():
                steps_dir.mkdir(parents=True, exist_ok=True)
                os.rename(old, steps_dir / old.name)
                actions.append(f"moved {old} to {steps_dir / old.name}")
        return actions

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_train_steps is None or step == 0 or step % self.every_n_train_steps:
            return
        # With gradient accumulation several batches end on one step; the final step's export is on_fit_end's.
        if step == self._last_exported_step or step == trainer.max_steps:
            return
        self._last_exported_step = step
        self._export(trainer, pl_module, self.steps_dir(trainer) / f"{STEP_PREFIX}{step:06d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        self._export(trainer, pl_module, self.export_dir(trainer))

    def _export(self, trainer: L.Trainer, module: L.LightningModule, destination: Path) -> None:
        """Rank 0 writes; every rank learns whether it worked, so none hangs waiting for a failed one."""
        failure, error = None, None
        if trainer.is_global_zero:
            try:
                export_weights(module, destination, self.options, trainer.global_step, run_settings_hash(trainer, module))
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks are told
                failure, error = f"{type(caught).__name__}: {caught}", caught
        failure = trainer.strategy.broadcast(failure, src=0)  # also keeps other ranks until the files are on disk
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"The export on rank 0 failed: {failure}")


def run_settings_hash(trainer: L.Trainer, module: L.LightningModule) -> str:
    """The manifest's ``config_hash``: sha256 of the model's and the data module's settings (hparams)."""
    datamodule = trainer.datamodule
    return config_hash({"model": dict(module.hparams), "data": dict(datamodule.hparams) if datamodule is not None else {}})
