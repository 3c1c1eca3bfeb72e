"""A callback for tests/test_resume_cli.py: kills the training process outright at a given step."""

from __future__ import annotations

import os

import lightning as L


class HardCrashAtStep(L.Callback):
    """Ends the process like a SIGKILL or power loss (no cleanup, no exception handling) before step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os._exit(137)
