"""Checkpoint files written atomically in their own folder, and read back without running code.

Lightning's ``TorchCheckpointIO`` serialises into memory and lets fsspec move a temporary file into
place; when ``$TMPDIR`` is on another filesystem that move is a copy straight into ``last.ckpt``, so
a kill or a full disk during it destroyed the previous good checkpoint. ``AtomicCheckpointIO`` streams
into a uniquely named sibling (the project's partial-file naming, so start-up cleanup finds it),
flushes it, renames it over the target and flushes the folder: a checkpoint's final name only ever
holds a complete file. It also loads every checkpoint with ``weights_only=True``: a checkpoint is a
file a user can pass, and unpickling one with ``weights_only=False`` can run any code it carries.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from pdm_lightning.core.atomic import TMP_PREFIX, TMP_SUFFIX, default_file_mode, fsync_directory
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.data.masks import MaskSettings
from pdm_lightning.evaluation.settings import EvaluationSettings
from pdm_lightning.generation.settings import PredictSettings
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.prepare.class_images import ClassImageGeneration
from pdm_lightning.training.lora import LoraSettings
from pdm_lightning.training.nonfinite import NonFiniteSettings
from pdm_lightning.training.optim import OptimizerConfig

# The only classes (besides tensors and plain Python values) a pdm_lightning checkpoint may hold: the
# settings records of the module's and data module's hyper-parameters. The CLI stores them as dicts,
# but a module built in Python keeps the records themselves. They are plain dataclasses of strings,
# numbers and lists, so rebuilding one runs no code. One list, registered once for every torch.load.
CHECKPOINT_SAFE_GLOBALS: list[type] = [
    ClassImageGeneration,
    EvaluationSettings,
    LoraSettings,
    MaskSettings,
    ModelSource,
    NonFiniteSettings,
    OptimizerConfig,
    PDMSettings,
    PredictSettings,
]
torch.serialization.add_safe_globals(CHECKPOINT_SAFE_GLOBALS)

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_MB = 2**20


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the message names the file and the free space left beside it."""


class RefusedCheckpointError(InputDataError):
    """A file that holds objects other than tensors and pdm_lightning settings: loading it could run code."""


@dataclass(frozen=True)
class Damage:
    """Why a file is not a complete checkpoint; ``interrupted``: empty or cut short, a write that never finished."""

    reason: str
    interrupted: bool


class DamagedCheckpointError(InputDataError):
    """A file that is not a complete checkpoint (empty, cut short, not a torch zip archive, unreadable)."""

    def __init__(self, path: Path, damage: Damage) -> None:
        super().__init__(f"{path} is damaged: {damage.reason}.")
        self.damage = damage


def free_megabytes(folder: Path) -> int | None:
    """Free space in ``folder``'s filesystem, in MB (None when it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free // _MB
    except OSError:
        return None


def write_error(error: OSError, path: Path) -> CheckpointWriteError:
    """``error`` restated with the checkpoint's path, the free space and what to do."""
    free = free_megabytes(path.parent)
    space = f"{free} MB free" if free is not None else "free space unknown"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        message = f"No space left writing {path} ({space}): free space or move the run (--trainer.logger.init_args.save_dir)"
    else:
        message = f"Could not write checkpoint {path}: {error.strerror or error} ({space})"
    return CheckpointWriteError(error.errno, message)


def write_file_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Streams ``write``'s bytes into a unique sibling of ``path``, flushes it, renames it over ``path``.

    Streaming (not an in-memory copy first): a full fine-tune's checkpoint with its optimizer states
    is several times the model's size. An exception of any kind (a full disk, Ctrl-C) removes the
    temporary file and leaves whatever ``path`` held before; a kill leaves it for the next run's
    start-up cleanup (``remove_stale_checkpoint_writes``).
    """
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), default_file_mode())  # mkstemp makes 0600 files; checkpoints follow the umask
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_checkpoint_writes(folder: Path) -> list[Path]:
    """Deletes the temporary files of checkpoint writes killed in ``folder``; returns them.

    Only this project's partial-file names are touched: another program's files are not ours to delete.
    """
    stale = sorted(folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def refused_global(error: BaseException) -> str | None:
    """The name of the global a weights-only load refused (``posix.system``), or None for other errors."""
    match = _REFUSED_GLOBAL.search(str(error))
    return match.group(1) if match else None


def damage_of(path: Path) -> Damage | None:
    """Why ``path`` cannot be a complete checkpoint, read from its size and zip structure alone (cheap)."""
    size = path.stat().st_size
    if size == 0:
        return Damage("empty (0 bytes)", interrupted=True)
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as handle:
        started_as_zip = handle.read(4) == b"PK\x03\x04"
    if started_as_zip:
        return Damage(f"cut short ({size} bytes, no zip directory at its end: the write was interrupted)", interrupted=True)
    return Damage(f"not a torch checkpoint ({size} bytes, not a zip archive)", interrupted=False)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``, its failures restated in one line naming the file.

    Raises ``DamagedCheckpointError`` for a file that is empty, cut short or otherwise unreadable, and
    ``RefusedCheckpointError`` for one that holds anything other than tensors, plain values and the
    settings records of ``CHECKPOINT_SAFE_GLOBALS`` (nothing in it is run).
    """
    path = Path(path)
    damage = damage_of(path)
    if damage:
        raise DamagedCheckpointError(path, damage)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
        refused = refused_global(error)
        if refused:
            raise RefusedCheckpointError(
                f"{path} was refused: it holds {refused}, which is neither a tensor nor a pdm_lightning setting, "
                "so it was not written by pdm_lightning and loading it could run code. Use a checkpoint written by train.py."
            ) from error
        reason = f"unreadable ({type(error).__name__}: {error_summary(error)})"
        raise DamagedCheckpointError(path, Damage(reason, interrupted=False)) from error


def error_summary(error: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only errors open with a paragraph of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "no message"
    if lines[0].startswith("Weights only load failed"):
        details = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
                   if line.startswith(("Unsupported", "WeightsUnpickler error:", "Trying to load"))]
        return next((detail for detail in details if detail), lines[-1])[:200]
    return lines[0][:200]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and whose reads never run code.

    ``train.py`` installs it for every strategy (it becomes ``trainer.strategy.checkpoint_io``).
    Remote paths (``s3://``, ...) keep Lightning's fsspec write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_protocol(str(path)) not in ("file", "local"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(target, lambda handle: torch.save(checkpoint, handle))
        except OSError as error:
            raise write_error(error, target) from error

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Loads with ``weights_only=True`` whatever the caller asked: these files come from users."""
        if get_protocol(str(path)) not in ("file", "local"):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        local = Path(str(path).removeprefix("file://"))
        if not local.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(local, map_location=map_location)
