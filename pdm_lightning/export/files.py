"""Writing a safetensors file atomically, streamed to disk (no second in-memory copy of a 4 GB model)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdm_lightning.atomic import TMP_PREFIX, TMP_SUFFIX


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
