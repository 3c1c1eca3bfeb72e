"""An exclusive lock between processes on one file, for read-modify-write of shared index files (manifests)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (created empty if missing) for the block.

    Another process (or rank) taking the same lock waits until this block ends, so a manifest read,
    updated and written back inside it never loses another writer's records. The lock file stays
    (deleting it would let two processes lock different files of the same name). POSIX ``flock``:
    local filesystems and NFSv4.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
