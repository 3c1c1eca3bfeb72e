"""Step checkpoints whose last.ckpt always holds the final step of a finished run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.training.checkpoint_io import remove_stale_checkpoint_writes


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes ``last.ckpt`` when training ends between two save steps.

    Lightning writes ``last.ckpt`` only on save steps (every ``every_n_train_steps``), so a run of
    700 steps saving every 300 would leave step 600 as "last"; resuming it would redo 100 steps.
    Only public Lightning API is used: ``trainer.save_checkpoint`` and ModelCheckpoint's own options.

    The final step's ``last.ckpt`` is written at the end of that step, inside the training loop, like
    every other checkpoint. Once the loop has ended, Lightning has closed the epoch the run stopped in
    (even part-way through it), so a checkpoint written then resumes a run extended with a larger
    ``max_steps`` into the next epoch's data order, or skips a whole epoch when the run stopped on an
    epoch boundary (Lightning-AI/pytorch-lightning#19617).
    """

    def __init__(self, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)
        self.save_period = every_n_train_steps
        self._final_step_saved = -1

    def checkpoint_folder(self, trainer: L.Trainer) -> Path:
        """Where this callback saves, before ``setup`` has resolved it (for ``--ckpt_path last``).

        Lightning's rule: ``dirpath`` if given, else ``<logger save_dir>/<name>/<version>/checkpoints``,
        else ``<default_root_dir>/checkpoints``.
        """
        if self.dirpath is not None:
            return Path(self.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
        return Path(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # A kill during a checkpoint write leaves its temporary file (never a partial under a final
        # name): remove those before this run writes its own. Rank 0 alone writes checkpoints.
        if stage == "fit" and trainer.is_global_zero and get_protocol(str(self.dirpath)) in ("file", "local"):
            folder = Path(str(self.dirpath))
            stale = remove_stale_checkpoint_writes(folder) if folder.is_dir() else []
            if stale:
                rank_zero_info(f"Removed {len(stale)} unfinished checkpoint write(s) of a killed run from {folder}.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            self._refresh_last(trainer)
            self._final_step_saved = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only runs that stop before max_steps (max_epochs, should_stop) get here unsaved: the
        # post-loop state is all there is then. Lightning's own on_train_end is not called: it would
        # write last.ckpt again from the post-loop state, over the one written inside the loop.
        if self._final_step_saved != trainer.global_step:
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        saved_at_this_step = bool(self.save_period) and step % self.save_period == 0
        if self.save_last and step > 0 and not saved_at_this_step and not trainer.fast_dev_run:
            path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
            trainer.save_checkpoint(path)
            self.last_model_path = path
