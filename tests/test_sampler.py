"""The resumable sampler and DataLoader: epoch order from (seed, epoch), exact mid-epoch continuation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pdm_lightning.data.sampler import ResumableDataLoader, ResumableSampler
from pdm_lightning.core.seeding import derive_seed, seed_global_rng


class Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, crop_seed = key
        return torch.tensor([index, crop_seed % 1000])


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, i) for i in range(100)} | {derive_seed(1, i) for i in range(100)}) == 200
    assert 0 <= derive_seed(5, 6) < 2**63


def test_order_depends_on_seed_and_epoch() -> None:
    sampler = ResumableSampler(Indices(10), seed=1)
    epoch0 = [i for i, _ in sampler]
    sampler.set_epoch(1)
    epoch1 = [i for i, _ in sampler]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    again = ResumableSampler(Indices(10), seed=1)
    assert [i for i, _ in again] == epoch0


def test_ranks_split_the_epoch() -> None:
    ranks = [[i for i, _ in ResumableSampler(Indices(9), num_replicas=3, rank=r, seed=0)] for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(9))


def test_skip_next_continues_the_epoch() -> None:
    full = list(ResumableSampler(Indices(10), seed=2))
    sampler = ResumableSampler(Indices(10), seed=2)
    sampler.skip_next(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to one iteration only


def test_loader_resumes_mid_epoch_with_the_same_batches() -> None:
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(Indices(10), sampler=ResumableSampler(Indices(10), seed=3), batch_size=2)

    reference = loader()
    reference.sampler.set_epoch(1)
    expected = [batch.tolist() for batch in reference]

    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [batch.tolist() for batch in resumed] == expected
    assert [batch.tolist() for batch in resumed] == expected  # the next epoch-1 pass starts at its beginning


def test_state_at_epoch_end_moves_to_next_epoch() -> None:
    resumed = ResumableDataLoader(Indices(4), sampler=ResumableSampler(Indices(4), seed=0), batch_size=2)
    resumed.load_state_dict({"epoch": 0, "batches_done": 2})
    assert resumed.sampler.epoch == 1
    assert len(list(resumed)) == 2


def test_step_seeding_matches_torch_manual_seed() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(99)
    seed_global_rng(1234, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)
