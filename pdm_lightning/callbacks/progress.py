"""The run's progress: optimizer steps against ``max_steps``, in a terminal or in a log file.

Lightning's default bar counts the batches of an epoch (``Epoch 3/-2`` for a run bounded by
``max_steps``), has no ETA for the run and, with output redirected to a file, shows nothing until it
ends. ``StepProgressBar`` counts optimizer steps: one live line in a terminal, plain lines in a log file
(flushed at once, so ``tail -f`` follows the run), plus one line saying what is trained and where the
outputs go, and one saying where a resumed run picked up.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from tqdm import tqdm

from pdm_lightning.callbacks.run_outputs import run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_data, dreambooth_module

LOSS_KEY = "train/loss"  # logged by DreamBoothModule.training_step with prog_bar=True
# The live line: "step 120/700 (17%) |███      | 2.31 it/s | loss 0.1234 | elapsed 0:00:52 | ETA 0:04:11".
# tqdm draws the bar and fits it to the terminal; the text around it is ours (postfix[0], see live_text).
LIVE_FORMAT = "{desc} |{bar}| {postfix[0]}"


def format_duration(seconds: float) -> str:
    """``0:04:11``; whole seconds are enough for a run's progress."""
    return str(timedelta(seconds=int(round(seconds))))


def format_rate(steps_per_second: float) -> str:
    """``2.31 it/s``, or ``4.20 s/it`` below one step a second (a CPU run's 0.02 it/s says little)."""
    if steps_per_second >= 1 or steps_per_second <= 0:
        return f"{steps_per_second:.2f} it/s"
    return f"{1 / steps_per_second:.2f} s/it"


def step_text(step: int, total: int | None) -> str:
    """``step 120/700 (17%)``; ``step 120`` when the run has no step limit."""
    return f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"


@dataclass
class StepRate:
    """Steps done in this fit (a resumed run's earlier steps excluded) over the time since it started.

    The mean over the whole fit, not a recent window: the ETA then includes the periodic work (sample
    images, checkpoints) that a window between two of them would leave out.
    """

    start_step: int
    total: int | None
    start_time: float

    def stats(self, step: int, now: float, loss: float | None) -> str:
        """``2.31 it/s | loss 0.1234 | elapsed 0:00:52 | ETA 0:04:11`` (parts not yet known are left out)."""
        elapsed = max(now - self.start_time, 0.0)
        done = step - self.start_step
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        parts = [format_rate(rate)] if rate else []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if rate and self.total:
            parts.append(f"ETA {format_duration(max(self.total - step, 0) / rate)}")
        return " | ".join(parts)

    def line(self, step: int, now: float, loss: float | None) -> str:
        """The log-file line: ``step 120/700 (17%) | 2.31 it/s | loss 0.1234 | elapsed 0:00:52 | ETA 0:04:11``."""
        return f"{step_text(step, self.total)} | {self.stats(step, now, loss)}"


@dataclass
class LinePacer:
    """When a plain line is due: at each multiple of ``every_n`` (steps or batches), after ``every_n_seconds``
    without a line, or at the last one, whichever comes first. 0 turns a criterion off.

    Multiples, not "n since the last line", so that a resumed run or a line forced by the clock does
    not shift the rest (step 120, 130, ... not 123, 133, ...).
    """

    every_n: int
    every_n_seconds: float
    last_time: float = 0.0

    def due(self, count: int, now: float, final: bool = False) -> bool:
        by_count = self.every_n > 0 and count % self.every_n == 0
        by_time = self.every_n_seconds > 0 and now - self.last_time >= self.every_n_seconds
        return final or by_count or by_time

    def mark(self, now: float) -> None:
        self.last_time = now


def training_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """What the run trains, in a few words: ``LoRA rank 4, UNet + text encoder | PDM on (...) | prior preservation on``.

    A module or data module other than ours (the bar works with any) is named by its class instead.
    """
    try:
        module = dreambooth_module(pl_module, "StepProgressBar")
        data = dreambooth_data(trainer, "StepProgressBar")
    except TypeError:
        return type(pl_module).__name__
    kind = f"LoRA rank {module.lora.rank}" if module.lora is not None else "full fine-tune"
    parts = "UNet + text encoder" if module.hparams.train_text_encoder else "UNet"
    if module.pdm is not None:
        pdm = f"PDM on ({module.pdm.teacher} teacher, weight {module.pdm_loss_weight:g})"
    else:
        pdm = "PDM off"
    prior = "prior preservation on" if data.hparams.with_prior_preservation else "prior preservation off"
    source = module.source
    base = source.pretrained_model_name_or_path
    extras = [f"{name} {value}" for name, value in (("revision", source.revision), ("variant", source.variant)) if value]
    if extras:
        base += f" ({', '.join(extras)})"
    return f"{kind}, {parts} | {pdm} | {prior} | base {base}"


def banner(trainer: L.Trainer, pl_module: L.LightningModule, outputs: Path) -> str:
    """The start line: ``fit: LoRA rank 4, UNet | PDM off | prior preservation on | base runs/tiny-sd | 200 steps | outputs runs/quickstart``."""
    steps = f"{trainer.max_steps} steps" if trainer.max_steps and trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
    return f"fit: {training_summary(trainer, pl_module)} | {steps} | outputs {outputs}"


def resumed_line(step: int, total: int | None, checkpoint: str | Path) -> str:
    """``resumed at step 100 of 700 from runs/quickstart/checkpoints/last.ckpt``."""
    return f"resumed at step {step}{f' of {total}' if total else ''} from {checkpoint}"


def current_loss(trainer: L.Trainer) -> float | None:
    """The latest training loss: the progress-bar metrics, else the callback metrics; None before the first step."""
    value = trainer.progress_bar_metrics.get(LOSS_KEY, trainer.callback_metrics.get(LOSS_KEY))
    return None if value is None else float(value)


def total_steps(trainer: L.Trainer) -> int | None:
    """The fit's last step: ``max_steps``, else Lightning's estimate from ``max_epochs``; None when unbounded."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.max_steps
    estimate = trainer.estimated_stepping_batches
    return None if estimate is None or math.isinf(estimate) else int(estimate)


class StepProgressBar(ProgressBar):
    """The progress of ``fit`` in optimizer steps, replacing Lightning's epoch bar (``--progress.*``).

    In a terminal: one live line, ``step 120/700 (17%) |███   | 2.31 it/s | loss 0.1234 | elapsed 0:00:52
    | ETA 0:04:11``. With output redirected (a log file, a pipe): the same as plain lines, one every
    ``every_n_steps`` steps or ``every_n_seconds`` seconds, whichever comes first, and one at the last step,
    each flushed at once. The ETA is for the whole run at the mean speed of this fit so far (sample images
    and checkpoints included). At the start of fit one line says what is trained (full fine-tune or LoRA
    rank, text encoder or not, PDM and its teacher, prior preservation), the base model, the steps and the
    run folder; a resumed run says ``resumed at step N of M from FILE``. ``validate``, ``test`` and
    ``predict`` show their batches the same way. Global rank 0 only; ``--trainer.enable_progress_bar
    false`` turns all of it off.

    Args:
        every_n_steps: in a log file, a line at every multiple of this step (0: by time only).
        every_n_seconds: in a log file, a line after this many seconds without one (0: by steps only).
        live: True: always the live line; False: always plain lines; None: the live line when the
            output is a terminal.
    """

    def __init__(self, every_n_steps: int = 10, every_n_seconds: float = 30.0, live: bool | None = None) -> None:
        super().__init__()
        # Checked now: a bad value found at the first step would stop a run that has already started.
        if every_n_steps < 0 or every_n_seconds < 0:
            raise ValueError(f"every_n_steps and every_n_seconds must be >= 0 (0 turns one off), got {every_n_steps} "
                             f"and {every_n_seconds}.")
        if every_n_steps == 0 and every_n_seconds == 0:
            raise ValueError("every_n_steps and every_n_seconds are both 0: a log file would get no progress line.")
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.live = live
        self._enabled = True
        self._rate: StepRate | None = None
        self._pacer = LinePacer(every_n_steps, every_n_seconds)
        self._last_step = -1
        self._printed_step = -1
        self._train_bar: tqdm | None = None
        self._eval_label = ""
        self._eval_total: int | None = None
        self._eval_start = 0.0
        self._eval_done = 0
        self._eval_bar: tqdm | None = None

    def __getstate__(self) -> dict[str, Any]:
        # tqdm bars cannot be pickled (spawned DDP workers receive the callbacks pickled).
        return {k: None if isinstance(v, tqdm) else v for k, v in vars(self).items()}

    # ProgressBar's switches: the Trainer turns the bar off on other ranks and around its own tuners.
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @staticmethod
    def stream() -> TextIO:
        # Looked up at each write: a redirection set after the bar was built (pytest's capture) applies.
        return sys.stdout

    def is_live(self) -> bool:
        if self.live is not None:
            return self.live
        isatty = getattr(self.stream(), "isatty", None)
        return bool(isatty and isatty())

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Prints a line without breaking the live line (above it)."""
        bar = self._train_bar or self._eval_bar
        if bar is not None:
            bar.write(sep.join(map(str, args)), file=self.stream())
        else:
            print(*args, sep=sep, file=self.stream(), flush=True, **kwargs)

    def _write_line(self, text: str) -> None:
        stream = self.stream()
        stream.write(text + "\n")
        stream.flush()  # a log file shows the line now, not when the buffer fills

    # --- fit ------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outputs = run_dir(trainer)  # on every rank: under DDP trainer.log_dir is a collective
        if self.is_enabled:
            self.print(banner(trainer, pl_module, outputs))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has restored a resumed run's step by now (not yet at on_fit_start).
        now = time.monotonic()
        total = total_steps(trainer)
        self._rate = StepRate(trainer.global_step, total, now)
        self._pacer.mark(now)
        self._last_step = self._printed_step = trainer.global_step
        if not self.is_enabled:
            return
        if trainer.ckpt_path:
            self.print(resumed_line(trainer.global_step, total, trainer.ckpt_path))
        if self.is_live():
            self._train_bar = tqdm(
                total=total, initial=trainer.global_step, file=self.stream(), dynamic_ncols=True, leave=True,
                bar_format=LIVE_FORMAT, postfix=[self._rate.stats(trainer.global_step, now, None)],
                desc=step_text(trainer.global_step, total),
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches make one step: only a new step is shown.
        if step == self._last_step or self._rate is None:
            return
        self._last_step = step
        if self.is_enabled:
            self._show_step(trainer, step, final=self._rate.total is not None and step >= self._rate.total)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped before its last step (max_time, should_stop) still ends on a line of its last state.
        if self.is_enabled and self._rate is not None and self._printed_step != trainer.global_step:
            self._show_step(trainer, trainer.global_step, final=True)
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    def _show_step(self, trainer: L.Trainer, step: int, final: bool) -> None:
        now = time.monotonic()
        loss = current_loss(trainer)
        if self._train_bar is not None:
            self._train_bar.set_description_str(step_text(step, self._rate.total), refresh=False)
            self._train_bar.postfix = [self._rate.stats(step, now, loss)]
            self._train_bar.n = step
            self._train_bar.refresh()
        elif self._pacer.due(step, now, final):
            self._write_line(self._rate.line(step, now, loss))
            self._pacer.mark(now)
        else:
            return
        self._printed_step = step

    # --- validate / test / predict: their batches, the same way ------------------------------------

    def _eval_batch_start(self, label: str, total: Callable[[], float | int], dataloader_idx: int) -> None:
        # ``total`` is one of ProgressBar's ``total_*_batches_current_dataloader``: read once the
        # tracker knows the current dataloader.
        if not self.has_dataloader_changed(dataloader_idx):
            return
        self._eval_close()
        self._eval_label = label if dataloader_idx == 0 else f"{label} (dataloader {dataloader_idx})"
        self._eval_total = convert_inf(total())
        self._eval_start = time.monotonic()
        self._eval_done = 0
        self._pacer.mark(self._eval_start)
        if self.is_enabled and self.is_live():
            nested = self._train_bar is not None  # validation inside fit: below the step line, then gone
            self._eval_bar = tqdm(total=self._eval_total, desc=self._eval_label, file=self.stream(),
                                  dynamic_ncols=True, leave=not nested, position=int(nested), unit="batch")

    def _eval_batch_end(self, batch_idx: int) -> None:
        self._eval_done = batch_idx + 1
        if not self.is_enabled:
            return
        if self._eval_bar is not None:
            self._eval_bar.update(self._eval_done - self._eval_bar.n)
            return
        now = time.monotonic()
        if self._pacer.due(self._eval_done, now, final=self._eval_done == self._eval_total):
            self._write_line(self._eval_line(now))
            self._pacer.mark(now)

    def _eval_line(self, now: float) -> str:
        total = f"/{self._eval_total}" if self._eval_total else ""
        return f"{self._eval_label}: batch {self._eval_done}{total} | elapsed {format_duration(now - self._eval_start)}"

    def _eval_close(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def _eval_end(self) -> None:
        self._eval_close()
        self.reset_dataloader_idx_tracker()
        self._pacer.mark(time.monotonic())  # the step lines' clock starts again after an evaluation

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        label = self.sanity_check_description if trainer.sanity_checking else self.validation_description
        self._eval_batch_start(label, lambda: self.total_val_batches_current_dataloader, dataloader_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end()

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_batch_start(self.test_description, lambda: self.total_test_batches_current_dataloader, dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(batch_idx)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end()

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._eval_batch_start(self.predict_description, lambda: self.total_predict_batches_current_dataloader, dataloader_idx)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(batch_idx)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end()


def with_step_progress_bar(callbacks: L.Callback | list[L.Callback] | None, enable_progress_bar: bool | None,
                           bar: StepProgressBar | None) -> list[L.Callback]:
    """The Trainer's callbacks with ``bar`` added as its progress bar, unless the progress bar is off
    (Lightning refuses a ProgressBar callback with ``enable_progress_bar=False``) or one is already given.

    For ``PDMLightningCLI.instantiate_trainer``: a ProgressBar in ``trainer_defaults`` or added with
    ``add_lightning_class_args`` would always be in the list, and ``--trainer.enable_progress_bar false``
    would then stop the run with a MisconfigurationException instead of turning the bar off.
    """
    callbacks = [callbacks] if isinstance(callbacks, L.Callback) else list(callbacks or [])
    if enable_progress_bar is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, bar if bar is not None else StepProgressBar()]
