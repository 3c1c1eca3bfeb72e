"""Writing outputs so that a reader (or an interrupted run) never sees a half-written file or folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

TMP_PREFIX = ".pdm_lightning-"
TMP_SUFFIX = ".partial"


def default_file_mode() -> int:
    """The mode a plain ``open`` would give a new file under the process umask (0644 with umask 022)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the process umask (0755 with umask 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # os.umask can only be read by setting it: set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(folder: Path) -> None:
    """Gives ``folder`` and everything in it the umask's modes (libraries such as safetensors write 0600 files)."""
    folder.chmod(default_dir_mode())
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(default_dir_mode() if path.is_dir() else default_file_mode())


def fsync_directory(folder: Path) -> None:
    """Flushes a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary sibling, flushes it to disk, then renames it over ``path``."""
    # A unique temporary name: two processes writing the same path never share (or steal) one.
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files: outputs follow the umask like any file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_partials(folder: Path) -> None:
    """Deletes this project's own half-written files left in ``folder`` by an interrupted run."""
    for stale in folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        stale.unlink()


def replace_directory(source: Path, destination: Path) -> None:
    """Moves ``source`` to ``destination``, replacing an existing folder with one rename.

    The old folder is moved aside first and only deleted once the new one is in place.
    """
    old = destination.with_name(f".{destination.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(source, destination)
    fsync_directory(destination.parent)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``destination`` that replaces it when the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        apply_default_modes(staging)  # mkdtemp makes 0700 folders, safetensors 0600 files
        replace_directory(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_safetensors_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Saves to a unique temporary sibling (the project's partial-file naming), flushes it, renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(tensors, tmp, metadata=metadata)
        tmp.chmod(default_file_mode())  # safetensors writes 0600 files
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
