"""Step checkpoints whose last.ckpt always holds the final step of a finished run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes ``last.ckpt`` when training ends between two save steps.

    Lightning writes ``last.ckpt`` only on save steps (every ``every_n_train_steps``), so a run of
    700 steps saving every 300 would leave step 600 as "last"; resuming it would redo 100 steps.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
