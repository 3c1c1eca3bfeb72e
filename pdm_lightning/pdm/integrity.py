"""Checksums of the bank files' data, so that damaged bytes are found instead of trained on.

Every data tensor ``T`` of a bank file has an int64 sibling ``T_crc32``: one crc32 per row for a tensor
of two or more dimensions (``queries``, ``latents``: a row is one timestep of one image), one for the
whole tensor otherwise (``timesteps``). The writer computes them from the very bytes it writes.
``find_damage`` checks every row of a file (on reuse, before training); ``check_row`` checks the one row
a training step reads (in the DataLoader), so damage that appears during a run is an error naming the
file and row, never a NaN loss.

Why crc32 per row (``python benchmarks/bank_checksum.py``, docs/pdm.md#integrity): zlib's crc32 is the
fastest checksum the standard library has (2-4 GB/s in memory here, against 1.3-1.8 GB/s for sha256
and under 1 GB/s for blake2b), and it detects any damage of up to 32 bits and all but 2^-32 of larger
ones, which is what a cache needs (whoever can write the cache can also rewrite a cryptographic hash).
A whole-file hash costs the same full read on reuse but cannot check the single row a step reads;
checking one 2.6 MB SD1.5 row adds about 1.5 ms to its read.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.pdm.storage import PreallocatedSafetensors, read_header

CHECKSUM_SUFFIX = "_crc32"
CHECKSUM_DTYPE = torch.int64  # crc32 values are unsigned 32-bit: int64 holds them exactly


class BankDamagedError(InputDataError):
    """A bank file whose bytes no longer match the checksums written with them."""


def checksum(data: torch.Tensor | bytes | memoryview | np.ndarray) -> int:
    """crc32 of a tensor's bytes (as stored: contiguous, native little-endian) or of a buffer."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def checksum_name(name: str) -> str:
    """The tensor holding the checksums of tensor ``name``."""
    return f"{name}{CHECKSUM_SUFFIX}"


def is_checksum(name: str) -> bool:
    return name.endswith(CHECKSUM_SUFFIX)


def checksum_count(shape: Sequence[int]) -> int:
    """How many checksums a tensor of ``shape`` has: one per row from two dimensions on, else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def damage_message(path: Path, problem: str) -> str:
    return (
        f"{path} is damaged ({problem}): its bytes changed after it was written. Delete it and run again: "
        "the bank cache rebuilds it, and `python -m pdm_lightning.features` rebuilds a --model.pdm.features_dir file."
    )


def check_row(path: Path, name: str, row: int, data: torch.Tensor, expected: int, timestep: int) -> None:
    """Raises BankDamagedError naming ``path`` and ``row`` when the row just read fails its checksum."""
    if checksum(data) != expected:
        raise BankDamagedError(damage_message(path, f"row {row} (timestep {timestep}) of {name} fails its checksum"))


def find_damage(path: Path) -> str | None:
    """What is wrong with the data of the bank file ``path`` (every row is read and checked), or None when intact."""
    try:
        data_start, tensors = read_header(path)
        size = path.stat().st_size
    except (OSError, ValueError) as error:
        return f"unreadable: {error}"
    try:
        end = data_start + max(int(info["data_offsets"][1]) for info in tensors.values())
    except (KeyError, TypeError, ValueError, IndexError):
        return "unreadable: the header describes no tensors"
    if size != end:
        return f"{size} bytes where its header describes {end}"
    with open(path, "rb") as handle:
        for name, info in tensors.items():
            if is_checksum(name):
                continue
            sums = tensors.get(checksum_name(name))
            if sums is None:
                return f"no checksum for {name}: written before bank files carried checksums"
            try:
                problem = _tensor_damage(handle, data_start, name, info, sums)
            except (KeyError, TypeError, ValueError) as error:  # a header safetensors itself would refuse
                return f"unreadable: malformed header entry for {name} ({error!r})"
            if problem is not None:
                return problem
    return None


def _tensor_damage(handle, data_start: int, name: str, info: dict, sums: dict) -> str | None:  # noqa: ANN001
    """Checks tensor ``name`` row by row against its checksum tensor ``sums`` (reading sequentially)."""
    count = checksum_count(info["shape"])
    sums_start, sums_end = sums["data_offsets"]
    if sums.get("dtype") != "I64" or sums_end - sums_start != 8 * count:
        return f"the checksums of {name} do not fit its shape"
    handle.seek(data_start + sums_start)
    expected = np.frombuffer(handle.read(8 * count), dtype="<i8")
    start, stop = info["data_offsets"]
    if (stop - start) % count:
        return f"{name} does not split into {count} rows"
    row_bytes = (stop - start) // count
    buffer = bytearray(row_bytes)
    view = memoryview(buffer)
    handle.seek(data_start + start)
    for row in range(count):
        if handle.readinto(view) != row_bytes:
            return f"row {row} of {name} is cut short"
        if zlib.crc32(view) != int(expected[row]):
            return f"row {row} of {name} fails its checksum" if count > 1 else f"{name} fails its checksum"
    return None


def find_damaged(paths: Sequence[Path]) -> dict[Path, str]:
    """``find_damage`` of several files at once (threads: crc32 and reads release the GIL); only damaged ones."""
    paths = list(paths)
    if not paths:
        return {}
    workers = min(len(paths), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(find_damage, paths))
    return {path: problem for path, problem in zip(paths, problems) if problem is not None}


def with_checksums(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The file layout of ``tensors`` plus their checksum tensors.

    The int64 checksums go right after the leading int64 tensors and before the float rows, so they
    stay 8-byte aligned whatever the rows' sizes.
    """
    sums = {checksum_name(name): (CHECKSUM_DTYPE, (checksum_count(shape),)) for name, (_, shape) in tensors.items()}
    leading = {name: spec for name, spec in tensors.items() if spec[0] == torch.int64}
    rest = {name: spec for name, spec in tensors.items() if name not in leading}
    return {**leading, **sums, **rest}


class ChecksummedSafetensors:
    """A bank file being written row by row: each row's crc32 is kept as it is written and stored on commit.

    Args:
        path / metadata: as for ``PreallocatedSafetensors``.
        tensors: the data tensors, name -> (dtype, shape); their checksum tensors are added.
    """

    def __init__(
        self, path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.file = PreallocatedSafetensors(path, with_checksums(tensors), metadata)
        self.path = path
        self.sums = {name: torch.zeros(checksum_count(shape), dtype=CHECKSUM_DTYPE) for name, (_, shape) in tensors.items()}

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> None:
        """Writes tensor ``name`` whole (one checksum) or its row ``row`` (one checksum per row)."""
        if row is None and len(self.sums[name]) > 1:
            raise ValueError(f"{name} is checksummed per row: write it row by row.")
        self.sums[name][0 if row is None else row] = self.file.write(name, tensor, row)

    def commit(self) -> Path:
        for name, sums in self.sums.items():
            self.file.write(checksum_name(name), sums)
        return self.file.commit()

    def discard(self) -> None:
        self.file.discard()
