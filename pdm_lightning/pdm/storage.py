"""Writing a safetensors file row by row: preallocated on disk, filled at offsets, renamed when complete.

A bank row (one timestep of one image) goes straight from the device to its place in the file, so
neither device nor host memory grows with the number of timesteps. Readers only ever see finished
files: rows go to a hidden ``.partial`` sibling named after this host and process, which is renamed
over the final name at the end.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from pdm_lightning.core.atomic import TMP_PREFIX, TMP_SUFFIX

SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int32: "I32",
    torch.int64: "I64",
}
_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def _host_tag() -> str:
    # No dots, so the partial file's name splits back into (name, host, pid) unambiguously.
    return socket.gethostname().replace(".", "_") or "host"


def partial_path(path: Path) -> Path:
    """The hidden temporary sibling of ``path`` owned by this process."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{_host_tag()}.{os.getpid()}{TMP_SUFFIX}")


def remove_dead_partials(folder: Path) -> list[Path]:
    """Deletes partial files left by processes of this host that no longer run; returns them.

    Partials of live processes (another rank extracting now) and of other hosts are left alone.
    """
    removed = []
    host = _host_tag()
    for path in folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        parts = path.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        if not _process_alive(int(parts[2])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier, interrupted build in this process) are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, tensor name -> {dtype, shape, data_offsets}) of a safetensors file, from its header only.

    Raises ValueError when the header is not a safetensors header (a truncated or overwritten file).
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > path.stat().st_size - 8:
            raise ValueError(f"header length {length} exceeds the file")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise ValueError(f"header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + length, header


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (only its header is read)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


class PreallocatedSafetensors:
    """A safetensors file of known tensor shapes whose data is written piecewise, then committed.

    Args:
        path: the final file name; data goes to ``partial_path(path)`` until ``commit``.
        tensors: name -> (dtype, shape), in file order.
        metadata: string settings stored in the header.
    """

    def __init__(
        self, path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.path = path
        self.partial = partial_path(path)
        self.shapes = {name: tuple(shape) for name, (_, shape) in tensors.items()}
        self.dtypes = {name: dtype for name, (dtype, _) in tensors.items()}
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, int] = {}
        position = 0
        for name, (dtype, shape) in tensors.items():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [position, position + size]}
            self.offsets[name] = position
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
        self.data_start = 8 + len(encoded)
        self.total_size = self.data_start + position
        self._file = open(self.partial, "wb")  # noqa: SIM115 - closed in commit / discard
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self.total_size)  # sparse until written

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> int:
        """Writes the whole tensor ``name``, or its row ``row`` (a tensor of shape shape[1:]); returns the bytes' crc32."""
        shape = self.shapes[name] if row is None else self.shapes[name][1:]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu", dtype=self.dtypes[name]).contiguous().view(torch.uint8).numpy()
        offset = self.data_start + self.offsets[name] + (0 if row is None else row * data.nbytes)
        self._file.seek(offset)
        self._file.write(data.data)  # the array's own buffer: no copy
        return zlib.crc32(data)  # of exactly the bytes on disk, so a reader can verify them (pdm.integrity)

    def commit(self) -> Path:
        """Flushes to disk and renames the partial file to its final name."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path

    def discard(self) -> None:
        """Closes and deletes the partial file (after an error or interruption)."""
        if not self._file.closed:
            self._file.close()
        self.partial.unlink(missing_ok=True)
