"""Where a run's outputs go: its folder on disk and the images it shows in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image


def run_dir(trainer: L.Trainer) -> Path:
    """The run's output folder: the logger's folder, or the Trainer's ``default_root_dir`` without a logger.

    Call it on every rank: under DDP ``trainer.log_dir`` broadcasts rank 0's folder (a collective).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_image(trainer: L.Trainer, tag: str, image: Image.Image, step: int) -> None:
    """Shows ``image`` under ``tag`` at ``step`` in every TensorBoard logger of the run (the only loggers
    here that show images); flushed at once, so it appears now and not minutes later."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            logger.experiment.flush()
