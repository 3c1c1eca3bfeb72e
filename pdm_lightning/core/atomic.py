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


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary sibling, flushes it to disk, then renames it over ``path``."""
    # A unique temporary name: two processes writing the same path never share (or steal) one.
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_directory(destination: Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``destination`` that replaces it when the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        replace_directory(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_safetensors_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Saves to a temporary sibling (the project's partial-file naming), flushes it, renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}{TMP_SUFFIX}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
