"""The non-finite guard: a NaN or infinite loss, gradient norm or weight never reaches a file.

A diverging run (too high a learning rate, a broken input) turns its losses into NaN within a
step or two. Trained on, it would write NaN weights into every checkpoint, ``last.ckpt``, the
samples and the exports. The guard looks at every loss term and the gradient norm before the
optimizer step changes the weights, and either stops the run right there (the default: the weights
in memory and on disk are still the last finite ones) or drops that optimizer step (``skip``: no
update; counted, with a limit on how many in a row). The checks here are pure; the module calls them
from its Lightning hooks (see ``DreamBoothModule.training_step`` / ``on_before_optimizer_step`` /
``optimizer_step``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from torch.nn.utils import get_total_norm

Action = Literal["stop", "skip"]
Decision = Literal["ok", "skip", "stop"]


class NonFiniteTrainingError(RuntimeError):
    """A loss, gradient norm or weight is NaN or infinite; nothing was (or will be) written from it."""


@dataclass(frozen=True)
class NonFiniteSettings:
    """What a non-finite (NaN or infinite) loss term or gradient norm does to the run.

    Args:
        action: ``stop`` ends the run at that step with an error naming the term and the step (the
            weights are still the last finite ones); ``skip`` drops that optimizer step (no update,
            counted in ``train/nonfinite_skipped_steps``) and trains on.
        max_consecutive_skips: with ``skip``, the run stops when more optimizer steps than this in a
            row would be dropped (a run that stays non-finite is diverging, not unlucky).
    """

    action: Action = "stop"
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        if self.action not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite.action must be 'stop' or 'skip', got {self.action!r}.")
        if self.max_consecutive_skips < 1:
            raise ValueError(
                f"model.nonfinite.max_consecutive_skips must be at least 1, got {self.max_consecutive_skips} "
                "(use --model.nonfinite.action stop to stop at the first non-finite step)."
            )


def nonfinite_terms(terms: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
    """Name -> value of every scalar term that is NaN or infinite (``None`` terms are absent ones).

    The terms are read in one transfer: one device synchronisation per step, not one per term.
    """
    named = [(name, value) for name, value in terms.items() if value is not None]
    if not named:
        return {}
    values = torch.stack([value.detach().float().reshape(()) for _, value in named]).tolist()
    return {name: value for (name, _), value in zip(named, values) if not math.isfinite(value)}


def describe_terms(bad: Mapping[str, float]) -> str:
    """``train/loss_pdm is nan, train/loss is nan``."""
    return ", ".join(f"{name} is {value}" for name, value in bad.items())


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The L2 norm of all gradients together, exactly as ``torch.nn.utils.clip_grad_norm_`` computes it over the
    same parameters (so clipping can reuse it: ``clip_grads_with_norm_``); None without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return get_total_norm(grads, 2.0) if grads else None


# Devices with torch's multi-tensor (foreach) norm kernel.
FOREACH_DEVICES = ("cpu", "cuda")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """No NaN or infinite value in any tensor, in one fused pass.

    The L2 norm first (8x cheaper than the max-abs norm on a CPU): NaN and inf propagate into it, so a
    finite L2 norm proves every value finite. It overflows only for values beyond ~1e19, where the
    max-abs norm, which cannot overflow, decides. Parameters are a Tensor subclass, which
    ``get_total_norm`` by itself sends down its Python loop of one norm per tensor (4.8 ms against 2.0 ms
    for the tiny model's 720 tensors on a CPU); ``foreach`` is asked for where the device has the kernel.
    """
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    foreach = True if all(t.device.type in FOREACH_DEVICES for t in tensors) else None
    if math.isfinite(float(get_total_norm(tensors, 2.0, foreach=foreach))):
        return True
    return math.isfinite(float(get_total_norm(tensors, math.inf, foreach=foreach)))


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The first tensor holding a NaN or infinite value, described with its counts; None when all are finite."""
    for name, tensor in named:
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan = int(torch.isnan(tensor).sum())
            return f"{name} ({nan} nan, {tensor.numel() - int(finite.sum()) - nan} inf of {tensor.numel()} values)"
    return None


def checkpoint_files(trainer) -> list[Path]:  # noqa: ANN001 - lightning.Trainer
    """The checkpoint files the run's checkpoint callbacks point at, step files before ``last.ckpt``."""
    names = [getattr(callback, name, "") for name in ("best_model_path", "last_model_path")
             for callback in trainer.checkpoint_callbacks]
    return [Path(name) for name in dict.fromkeys(names) if name and Path(name).is_file()]


def prevent_checkpoints_on_exception(trainer) -> list[str]:  # noqa: ANN001 - lightning.Trainer
    """Turns off the checkpoints Lightning writes when an exception ends the run; returns what was turned off.

    Called only when the weights in memory are no longer finite: ``ModelCheckpoint(save_on_exception=True)``
    and ``OnExceptionCheckpoint`` would otherwise save them (over ``last.ckpt``) on the way out.
    """
    turned_off = []
    for callback in list(trainer.checkpoint_callbacks):
        if isinstance(callback, OnExceptionCheckpoint):
            trainer.callbacks.remove(callback)
            turned_off.append(type(callback).__name__)
        elif isinstance(callback, ModelCheckpoint) and callback.save_on_exception:
            callback.save_on_exception = False
            turned_off.append(f"{type(callback).__name__}(save_on_exception)")
    return turned_off


@dataclass
class CheckpointRecord:
    """Which checkpoint file was written at which global step (as far as this process saw)."""

    path: Path
    step: int


@dataclass
class NonFiniteGuard:
    """The guard's state: the current optimizer step's findings and the skip counters.

    ``flag`` records a finding (a micro-batch's loss, the step's gradient norm); ``decide`` is called
    once per optimizer step and says what to do with it. Skip counters are per process and start at 0
    on resume.
    """

    settings: NonFiniteSettings = field(default_factory=NonFiniteSettings)
    consecutive_skips: int = 0
    skipped_steps: int = 0
    findings: list[str] = field(default_factory=list)
    checkpoint: CheckpointRecord | None = None  # the newest checkpoint written (or resumed from)
    seen: dict[Path, int] = field(default_factory=dict)  # checkpoint file -> modification time when last looked at

    def flag(self, finding: str) -> None:
        self.findings.append(finding)

    def decide(self) -> Decision:
        """``ok`` (nothing found), ``skip`` (drop this optimizer step) or ``stop``; updates the counters."""
        if not self.findings:
            self.consecutive_skips = 0
            return "ok"
        if self.settings.action == "stop" or self.consecutive_skips >= self.settings.max_consecutive_skips:
            return "stop"
        self.consecutive_skips += 1
        self.skipped_steps += 1
        self.findings.clear()
        return "skip"

    def note_checkpoints(self, trainer, step: int | None) -> None:  # noqa: ANN001 - lightning.Trainer
        """Records a checkpoint file written since the last look as written at ``step`` (None: only look)."""
        for path in checkpoint_files(trainer):
            modified = path.stat().st_mtime_ns
            if self.seen.get(path) != modified:
                self.seen[path] = modified
                if step is not None:
                    self.checkpoint = CheckpointRecord(path, step)

    def note_resumed(self, path: str | Path, step: int) -> None:
        """At the start of a resumed fit: ``path`` holds the weights of ``step``."""
        self.checkpoint = CheckpointRecord(Path(path), step)

    def stop_message(self, step: int, learning_rate: float) -> str:
        """What was found, at which step, what to change, and which checkpoint holds the last finite weights."""
        found = "; ".join(dict.fromkeys(self.findings))  # a term flagged by several micro-batches is named once
        if self.settings.action == "skip" and self.consecutive_skips >= self.settings.max_consecutive_skips:
            found += (f" ({self.consecutive_skips} optimizer steps in a row were already dropped: "
                      f"--model.nonfinite.max_consecutive_skips {self.settings.max_consecutive_skips})")
        if step == 0:
            advice = ("no update has been made yet, so the base model or the training data gives it: check "
                      "--model.pretrained_model_name_or_path, the photos and the class images")
        else:
            advice = (f"lower --model.learning_rate (now {learning_rate:g}), add a warm-up "
                      "(--model.optimizer.lr_warmup_steps) or gradient clipping (--trainer.gradient_clip_val 1.0)")
            if self.settings.action == "stop":
                advice += ", or drop such steps with --model.nonfinite.action skip"
        return f"{found} at step {step}: the run stops before this step changes the weights. To fix: {advice}. {self.checkpoint_line()}"

    def checkpoint_line(self) -> str:
        """Which checkpoint holds the last finite weights (every checkpoint written holds finite ones)."""
        if self.checkpoint is None:
            return "No checkpoint was written before this step."
        return (f"The last checkpoint written ({self.checkpoint.path}, step {self.checkpoint.step}) holds the last "
                "finite weights: resume from it with --ckpt_path.")
