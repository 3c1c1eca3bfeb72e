"""An export is a set: the files of one export, of one step, switched into place together.

Every file of an export (pipeline folder, single file, LoRA folder, kohya file) is written into ONE
staging folder beside the set's place, checked there, described by ``manifest.json`` and then
switched into place with one rename. A reader (or a run killed at any moment) sees the previous
complete set or the new complete set, never the step-14 pipeline beside the step-12 single file.

``manifest.json``::

    {"format": "pdm_lightning-export", "version": 1, "step": 14,
     "config_hash": "<sha256 of the model's and data module's settings>",
     "files": {"pipeline/unet/diffusion_pytorch_model.safetensors": {"size": 1234, "sha256": "..."}, ...}}

``check_export_set`` verifies a set against its manifest (every file present with its size and
sha256, nothing else); the export's load-back verification runs it before the switch.

The switch is ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it (Linux: ext4, xfs, btrfs,
tmpfs): the old and new set trade places in one step, then the old one is deleted. Elsewhere the old
set is renamed aside first (``.<name>.export-old-*``); a kill between the two renames leaves no set
in place, and the next start-up (``remove_set_leftovers``) moves the old one back.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from pdm_lightning.core.atomic import TMP_PREFIX, TMP_SUFFIX, apply_default_modes, fsync_directory, write_bytes_atomically

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pdm_lightning-export"
MANIFEST_VERSION = 1
STAGING_TAG = ".export-staging-"  # .<name>.export-staging-XXXX: a set being written
OLD_TAG = ".export-old-"  # .<name>.export-old-XXXX: the previous set, moved aside during a two-rename switch
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


class ExportSetError(RuntimeError):
    """A folder is not the complete, unaltered export set its manifest describes."""


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class ExportManifest:
    step: int | None
    config_hash: str
    files: dict[str, FileRecord]  # path relative to the set's folder (with "/") -> size and hash

    def to_json(self) -> str:
        document = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": self.step,
            "config_hash": self.config_hash,
            "files": {name: asdict(record) for name, record in sorted(self.files.items())},
        }
        return json.dumps(document, indent=1) + "\n"


def config_hash(settings: Mapping[str, Any]) -> str:
    """sha256 of ``settings`` as sorted JSON (dataclasses as dicts, anything else as its string)."""
    text = json.dumps(settings, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def file_record(path: Path) -> FileRecord:
    """Size and sha256 of a file, which is also flushed to disk (the set must survive a power loss once switched)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        os.fsync(handle.fileno())
    return FileRecord(path.stat().st_size, digest)


def set_files(folder: Path) -> list[str]:
    """Every file of the set under ``folder`` (relative, "/"-separated), the manifest excluded."""
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_NAME
    )


def write_manifest(folder: Path, step: int | None, settings_hash: str) -> ExportManifest:
    """Hashes every file under ``folder`` and writes ``manifest.json`` beside them."""
    manifest = ExportManifest(step, settings_hash, {name: file_record(folder / name) for name in set_files(folder)})
    for sub in sorted({(folder / name).parent for name in manifest.files}):
        fsync_directory(sub)
    write_bytes_atomically(folder / MANIFEST_NAME, manifest.to_json().encode())
    return manifest


def read_manifest(folder: Path) -> ExportManifest:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportSetError(
            f"{folder} has no {MANIFEST_NAME}: it is not a complete export set (written by an older version, "
            "or not an export folder)."
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        files = {name: FileRecord(int(record["size"]), str(record["sha256"])) for name, record in document["files"].items()}
        return ExportManifest(document.get("step"), str(document.get("config_hash", "")), files)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ExportSetError(f"{path} is not a readable export manifest: {error}") from error


def check_export_set(folder: Path) -> ExportManifest:
    """The files under ``folder`` are exactly those of its manifest, each with its size and sha256.

    Raises ExportSetError naming every missing, unlisted, resized or altered file.
    """
    manifest = read_manifest(folder)
    present = set(set_files(folder))
    problems = [f"missing {name}" for name in sorted(manifest.files.keys() - present)]
    problems += [f"not part of the set: {name}" for name in sorted(present - manifest.files.keys())]
    for name in sorted(manifest.files.keys() & present):
        want, path = manifest.files[name], folder / name
        if path.stat().st_size != want.size:
            problems.append(f"{name} is {path.stat().st_size} bytes, the manifest says {want.size}")
        elif file_record(path).sha256 != want.sha256:
            problems.append(f"{name} does not match its sha256 in the manifest")
    if problems:
        raise ExportSetError(f"{folder} is not the export set of step {manifest.step} its manifest describes: " + "; ".join(problems) + ".")
    return manifest


@contextmanager
def staged_set(destination: Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``destination``; when the block succeeds, it becomes ``destination``.

    On any failure (or KeyboardInterrupt) the staging folder is deleted and ``destination`` is untouched.
    A hard kill leaves the staging folder, which ``remove_set_leftovers`` deletes at the next start-up.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}{STAGING_TAG}", dir=destination.parent))
    try:
        yield staging
        apply_default_modes(staging)  # mkdtemp makes 0700 folders, safetensors (save_pretrained) 0600 files
        switch_into_place(staging, destination)
    finally:
        # After an exchange ``staging`` holds the previous set.
        shutil.rmtree(staging, ignore_errors=True)


def switch_into_place(staging: Path, destination: Path) -> None:
    """Puts the complete set ``staging`` at ``destination`` with one rename; a previous set ends up at ``staging``."""
    if not destination.exists():
        os.rename(staging, destination)
    elif not _exchange(staging, destination):
        old = destination.with_name(f".{destination.name}{OLD_TAG}{staging.name.rsplit(STAGING_TAG, 1)[-1]}")
        os.rename(destination, old)  # the kill window: no set in place; remove_set_leftovers moves `old` back
        os.rename(staging, destination)
        os.rename(old, staging)
    fsync_directory(destination.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the filesystem (e.g. some network filesystems) cannot exchange
    raise OSError(code, f"cannot switch the export set {first} into {second}: {os.strerror(code)}")


def remove_set_leftovers(parent: Path) -> list[str]:
    """Deletes the staging folders that killed exports left in ``parent`` and restores a set a kill left aside.

    Returns one line per action, for the log.
    """
    actions = []
    if not parent.is_dir():
        return actions
    for old in sorted(parent.glob(f".*{OLD_TAG}*")):
        name = old.name[1:].rsplit(OLD_TAG, 1)[0]
        if not (parent / name).exists():
            os.rename(old, parent / name)
            actions.append(f"restored the previous export set {parent / name} (a switch was interrupted)")
        else:
            shutil.rmtree(old)
            actions.append(f"removed {old}")
    for staging in sorted(parent.glob(f".*{STAGING_TAG}*")):
        shutil.rmtree(staging)
        actions.append(f"removed the unfinished export {staging}")
    return actions


def remove_partial_outputs(folder: Path, names: Iterable[str]) -> list[str]:
    """Deletes what killed writes of single outputs left inside an export folder (versions before export sets):
    ``.<name>.XXXX/`` staging folders and ``.<name>.old/`` of the folders ``names``, and partial files."""
    actions = []
    if not folder.is_dir():
        return actions
    for name in names:
        for leftover in sorted(folder.glob(f".{name}.*")):
            if leftover.is_dir():
                shutil.rmtree(leftover)
                actions.append(f"removed the unfinished export {leftover}")
    for partial in sorted(folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}")):
        partial.unlink()
        actions.append(f"removed the partial file {partial}")
    return actions
