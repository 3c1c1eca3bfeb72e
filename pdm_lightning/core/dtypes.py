"""The dtype names used in every option (one spelling), and the dtype a Trainer precision computes in."""

from __future__ import annotations

from typing import Literal

import torch

DTypeName = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype the Trainer's precision setting computes in (frozen parts are stored in it)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def auto_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name``'s dtype; ``auto`` is float16 on CUDA and float32 elsewhere (CPUs compute half precision slowly)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
