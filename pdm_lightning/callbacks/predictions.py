"""Writing ``train.py predict``'s images: PNGs with their metadata, then a grid per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.callbacks.run_outputs import run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_module
from pdm_lightning.generation.files import write_grids, write_image
from pdm_lightning.generation.jobs import ImageJob, unpack_job_batch


class PredictionWriter(BasePredictionWriter):
    """Saves each predicted batch under ``<log dir>/<dirname>`` as it comes, and the grids at the end.

    File names are ``<prompt index>_<prompt>_<image index>.png`` (grids in ``grids/``), with the
    prompt, seed, sampler settings and model in each PNG's metadata.

    Args:
        dirname: folder under the run's log directory.
    """

    def __init__(self, dirname: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.dirname = dirname
        self.out_dir: Path | None = None
        self.written: list[Path] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The images are on disk; Lightning would otherwise also keep every one of them in memory.
        trainer.predict_loop.return_predictions = False
        self.out_dir = run_dir(trainer) / self.dirname  # every rank: a collective
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.written = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        model = str(dreambooth_module(pl_module, "PredictionWriter").hparams.pretrained_model_name_or_path)
        if trainer.ckpt_path:
            model += f" + {trainer.ckpt_path}"
        jobs, settings = unpack_job_batch(prediction)
        for job, image in zip(jobs, prediction["images"]):
            self.written.append(write_image(self.out_dir, job, image, settings, model, prediction["run_seed"]))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("prediction_writer")  # every rank's images are on disk
        if trainer.is_global_zero:
            # The full job list (not this rank's share) so that grids hold every rank's images.
            dataloader = trainer.predict_dataloaders
            dataloader = dataloader[0] if isinstance(dataloader, (list, tuple)) else dataloader
            jobs = [ImageJob(**item) for item in dataloader.dataset]
            grids = write_grids(self.out_dir, jobs)
            rank_zero_info(f"Wrote {len(jobs)} images and {len(grids)} grids to {self.out_dir}")
        trainer.strategy.barrier("prediction_grids")
