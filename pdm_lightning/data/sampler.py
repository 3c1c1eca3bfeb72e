"""A sampler and DataLoader that resume mid-epoch exactly where a checkpoint stopped.

A plain DataLoader restarts its epoch when Lightning resumes from a mid-epoch checkpoint, so a
resumed run sees different batches than an uninterrupted one. Here the order of an epoch depends
only on (seed, epoch), the DataLoader records how many batches it has handed to the training loop,
and Lightning saves and restores that through the loader's ``state_dict`` (it treats any loader
with ``state_dict``/``load_state_dict`` as resumable).

The sampler also hands every sample its own crop seed, so random crops are reproducible in any
worker process and on resume, without touching the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pdm_lightning.core.seeding import derive_seed


class ResumableSampler(DistributedSampler):
    """Per-epoch shuffled, rank-sharded indices that can start part-way into an epoch.

    Subclassing DistributedSampler keeps Lightning from wrapping it in its own distributed sampler:
    sharding across ``num_replicas`` ranks is done here. Yields ``(index, crop_seed)`` tuples.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip_samples = 0

    def skip_next(self, num_samples: int) -> None:
        """Makes the next iteration start ``num_samples`` into the current epoch."""
        self._skip_samples = num_samples

    def _epoch_indices(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            indices += (indices * math.ceil(self.total_size / n))[: self.total_size - n]
        return indices

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start, self._skip_samples = self._skip_samples, 0
        indices = self._epoch_indices()
        for position in range(start, self.num_samples):
            global_position = self.rank + position * self.num_replicas
            yield indices[global_position], derive_seed(self.seed, self.epoch, global_position)


class ResumableDataLoader(DataLoader):
    """DataLoader over a ResumableSampler that Lightning can checkpoint and resume mid-epoch.

    Lightning fetches exactly one batch per training step when the loader has a length, so the
    number of batches this loader has yielded is the number the loop has trained on.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches_done = 0
        self._resume_pending = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not self._resume_pending:
            self._batches_done = 0
        self._resume_pending = False
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches_done = int(state["epoch"]), int(state["batches_done"])
        if batches_done >= len(self):  # the checkpoint closed an epoch: the next one starts fresh
            epoch, batches_done = epoch + 1, 0
        # Lightning builds the first iterator before calling set_epoch, so set the epoch now.
        self.sampler.set_epoch(epoch)
        assert self.batch_size is not None
        self.sampler.skip_next(batches_done * self.batch_size)
        self._batches_done = batches_done
        self._resume_pending = True
