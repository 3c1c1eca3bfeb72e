"""Step checkpoints whose last.ckpt always holds the final step of a finished run."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes ``last.ckpt`` when training ends between two save steps.

    Lightning writes ``last.ckpt`` only on save steps (every ``every_n_train_steps``), so a run of
    700 steps saving every 300 would leave step 600 as "last"; resuming it would redo 100 steps.
    Only public Lightning API is used: ``trainer.save_checkpoint`` and ModelCheckpoint's own options.
    """

    def __init__(self, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)
        self.save_period = every_n_train_steps

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        saved_at_this_step = bool(self.save_period) and step % self.save_period == 0
        if self.save_last and step > 0 and not saved_at_this_step and not trainer.fast_dev_run:
            path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            trainer.save_checkpoint(path)
            self.last_model_path = path
        super().on_train_end(trainer, pl_module)
