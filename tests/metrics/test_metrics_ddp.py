"""The metrics under a real 2-process gloo group: every rank updates its share and compute() gives the full result,
also when a rank has no captions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CANDS = ["a red square", "a blue circle on grass", "two dogs' toys", "a cat, sitting."]
REFS = [["a red box", "red square"], ["a blue circle"], ["dog toys", "two toys"], ["a cat sits", "the cat."]]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.eval_setup import TinyFeatures, shape_samples

    from cm3leon_lightning.metrics import CIDErD, VQAAccuracy
    from cm3leon_lightning.metrics.fid import load_real_stats, make_fid

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cider = CIDErD(tokenizer="simple")
    cider.update(CANDS[rank::world], REFS[rank::world])
    lone = CIDErD(tokenizer="simple")  # only rank 0 has captions: the others never update
    if rank == 0:
        lone.update(CANDS, REFS)
    vqa = VQAAccuracy(official=False)
    vqa.update(["red", "blue"][rank : rank + 1], [[["red"] * 3, ["blue"] * 1 + ["x"] * 2][rank]])
    images = torch.stack([s.image for s in shape_samples(12, seed=5)])
    fid = make_fid(TinyFeatures())
    load_real_stats(Path(out_dir) / "real.pt", fid, holds_totals=rank == 0)
    fid.update(images[rank::world], real=False)
    values = [float(cider.compute()), float(vqa.compute()), float(fid.compute()), float(lone.compute())]
    result = torch.tensor(values, dtype=torch.float64)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_metrics_sync_across_two_ranks(tmp_path: Path) -> None:
    from support.eval_setup import TinyFeatures, shape_samples

    from cm3leon_lightning.metrics import cider_d
    from cm3leon_lightning.metrics.fid import make_fid, real_stats, save_real_stats

    real = torch.stack([s.image for s in shape_samples(12)])
    single = make_fid(TinyFeatures())
    single.update(real, real=True)
    save_real_stats(tmp_path / "real.pt", real_stats(single))
    single.update(torch.stack([s.image for s in shape_samples(12, seed=5)]), real=False)
    want = [cider_d(CANDS, REFS, "simple")[0], (1.0 + 1 / 3) / 2, float(single.compute())]
    want.append(want[0])  # CIDEr-D with every caption on rank 0

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt").tolist()
        assert got == pytest.approx(want, rel=1e-6), rank
