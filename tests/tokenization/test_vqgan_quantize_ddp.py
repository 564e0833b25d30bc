"""VectorQuantizer under a real 2-process gloo group: EMA codebooks and dead-code restarts stay equal on every rank."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cm3leon_lightning.tokenization.quantize import VectorQuantizer

STEPS = 3


def _latents(rank: int, step: int) -> torch.Tensor:
    """Different data per rank (rank 1 shifted by 5): unsynchronised replicas drift apart."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(2, 4, 3, 3, generator=g) + 5 * rank


def _ema_quantizer() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(8, 4, ema_decay=0.5).train()


def _restart_quantizer() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(64, 4, dead_code_after=1).train()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ema, restart = _ema_quantizer(), _restart_quantizer()
    torch.manual_seed(1000 + rank)  # each rank would pick different restart latents
    for step in range(STEPS):
        z = _latents(rank, step)
        ema(z)
        restart(z)
    state = {f"ema.{k}": v for k, v in ema.state_dict().items()}
    state.update({f"restart.{k}": v for k, v in restart.state_dict().items()})
    state["restart.steps_unused"] = restart.steps_unused.clone()
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_codebooks_stay_equal_across_two_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    restarted = ranks[0]["restart.embedding.weight"] != _restart_quantizer().embedding.weight
    assert restarted.any()  # codes were restarted (the same ones, at the same latents, on both ranks)
    # the EMA codebook equals that of one process fed both ranks' latents
    single = _ema_quantizer()
    for step in range(STEPS):
        single(torch.cat([_latents(0, step), _latents(1, step)]))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0][f"ema.{key}"], value, rtol=1e-5, atol=1e-6, msg=key)
