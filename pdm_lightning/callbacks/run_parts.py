"""The run's DreamBooth data module and module, for callbacks that read their settings.

Typed access with a clear error: a callback used with another data module or LightningModule says
what it needs instead of failing later on a missing attribute.
"""

from __future__ import annotations

import lightning as L

from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.training.module import DreamBoothModule


def dreambooth_data(trainer: L.Trainer, user: str) -> DreamBoothDataModule:
    """The Trainer's data module; ``user`` (the callback's name) is named in the error when it is not ours."""
    datamodule = trainer.datamodule
    if not isinstance(datamodule, DreamBoothDataModule):
        raise TypeError(f"{user} needs the DreamBoothDataModule (its prompts, photos and settings), "
                        f"got {type(datamodule).__name__}.")
    return datamodule


def dreambooth_module(pl_module: L.LightningModule, user: str) -> DreamBoothModule:
    """``pl_module`` as the DreamBoothModule; ``user`` (the callback's name) is named in the error when it is not."""
    if not isinstance(pl_module, DreamBoothModule):
        raise TypeError(f"{user} needs a DreamBoothModule, got {type(pl_module).__name__}.")
    return pl_module
