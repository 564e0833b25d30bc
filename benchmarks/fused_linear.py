"""The fused decode step's linear kernel, launch by launch: time per tile configuration, against cuBLAS and the
weight-reading bound.

The first GPU profile of the fused step (docs/benchmarks.md, session 6) found the linear kernel at 85% of the step's
kernel time and about 1 TB/s. This script times each launch of a step at a preset's shapes (QKV with the cache
write, out-projection, up-projection with the activation, down-projection, the image-code slice of the LM head), at
2 rows (one image with CFG) and ``2 x --candidates`` rows, under every configuration the autotuner may pick
(:data:`~cm3leon_lightning.model.fused_linear_kernel.CONFIGS`, ``--pdl``: with programmatic dependent launch and its
prefetching configurations), as a chain of ``--chain`` launches captured in one CUDA graph, each on its own copy of
the weight as the layers of a step (so a row's time includes the gap between kernels and the weights come from memory,
not L2, as in the real step; ``--prefetch``: each launch asks L2 for the next one's weights). Beside them: the
configuration the autotuner picks (``tuned``), ``F.linear`` alone (``cublas``, no LayerNorm, activation or cache
write) and ``bound``, the weight bytes over the measured copy bandwidth.

On a CPU (``--device cpu``) the kernels run under Triton's interpreter (set ``TRITON_INTERPRET=1`` before starting):
the timings mean nothing there, but every launch and configuration is checked against torch, which this script does
on a GPU too (a configuration that computes wrongly is reported, not timed).

Usage::

    python benchmarks/fused_linear.py --json fused_linear.json          # CUDA: 350m, bf16, rows 2 and 16
    TRITON_INTERPRET=1 python benchmarks/fused_linear.py --device cpu --preset tiny --rows 3 --head 256 \\
        --steps 1 --configs 0,6                                         # CPU: checks only
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from decode_floor import (  # benchmarks/decode_floor.py, beside this script
    chained_us,
    copy_bandwidth,
    finish_checked,
    kernel_parser,
)
from generation import chosen_device, sync  # benchmarks/generation.py

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import fused
from cm3leon_lightning.model.fused_launch import FusedOptions, use_fused_options

LAUNCHES = ("qkv", "out", "up", "down", "head")
"""The linear launches of a fused step: per block QKV (LayerNorm + cache write), out-projection (+ residual),
up-projection (LayerNorm + GELU), down-projection (+ residual); once, the LM head over the image codes (LayerNorm)."""


def launch(
    name: str,
    config: CM3LeonConfig,
    rows: int,
    head: int,
    device: str,
    dtype: torch.dtype,
    copies: int = 1,
    slots: int = 64,
) -> tuple[Callable[[int], torch.Tensor], Callable[[], torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """``(run, written, expected, weights)`` for one launch: ``run(i)`` calls :func:`fused.decode_linear` on fixed
    random inputs and ``weights[i]`` (``copies`` of the weight, one per layer of a chain, as a step reads a new one
    at each launch; with the ``prefetch_next`` option ``run(i)`` prefetches ``weights[i + 1]``), what is timed;
    ``written()`` runs copy 0 and returns what it wrote as ``(rows, N)`` (for QKV: the queries, then the cache slot's
    keys and values), and ``expected`` is that computed by torch in float32."""
    C, H, D = config.d_model, config.n_head, config.head_dim
    n, k = {"qkv": (3 * C, C), "out": (C, C), "up": (config.d_ff, C), "down": (C, config.d_ff), "head": (head, C)}[name]
    g = torch.Generator().manual_seed(LAUNCHES.index(name))
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device, dtype)
    weights = [w] + [w.roll(i, 0) for i in range(1, copies)]
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    res = torch.randn(rows, n, generator=g).to(device, dtype)
    norm, act = name in ("qkv", "up", "head"), int(name == "up")
    residual = res if name in ("out", "down") else None
    eps = config.layer_norm_eps
    kv = torch.zeros(2, rows, H, slots, D, device=device, dtype=dtype)
    slot = torch.tensor([slots // 2], device=device)
    cache = (kv[0], kv[1], slot) if name == "qkv" else None

    def run(i: int = 0) -> torch.Tensor:
        nxt = weights[(i + 1) % copies]
        return fused.decode_linear(
            x, weights[i], norm_eps=eps if norm else None, act=act, residual=residual, cache=cache, prefetch=nxt
        )

    def written() -> torch.Tensor:
        out = run()
        if cache is None:
            return out
        return torch.cat([out, kv[0][:, :, slots // 2].reshape(rows, C), kv[1][:, :, slots // 2].reshape(rows, C)], 1)

    h = F.layer_norm(x.float(), (k,), eps=eps).to(dtype).float() if norm else x.float()  # rounded as the kernel does
    h = F.linear(h, w.float())
    h = F.gelu(h) if act else h
    expected = h + res.float() if residual is not None else h
    return run, written, expected, weights


def label(tiles: dict) -> str:
    """``block_n=16/block_k=128/split_k=4``."""
    return "/".join(f"{k.lower()}={int(v)}" for k, v in tiles.items())


def main() -> None:
    p = kernel_parser(__doc__)
    p.add_argument("--head", type=int, default=8192, help="LM head rows (the image codes' slice)")
    p.add_argument("--configs", default=None, help="comma-separated indices of the configurations to try (default all)")
    p.add_argument("--pdl", action="store_true", help="with programmatic dependent launch")
    p.add_argument("--prefetch", action="store_true", help="each launch prefetches the next one's weights into L2")
    args = p.parse_args()
    args.device = chosen_device(p, args.device)
    gpu = args.device.startswith("cuda")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernels under Triton's interpreter: start it with TRITON_INTERPRET=1")
    with use_fused_options(FusedOptions(pdl=args.pdl, splits=True, prefetch_next=args.prefetch)):
        bench(p, args, gpu)


def bench(p: argparse.ArgumentParser, args: argparse.Namespace, gpu: bool) -> None:
    """Check and time every launch under every configuration (and the tuned one, cuBLAS and the bound)."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes in float32 only
    config = CM3LeonConfig.from_preset(args.preset)
    rows_list = args.rows or list(dict.fromkeys((2, 2 * args.candidates)))  # --candidates 1: 2 once
    configs = fk.PDL_CONFIGS if args.pdl else fk.CONFIGS
    if args.configs:
        try:
            configs = [configs[int(i)] for i in args.configs.split(",")]
        except (ValueError, IndexError):
            p.error(f"--configs: indices below {len(configs)} expected, got {args.configs!r}")
    bandwidth = copy_bandwidth(args.device, 1 << (29 if gpu else 24))
    print(f"{args.preset}, {dtype}, {args.device}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, {args.chain} launches "
          f"per graph{', PDL' if args.pdl else ''}{', next weights prefetched' if args.prefetch else ''}")  # fmt: skip
    print(f"{'launch':6} {'rows':>4} {'N x K':>11} {'configuration':44} {'us':>8} {'GB/s':>7}")
    results = []

    def report(name: str, rows: int, n: int, k: int, what: str, us: float, **extra: object) -> None:
        gbps = n * k * dtype.itemsize / us / 1e3
        print(f"{name:6} {rows:4d} {f'{n}x{k}':>11} {what:44} {us:8.2f} {gbps:7.0f}")
        results.append(dict(launch=name, rows=rows, n=n, k=k, config=what, us=us, gbps=gbps, **extra))

    timed = functools.partial(chained_us, device=args.device, chain=args.chain, steps=args.steps)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    wrong = 0
    with torch.no_grad():
        for rows in rows_list:
            for name in LAUNCHES:
                run, written, expected, weights = launch(name, config, rows, args.head, args.device, dtype, args.chain)
                n, k = weights[0].shape
                for c in fk.prune_configs(configs, {"N": n, "K": k}):
                    fused.FIXED_TILES = c.kwargs
                    correct = torch.allclose(written().float(), expected, **tol)
                    wrong += not correct
                    if correct:
                        report(name, rows, n, k, label(c.kwargs), timed(run), correct=True)
                    else:  # not timed: what computes wrongly may also read or write out of bounds
                        report(name, rows, n, k, label(c.kwargs) + " WRONG", math.nan, correct=False)
                fused.FIXED_TILES = None
                if gpu:
                    run()  # autotunes, outside the capture
                    kernel = fk.tuned_kernel(args.pdl, True)
                    report(
                        name,
                        rows,
                        n,
                        k,
                        f"tuned: {label(kernel.best_config.kwargs)}",
                        timed(run),
                    )
                x = torch.randn(rows, k, device=args.device, dtype=dtype)
                report(
                    name,
                    rows,
                    n,
                    k,
                    "cublas (F.linear alone)",
                    timed(lambda i, x=x, weights=weights: F.linear(x, weights[i])),
                )
                report(name, rows, n, k, "bound (weights / copy bandwidth)", 1e6 * n * k * dtype.itemsize / bandwidth)
    sync(args.device)
    meta = dict(preset=args.preset, device=args.device, dtype=str(dtype), chain=args.chain, pdl=args.pdl,
                prefetch=args.prefetch, copy_bandwidth=bandwidth,
                device_name=torch.cuda.get_device_name() if gpu else "cpu")  # fmt: skip
    finish_checked(args.json, meta, results, wrong, "configuration(s)")


if __name__ == "__main__":
    main()
