"""Choosing the checkpoint a run resumes from, and refusing a damaged one before Lightning reads it.

``--ckpt_path last`` takes the run's newest ``last*.ckpt`` (as Lightning does); when that file is
damaged (empty, cut short by a kill or a full disk), it says so in one line and takes the newest
intact checkpoint of the same folder instead (the highest step), saying so in one line. An explicit
``--ckpt_path FILE`` is checked the same way and, when damaged, fails naming the intact one to use.
Each file is read memory-mapped with ``weights_only=True``: only its small pickle is read, not its
tensors, so checking a folder costs little even at Stable Diffusion size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.training.checkpoint_io import Damage, DamagedCheckpointError, load_checkpoint_file

CHECKPOINT_SUFFIX = ".ckpt"
# Lightning's own rule for "last" files: last.ckpt, last-v1.ckpt, ...
_LAST = re.compile(r"^last(-v?\d+)?$")


@dataclass(frozen=True)
class CheckpointCheck:
    """One checkpoint file: its global step when intact, or why it is damaged."""

    path: Path
    step: int | None = None
    damage: Damage | None = None

    @property
    def intact(self) -> bool:
        return self.damage is None


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint to resume from (None: the folder holds none, start from scratch).

    ``note`` is a one-line message when it is not the last checkpoint. ``damaged`` are the files that
    cannot be read; those cut short by an interrupted write (``damage.interrupted``) are the caller's
    to remove from the run's own folder (``damage_note`` says so), or Lightning would save the re-run
    step beside one as ``step=...-v1.ckpt`` and keep the damaged file for ever.
    """

    path: Path | None
    note: str | None = None
    damaged: tuple[CheckpointCheck, ...] = ()


def check_checkpoint(path: Path) -> CheckpointCheck:
    """Reads ``path``'s pickle (not its tensors); raises ``RefusedCheckpointError`` for a hostile file."""
    try:
        state = load_checkpoint_file(path, map_location="cpu", mmap=True)
    except DamagedCheckpointError as error:
        return CheckpointCheck(path, damage=error.damage)
    if not isinstance(state, dict) or "state_dict" not in state or not isinstance(state.get("global_step"), int):
        raise InputDataError(f"{path} is not a Lightning training checkpoint (no state_dict / global_step): "
                             "move it out of the checkpoint folder or give another --ckpt_path.")
    return CheckpointCheck(path, step=state["global_step"])


def is_last_checkpoint(path: Path) -> bool:
    return path.suffix == CHECKPOINT_SUFFIX and bool(_LAST.match(path.stem))


def newest_intact(checks: list[CheckpointCheck]) -> CheckpointCheck | None:
    """The intact checkpoint of the highest step (the most recently written one on a tie)."""
    intact = [check for check in checks if check.intact]
    return max(intact, key=lambda check: (check.step, check.path.stat().st_mtime), default=None)


def damage_note(check: CheckpointCheck, removed: bool) -> str:
    """One line naming a damaged checkpoint and what became of it."""
    return f"Checkpoint {check.path} is damaged ({check.damage.reason}): " + ("removed it." if removed else "skipping it.")


def readable_checks(paths: list[Path]) -> list[CheckpointCheck]:
    """The checks of ``paths``, leaving out files that are not training checkpoints at all."""
    checks = []
    for path in paths:
        try:
            checks.append(check_checkpoint(path))
        except InputDataError:  # refused or foreign: never a resume point
            continue
    return checks


def choose_resume_checkpoint(folder: Path) -> ResumeChoice:
    """What ``--ckpt_path last`` resumes from in the checkpoint folder ``folder``.

    The newest intact ``last*.ckpt``; else the intact checkpoint of the highest step, with a note;
    else None when the folder holds no checkpoint at all. Raises ``InputDataError`` when it holds only
    damaged ones (naming them), and ``RefusedCheckpointError`` for a file that could run code.
    """
    files = sorted(folder.glob(f"*{CHECKPOINT_SUFFIX}")) if folder.is_dir() else []
    checks = [check_checkpoint(path) for path in files if path.is_file()]
    damaged = tuple(check for check in checks if not check.intact)
    lasts = [check for check in checks if is_last_checkpoint(check.path) and check.intact]
    if lasts:  # Lightning's choice among several last files: the most recently written
        chosen = max(lasts, key=lambda check: check.path.stat().st_mtime)
        return ResumeChoice(chosen.path, damaged=damaged)
    fallback = newest_intact(checks)
    if fallback is None:
        if damaged:
            raise InputDataError(
                f"No intact checkpoint to resume from in {folder}: " + "; ".join(f"{c.path.name} is {c.damage.reason}" for c in damaged)
                + ". Start the run again without --ckpt_path (it starts from step 0), or give another --ckpt_path."
            )
        return ResumeChoice(None)
    why = "its last checkpoint is damaged" if any(is_last_checkpoint(c.path) for c in damaged) else "it has no last.ckpt"
    note = f"Resuming from {fallback.path} (step {fallback.step}), the newest intact checkpoint in {folder}: {why}."
    return ResumeChoice(fallback.path, note, damaged)


def check_explicit_checkpoint(path: Path, option: str = "--ckpt_path") -> None:
    """Raises ``InputDataError`` naming ``path`` (and the intact checkpoint beside it) unless it can be resumed."""
    if not path.exists():
        raise InputDataError(f"{option} {path} does not exist: give a .ckpt from <run>/checkpoints, or `last`.")
    if path.is_dir():
        raise InputDataError(f"{option} {path} is a folder: give a .ckpt file in it, or `last`.")
    check = check_checkpoint(path)
    if check.intact:
        return
    others = readable_checks([p for p in sorted(path.parent.glob(f"*{CHECKPOINT_SUFFIX}")) if p.is_file() and p != path])
    intact = newest_intact(others)
    fix = (f"resume from {intact.path} (step {intact.step}), the newest intact checkpoint beside it: {option} {intact.path}"
           if intact else "no intact checkpoint is beside it: start the run again without --ckpt_path")
    raise InputDataError(f"{option} {path} is damaged ({check.damage.reason}): {fix}.")
