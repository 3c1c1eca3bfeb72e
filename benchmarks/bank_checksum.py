"""What checking a PDM bank file's data costs at SD1.5 size: whole-file hashes against per-row crc32.

    python benchmarks/bank_checksum.py                       # one faithful SD1.5 file: 1000 x 4096 x 320 float16, 2.6 GB
    python benchmarks/bank_checksum.py --rows 50 --dir /fast/disk

Writes one synthetic bank file of that shape with the real writer (pdm.integrity.ChecksummedSafetensors:
random rows, a crc32 per row) into a temporary folder under ``--dir``, then times
- whole-file hashing (sha256, blake2b, zlib crc32 and adler32, xxhash when installed), from the page cache
  and, where the kernel lets a process drop a file's cached pages (posix_fadvise), from the disk;
- ``find_damage``: what reusing a cached file costs (every row read and checked), warm and cold;
- one row: each checksum over one 2.6 MB row in memory, and a training read of one random row through
  QueryBank with its check against a read without it.
Prints MB/s and seconds per photo (one file per photo). The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pdm_lightning.pdm.bank import QueryBank  # noqa: E402
from pdm_lightning.pdm.integrity import ChecksummedSafetensors, find_damage  # noqa: E402

CHUNK = 16 << 20


def hashers() -> dict[str, Callable[[], object]]:
    """Whole-file hash constructors: hashlib's, zlib's running checksums wrapped alike, xxhash if installed."""
    found: dict[str, Callable[[], object]] = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    found["crc32"] = lambda: RunningChecksum(zlib.crc32)
    found["adler32"] = lambda: RunningChecksum(zlib.adler32, start=1)
    try:
        import xxhash  # not a dependency: measured only where it happens to be installed

        found["xxh3_64"] = xxhash.xxh3_64
    except ImportError:
        pass
    return found


class RunningChecksum:
    """zlib's crc32/adler32 with hashlib's update() interface."""

    def __init__(self, function: Callable[[bytes, int], int], start: int = 0) -> None:
        self.function, self.value = function, start

    def update(self, data: memoryview) -> None:
        self.value = self.function(data, self.value)


def write_bank(path: Path, rows: int, tokens: int, dim: int) -> float:
    """A bank file of ``rows`` random float16 rows written row by row as extraction does; returns seconds."""
    tensors = {"timesteps": (torch.int64, (rows,)), "queries": (torch.float16, (rows, tokens, dim))}
    writer = ChecksummedSafetensors(path, tensors, {"format": "benchmark"})
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for row in range(rows):
        writer.write("queries", torch.randn(tokens, dim, generator=generator).half(), row=row)
    writer.write("timesteps", torch.arange(rows))
    writer.commit()
    return time.perf_counter() - start


def drop_from_page_cache(path: Path) -> bool:
    """Asks the kernel to forget the file's cached pages (clean after the writer's fsync); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def hash_file(path: Path, make: Callable[[], object]) -> float:
    digest = make()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while count := handle.readinto(view):
            digest.update(view[:count])
    return time.perf_counter() - start


def timed(function: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(label: str, seconds: float, megabytes: float, per_photo: float | None = None) -> None:
    photo = f", {per_photo:.2f} s per photo" if per_photo is not None else ""
    print(f"  {label:<44} {seconds * 1e3:9.2f} ms  {megabytes / seconds:8.0f} MB/s{photo}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="timesteps per photo (1000: the faithful bank)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of a row (SD1.5 at 512 px: 4096)")
    parser.add_argument("--dim", type=int, default=320, help="query width (SD1.5's PDM layer: 320)")
    parser.add_argument("--dir", default=None, help="where to write the file (default: the temp folder)")
    parser.add_argument("--row_reads", type=int, default=200, help="random rows read for the per-row figures")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while writing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bank.safetensors"
        write_seconds = write_bank(path, args.rows, args.tokens, args.dim)
        size_mb = path.stat().st_size / 1e6
        row_mb = args.tokens * args.dim * 2 / 1e6
        print(f"bank file [{args.rows}, {args.tokens}, {args.dim}] float16: {size_mb:.0f} MB ({row_mb:.2f} MB per row), "
              f"written with per-row crc32 in {write_seconds:.1f} s (random rows included)")

        print("whole file, from the page cache (read + hash):")
        for name, make in hashers().items():
            hash_file(path, make)  # warms the cache
            seconds = hash_file(path, make)
            report(name, seconds, size_mb, seconds)
        seconds = timed(lambda: find_damage(path), 1)
        report("find_damage (every row's crc32)", seconds, size_mb, seconds)

        if drop_from_page_cache(path):
            print("whole file, from the disk (page cache dropped with posix_fadvise before each):")
            for name in ("sha256", "crc32"):
                drop_from_page_cache(path)
                seconds = hash_file(path, hashers()[name])
                report(name, seconds, size_mb, seconds)
            drop_from_page_cache(path)
            start = time.perf_counter()
            find_damage(path)
            seconds = time.perf_counter() - start
            report("find_damage (every row's crc32)", seconds, size_mb, seconds)

        print("one row (in memory):")
        row = torch.randn(args.tokens, args.dim).half().numpy()
        for name, function in {
            "crc32": lambda: zlib.crc32(row),
            "adler32": lambda: zlib.adler32(row),
            "sha256": lambda: hashlib.sha256(row).digest(),
            "blake2b": lambda: hashlib.blake2b(row).digest(),
        }.items():
            report(name, timed(function, 50), row_mb)

        print(f"one training read of a random row through QueryBank (median of {args.row_reads}, page cache warm):")
        bank = QueryBank([path])
        handle = bank._handle(0)
        rng = random.Random(0)
        rows = [rng.randrange(args.rows) for _ in range(args.row_reads)]
        # The slice is a lazy view of the mapped file: stacking it (as QueryBank does) is what reads the pages.
        plain = statistics.median(timed(lambda r=r: torch.stack([handle.get_slice("queries")[r]]), 1) for r in rows)
        checked = statistics.median(timed(lambda r=r: bank.queries(torch.tensor([0]), torch.tensor([r])), 1) for r in rows)
        report("read (torch.stack of the mapped row)", plain, row_mb)
        report("read + crc32 check (QueryBank.queries)", checked, row_mb)
        print(f"  the check adds {(checked - plain) * 1e3:.2f} ms per row read")


if __name__ == "__main__":
    main()
