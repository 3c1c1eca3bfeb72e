"""Waiting for every rank of a split preparation, and collecting what each one did.

Each DDP rank builds its share of the class images and of the PDM bank, then every rank waits for
all the others at one barrier before training opens the files: ``all_gather`` of the ranks' reports
is that barrier (and gives rank 0 every rank's figures to print). It runs on its own gloo group
without a timeout, created before the work starts while the ranks are still in step (Lightning does
the same around ``prepare_data``): the default group's timeout (30 minutes) could run out while one
rank finishes a long share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

_NO_TIMEOUT = timedelta(days=10000)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RankGather:
    """``gather(value)``: the ``value`` of every rank, in rank order, once every rank has given its own."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def gather(self, value: Any) -> list[Any]:
        if self.group is None:
            return [value]
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, value, group=self.group)
        return values


@contextmanager
def every_rank() -> Iterator[RankGather]:
    """A ``RankGather`` over every process of the run (a single process: its own value only).

    Enter it before the long work, on every rank at the same point; leave it after ``gather``.
    """
    if not is_distributed():
        yield RankGather()
        return
    group = dist.new_group(backend="gloo", timeout=_NO_TIMEOUT)
    try:
        yield RankGather(group)
    finally:
        dist.destroy_process_group(group)
