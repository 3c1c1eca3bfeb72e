"""What one benchmark case measures, the same way for every case: step times, peak memory, FLOPs per step.

Peak memory on the CPU is the process's resident-set high-water mark: the case resets it (``/proc/self/clear_refs``)
when training starts and reads ``VmHWM`` at the end, so model loading and the bank build before training are not
counted; where the reset is refused it falls back to ``ru_maxrss`` (the whole process lifetime, said so in the
result). On CUDA it is ``torch.cuda.max_memory_allocated`` since training started.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so a wall-clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """The peak memory of this process from ``reset()`` on (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_lifetime"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            self.kind = "rss_since_training_start"
        except OSError:
            self.kind = "rss_lifetime"

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated; CPU: the resident set)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def read(self) -> int:
        """Bytes."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "rss_since_training_start":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class StepClock:
    """Wall-clock time at the end of each step; a step's time is the gap since the previous step's end.

    The gap holds everything a training loop does per step (data loading, the step, logging), so the same
    clock fits our Lightning run and the plain loop alike. Needs at least one warm-up step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def tick(self) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())

    def step_seconds(self, warmup: int, steps: int) -> list[float]:
        """Seconds of steps ``warmup`` .. ``warmup + steps - 1`` (0-based)."""
        if warmup < 1:
            raise ValueError("StepClock needs at least one warm-up step (a step's time is measured from the previous one's end).")
        ends = self.ends[warmup - 1 : warmup + steps]
        return [later - earlier for earlier, later in zip(ends, ends[1:])]


class FlopCount:
    """FLOPs of one training step (forward and backward) with ``torch.utils.flop_counter.FlopCounterMode``.

    Counted on an extra, untimed step (the counter slows every op down). Compiled modules run eagerly while
    counting (``torch.compiler.set_stance("force_eager")``): the same math, counted op by op.
    """

    def __init__(self) -> None:
        self.total: int | None = None
        self._stack: contextlib.ExitStack | None = None
        self._counter = None

    def start(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._stack = contextlib.ExitStack()
        if hasattr(torch.compiler, "set_stance"):
            self._stack.enter_context(torch.compiler.set_stance("force_eager"))
        self._counter = self._stack.enter_context(FlopCounterMode(display=False))

    def stop(self) -> None:
        if self._stack is None:
            return
        self._stack.close()
        self.total = int(self._counter.get_total_flops())
        self._stack = self._counter = None

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def step_result(
    clock: StepClock, warmup: int, steps: int, peak_memory_bytes: int, memory: PeakMemory, flops: FlopCount
) -> dict[str, object]:
    """The figures every training case reports (a case adds its own); ``peak_memory_bytes`` as the case read it at
    the end of its timed steps, before anything else (the FLOP-counting step) ran."""
    seconds = clock.step_seconds(warmup, steps)
    return {
        "ms_per_step": median_ms(seconds),
        "step_ms": [s * 1e3 for s in seconds],
        "peak_memory_bytes": peak_memory_bytes,
        "memory_kind": memory.kind,
        "flops_per_step": flops.total,
    }
