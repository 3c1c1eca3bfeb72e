"""Where and with what a benchmark ran (machine, library versions, date), and a GPU's peak bf16 throughput for MFU."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path

LIBRARIES = ("torch", "lightning", "diffusers", "transformers", "peft", "jsonargparse", "xformers", "bitsandbytes")

# Dense BF16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (sparsity not counted). Most specific name first:
# "H100" alone is the SXM part. Anything else needs --peak_tflops.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (what can be allocated without swapping), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def peak_bf16_tflops(name: str | None) -> float | None:
    """The datasheet peak of the GPU called ``name`` (as torch reports it), None when unknown."""
    if not name:
        return None
    for key, tflops in GPU_PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def machine() -> dict[str, object]:
    total = total_memory_bytes()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(total / 2**30, 1) if total else None,
        "gpu": gpu_name(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the figures (absent ones left out)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
