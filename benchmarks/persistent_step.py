"""The persistent decode step (one launch per token, :mod:`cm3leon_lightning.model.persistent`): time per step under
several tilings, against the fused step's kernels one by one and the bandwidth bound.

At 2 rows (one image with CFG) and ``2 x --candidates`` rows, with the cache filled up to ``--slot`` (the middle of a
1024-token image by default), this script runs one decode step of a preset's model (random weights, so that every
block counts) through :func:`~cm3leon_lightning.model.fused.fused_decode_forward`: once with its kernels one by one
(``kernels``, the fused step's default launch options) and once per ``--tiles`` entry with the ``persistent`` option,
each replayed from a captured CUDA graph; beside them ``bound``, the bytes a step must read (weights once, the filled
cache) over the measured copy bandwidth. Every persistent result is first checked against the ``kernels`` logits (a
tiling that computes wrongly is reported, not timed; one that fails to compile, or whose waits gave up, is reported
and the next one runs) and the programs it launched are printed. Each row gives ms per step and ``s total``: a whole
1024-token decode of its rows (``rows / 2`` images with CFG) at that step time.

A ``--tiles`` entry is ``block_n/down_split/per_sm/sleep_ns`` (``per_sm`` ``auto``: as many as fit), e.g.
``16/4/auto/0``. On a CPU (``--device cpu``) the kernel runs under Triton's interpreter (start with
``TRITON_INTERPRET=1``): the timings mean nothing there, the checks do.

Usage::

    python benchmarks/persistent_step.py --json persistent_step.json        # CUDA: 350m, bf16, rows 2 and 16
    TRITON_INTERPRET=1 python benchmarks/persistent_step.py --device cpu --preset tiny --rows 3 --slot 20 \\
        --tiles 16/2/auto/0 --steps 1                                       # CPU: checks only
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable

import torch
from decode_floor import copy_bandwidth, finish_checked, kernel_parser, replay_ms, step_bytes
from generation import build, chosen_device  # benchmarks/generation.py, beside this script

from cm3leon_lightning.model import persistent
from cm3leon_lightning.model.fused import fused_decode_forward
from cm3leon_lightning.model.fused_launch import FusedOptions, use_fused_options
from cm3leon_lightning.model.persistent import PersistentTiles

DEFAULT_TILES = "16/4/auto/0,32/4/auto/0,16/8/auto/0,16/4/2/0,16/4/auto/200"
"""Five tilings (each a compilation of ~5 s per row count on the GPU): the default, wider blocks, more down-projection
splits, fewer programs, polling with back-off."""


def parse_tiles(p: argparse.ArgumentParser, text: str) -> list[PersistentTiles]:
    """The ``--tiles`` entries (``block_n/down_split/per_sm/sleep_ns``), else an argparse error naming the bad one."""
    tiles = []
    for entry in text.split(","):
        try:
            block_n, split, per_sm, sleep = entry.strip().split("/")
            tiles.append(
                PersistentTiles(
                    block_n=int(block_n),
                    down_split=int(split),
                    per_sm=None if per_sm == "auto" else int(per_sm),
                    sleep_ns=int(sleep),
                )
            )
        except ValueError as err:
            p.error(f"--tiles: {entry!r} is not block_n/down_split/per_sm/sleep_ns ({err})")
    return tiles


def label(t: PersistentTiles) -> str:
    """The ``--tiles`` entry of ``t``."""
    return f"{t.block_n}/{t.down_split}/{t.per_sm or 'auto'}/{t.sleep_ns}"


def cache_slots(model, slot: int) -> int:
    """Slots of the cache for a step at ``slot``: rounded up to 64, as the decoder sizes its cache."""
    return min(model.config.max_seq_len, -(-(slot + 1) // 64) * 64)


def prepared(model, rows: int, slot: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Set up ``model``'s cache for ``rows`` rows with slots ``[0, slot)`` filled (random keys and values, all
    valid); returns one token per row and the step's slot."""
    model.setup_kv_cache(batch_size=rows, max_seq_len=cache_slots(model, slot))
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    cache = model.kv_cache
    for i in range(cache.n_layer):
        for buf in cache.layer(i):
            buf.normal_(0.0, 1.0, generator=g)
    cache.valid[:, :slot] = True
    tok = torch.randint(0, model.config.vocab_size, (rows, 1), device=cache.device, generator=g)
    return tok, torch.tensor([slot], device=cache.device)


def time_tiling(
    step: Callable[[], torch.Tensor], expected: torch.Tensor, model, span: tuple[int, int], device: str, steps: int
) -> tuple[float | None, int, float]:
    """Check one persistent step (``step``, under the ``persistent`` launch option) against ``expected``, then time
    it over ``steps`` replays: ``(ms per step or None if wrong, programs, max |diff|)``. The failed-wait counter is
    read after the check and after the timing (on a GPU the launches leave it to the host): one wait that gave up
    makes every later wait give up at once, which would time wrong steps as fast ones.

    Raises:
        RuntimeError: a wait gave up (:meth:`~cm3leon_lightning.model.persistent.PersistentStep.check`).
    """
    diff = float((step().float() - expected).abs().max())
    plan = persistent.persistent_step(model, span)
    plan.check()
    print(f"  {label(plan.tiles)}: {plan.programs} programs, {plan.registers} registers a thread, "
          f"{plan.constants['ATTN_SPLITS']} runs per (row, head)")  # fmt: skip
    if diff > 0.05 * float(expected.abs().max()) + 1e-4:
        return None, plan.programs, diff
    ms = replay_ms(step, device, steps)
    plan.check()
    return ms, plan.programs, diff


def main() -> None:
    p = kernel_parser(__doc__, chain=False)  # one step per graph: nothing to chain
    p.add_argument("--slot", type=int, default=535, help="cache slot of the step (default: mid-image, 24 + 512 - 1)")
    p.add_argument("--tiles", default=DEFAULT_TILES, help="comma-separated block_n/down_split/per_sm/sleep_ns")
    args = p.parse_args()
    args.device = chosen_device(p, args.device)
    gpu = args.device.startswith("cuda")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernel under Triton's interpreter: start it with TRITON_INTERPRET=1")
    try:
        rows_list = args.rows or list(dict.fromkeys((2, 2 * args.candidates)))  # --candidates 1: 2 once
    except ValueError as err:
        p.error(f"--rows takes comma-separated integers ({err})")
    tiles = parse_tiles(p, args.tiles)
    model, vocab = build(args.preset, 1024 if gpu else 16, args.device, torch.bfloat16 if gpu else torch.float32)
    if not 0 <= args.slot < model.config.max_seq_len:
        p.error(f"--slot must be in [0, {model.config.max_seq_len}), got {args.slot}")
    with torch.no_grad():
        for w in model.parameters():  # the paper's init zeroes the output layers, which would hide wrong blocks
            w.normal_(0.0, 0.02)
    span = (vocab.n_text, vocab.size)
    bandwidth = copy_bandwidth(args.device, 1 << (29 if gpu else 24))
    name = torch.cuda.get_device_name(args.device) if gpu else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, {args.preset}, slot {args.slot}, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s")  # fmt: skip
    print(f"{'step':<24} {'rows':>4} {'programs':>8} {'ms/step':>9} {'s total':>8} {'max |diff|':>10}")
    results, wrong = [], 0

    def report(what: str, rows: int, ms: float | None, programs: int = 0, diff: float = 0.0) -> None:
        results.append(dict(step=what, rows=rows, programs=programs, ms_per_step=ms, max_abs_diff=diff))
        timing = f"{ms:>9.3f} {ms * 1024 / 1e3:>8.3f}" if ms is not None else f"{'WRONG':>9} {'':>8}"
        print(f"{what:<24} {rows:>4} {programs:>8} {timing} {diff:>10.2e}", flush=True)

    with torch.no_grad():
        for rows in rows_list:
            tok, pos = prepared(model, rows, args.slot)
            step = functools.partial(fused_decode_forward, model, tok, pos, span)
            filled = args.slot + 1
            report("bound", rows, 1e3 * step_bytes(model, rows, 0, filled, span[1] - span[0]) / bandwidth)
            with use_fused_options(FusedOptions()):
                expected = step().float()
                report("kernels", rows, replay_ms(step, args.device, args.steps))
            for t in tiles:
                persistent.TILES = t
                try:
                    with use_fused_options(FusedOptions(persistent=True)):
                        ms, programs, diff = time_tiling(step, expected, model, span, args.device, args.steps)
                except Exception as err:  # a tiling that fails to compile or to hand off: said, and the next one runs
                    print(f"  {label(t)}: FAILED {type(err).__name__}: {err}", flush=True)
                    ms, programs, diff = None, 0, float("nan")
                wrong += ms is None
                report(f"persistent {label(t)}", rows, ms, programs, diff)
            persistent.TILES = None
    meta = dict(device=args.device, device_name=name, torch=torch.__version__, preset=args.preset, slot=args.slot,
                copy_bandwidth=bandwidth)  # fmt: skip
    finish_checked(args.json, meta, results, wrong, "tilings")


if __name__ == "__main__":
    main()
