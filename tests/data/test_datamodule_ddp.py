"""CM3LeonDataModule on several ranks, simulated in threads: each rank resumes mid-epoch from its own position.

Lightning writes global rank zero's checkpoint only and every rank resumes from it; rank zero's worker positions
(``cursors``) are not another rank's when its windows hold other numbers of samples or it skipped other samples.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from cm3leon_lightning.data import CM3LeonDataModule

WORLD = 2


class FakeGather:
    """``torch.distributed.all_gather_object`` for ranks run as threads (the rank is a thread-local)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.barrier = threading.Barrier(WORLD)
        self.slots: list = [None] * WORLD

    def __call__(self, out: list, obj) -> None:
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out[:] = list(self.slots)
        self.barrier.wait()


@pytest.fixture
def gather(monkeypatch: pytest.MonkeyPatch) -> FakeGather:
    fake = FakeGather()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: getattr(fake.local, "rank", 0))
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake)
    return fake


def make_dm(root: Path, rank: int, **kw) -> CM3LeonDataModule:
    args = dict(train_data=str(root), seq_len=64, batch_size=2, num_workers=0, max_skip_share=1.0, shuffle_shards=1)
    dm = CM3LeonDataModule(**{**args, **kw})
    dm._rank = lambda: (rank, WORLD)  # what the trainer reports on that rank
    return dm


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for row in b["keys"] for k in row]


def on_ranks(fn, gather: FakeGather) -> list:
    """Run ``fn(rank)`` on every rank at once (their collectives meet); returns the results by rank."""
    results: list = [None] * WORLD
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        gather.local.rank = rank
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)
            gather.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_resumes_mid_epoch_from_its_own_position(tiny_dataset: Path, gather: FakeGather, workers: int):
    """Every rank loaded rank zero's cursors: with 22 samples in shards of 4 the ranks' windows differ, and rank 1
    read doc-0000 a second time after the resume (workers 0)."""
    kw = dict(num_workers=workers)
    full = [make_dm(tiny_dataset, r, **kw) for r in range(WORLD)]
    expected = [keys_of(list(dm.train_dataloader())) for dm in full]
    assert sorted(expected[0] + expected[1]) == sorted(f"doc-{i:04d}" for i in range(22))

    def head(rank: int) -> tuple[list[dict], dict]:
        dm = make_dm(tiny_dataset, rank, **kw)
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(3)]
        return batches, dm.state_dict()  # a collective, as when Lightning checkpoints

    heads = on_ranks(head, gather)
    saved = json.loads(json.dumps(heads[0][1]))  # Lightning writes rank zero's checkpoint only
    for rank in range(WORLD):
        resumed = make_dm(tiny_dataset, rank, **kw)
        resumed.load_state_dict(saved)
        got = keys_of(heads[rank][0]) + keys_of(list(resumed.train_dataloader()))
        assert got == expected[rank]
        assert resumed.data_counts == full[rank].data_counts
    assert saved["batch"] == 3 and saved["ranks"][0]["cursors"] != saved["ranks"][1]["cursors"]


def test_a_mid_epoch_position_of_one_rank_resumes_on_several_with_a_warning(tiny_dataset: Path) -> None:
    """A checkpoint of an earlier version (rank zero's positions only) still resumes, as those versions did: a run
    shorter than an epoch has no other checkpoint to resume from."""
    dm = make_dm(tiny_dataset, 0)
    it = iter(dm.train_dataloader())
    next(it)
    state = dm.state_dict()  # torch.distributed not initialised: this rank's position only
    assert "ranks" not in state
    other = make_dm(tiny_dataset, 1).train_dataloader()
    with pytest.warns(UserWarning, match="from a data position that holds rank zero's worker positions only"):
        other.load_state_dict(state)
    assert (other.epoch, other.start) == (state["epoch"], state["batch"])
    boundary = make_dm(tiny_dataset, 1)  # an epoch's end holds no worker positions: fine
    boundary.load_state_dict({**state, "batch": 0, "epoch": 1, "cursors": {}})
    assert boundary.train_dataloader().epoch == 1


def test_a_loader_built_for_one_rank_refuses_to_run_on_two(tiny_dataset: Path, gather: FakeGather) -> None:
    """A training loader built before the trainer was attached (rank 0 of 1) was kept under DDP: every rank read
    every sample."""
    dm = CM3LeonDataModule(train_data=str(tiny_dataset), seq_len=64, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match=r"built for 1 rank\(s\) but 2 processes run"):
        next(iter(dm.train_dataloader()))
