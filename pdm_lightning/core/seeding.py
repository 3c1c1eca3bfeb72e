"""Seeds derived from tuples of integers, so that every random draw is a pure function of its position."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a step on ``device`` draws from: the CPU's, and on a GPU the CUDA
    ones. ``torch.manual_seed`` also queues the seed for every backend not started yet (XPU, MTIA, CUDA on a CPU
    run), formatting a stack trace for each: about 1 ms at every step."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    elif device.type == "cuda":
        torch.default_generator.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)
    else:
        torch.manual_seed(seed)
