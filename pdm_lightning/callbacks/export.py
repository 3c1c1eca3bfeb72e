"""Exporting the fine-tuned model as a diffusers pipeline folder at the end of fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.atomic import staged_directory
from pdm_lightning.model.loading import DTYPES, load_pipeline
from pdm_lightning.model.module import DreamBoothModule

def export_pipeline(module: DreamBoothModule, destination: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes base model + fine-tuned weights as a pipeline that ``from_pretrained`` loads.

    Frozen parts are read again from the base model rather than taken from the module, where they
    may be stored in a reduced training dtype.
    """
    trained = {"unet": module.unet}
    if module.hparams.train_text_encoder:
        trained["text_encoder"] = module.text_encoder
    # Never cast the live modules (a round trip through half precision would lose their weights).
    trained = {name: _in_dtype(part, dtype) for name, part in trained.items()}
    hparams = module.hparams
    pipeline = load_pipeline(hparams.pretrained_model_name_or_path, hparams.revision, hparams.variant, dtype, **trained)
    with staged_directory(destination) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return destination


def _in_dtype(part: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if all(p.dtype == dtype for p in part.parameters()):
        return part
    return copy.deepcopy(part).to(dtype=dtype)


class ExportPipeline(L.Callback):
    """At the end of fit, saves the pipeline under ``<log dir>/export/pipeline`` (safetensors).

    Args:
        dirname: folder name under the run's log directory.
        dtype: dtype of the exported weights.
    """

    def __init__(self, dirname: str = "export/pipeline", dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        self.dirname = dirname
        self.dtype = dtype

    def export_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        if not isinstance(pl_module, DreamBoothModule):
            raise TypeError(f"ExportPipeline needs a DreamBoothModule, got {type(pl_module).__name__}.")
        destination = self.export_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            export_pipeline(pl_module, destination, DTYPES[self.dtype])
            rank_zero_info(f"Exported the fine-tuned pipeline to {destination}")
        trainer.strategy.barrier("export_pipeline")  # no rank exits before the export is on disk
