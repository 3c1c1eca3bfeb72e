"""Seeds derived from tuples of integers, so that every random draw is a pure function of its position."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)
