"""The fused decode step's attention kernel: time per call over a filling cache, one run or split over the cache.

:func:`cm3leon_lightning.model.fused.decode_attention` reads the keys and values of the filled slots once per layer.
At one image with CFG only 2 rows x heads programs run unless the cache is split over several programs per (row,
head) (``splits``, flash-decoding, opt-in as ``CM3LEON_FUSED_SPLITS=1``). This script times it at a preset's head
shape for 2 rows (one image with CFG) and ``2 x --candidates`` rows, at the start, middle and end of a 1024-token
image, for each ``--splits``, as a chain of ``--chain`` calls (each over its own cache, as the layers of a step)
captured in one CUDA graph (a row's time includes the gap between kernels, as in the real step; ``--prefetch``: each
call asks L2 for the next one's filled slots), beside ``bound``: the bytes read over the measured copy bandwidth. Each
result is checked against SDPA with ``padding_causal_mask`` first (a split that computes wrongly is reported, not
timed).

On a CPU (``--device cpu``) the kernel runs under Triton's interpreter (start with ``TRITON_INTERPRET=1``): the
timings mean nothing there, the checks do.

Usage::

    python benchmarks/fused_attention.py --json fused_attention.json      # CUDA: 350m heads, bf16
    TRITON_INTERPRET=1 python benchmarks/fused_attention.py --device cpu --preset tiny --slots 5,140 --rows 3 \\
        --splits 1,2 --steps 1 --chain 1                                   # CPU: checks only
"""

from __future__ import annotations

import argparse
import functools
import math
import os

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
from cm3leon_lightning.model.fused import decode_attention
from cm3leon_lightning.model.fused_launch import FusedOptions, use_fused_options
from cm3leon_lightning.model.kv_cache import padding_causal_mask


def layer_attention(
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    valid: torch.Tensor,
    pos: torch.Tensor,
    splits: int,
    layer: int,
) -> torch.Tensor:
    """:func:`decode_attention` over the keys and values of ``caches[layer]`` (handing it the next layer's to
    prefetch, which it does with the ``prefetch_next`` option)."""
    k, v = caches[layer]
    return decode_attention(q, k, v, valid, pos, splits=splits, prefetch=caches[(layer + 1) % len(caches)])


def main() -> None:
    p = kernel_parser(__doc__)
    p.add_argument("--slots", default="63,511,1023", help="comma-separated slots of the query (cache filled up to it)")
    p.add_argument("--splits", default="1,2,4,8", help="comma-separated programs per (row, head)")
    p.add_argument("--prefetch", action="store_true", help="each call prefetches the next one's cache into L2")
    args = p.parse_args()
    args.device = chosen_device(p, args.device)
    with use_fused_options(FusedOptions(prefetch_next=args.prefetch)):
        bench(p, args)


def bench(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check and time the attention at every (rows, slot, splits), beside the bandwidth bound."""
    gpu = args.device.startswith("cuda")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the kernel under Triton's interpreter: start it with TRITON_INTERPRET=1")
    try:
        rows_list = args.rows or list(dict.fromkeys((2, 2 * args.candidates)))  # --candidates 1: 2 once
        slots_list = [int(s) for s in args.slots.split(",")]
        splits_list = [int(s) for s in args.splits.split(",")]
    except ValueError as err:
        p.error(f"--rows, --slots and --splits take comma-separated integers ({err})")
    if min(splits_list) < 1 or min(slots_list) < 0:
        p.error("--splits must be at least 1 and --slots at least 0")
    config = CM3LeonConfig.from_preset(args.preset)
    H, D, S = config.n_head, config.head_dim, max(slots_list) + 1
    dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes in float32 only
    bandwidth = copy_bandwidth(args.device, 1 << (29 if gpu else 24))
    print(f"{args.preset} ({H} heads of {D}), {dtype}, {args.device}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"{args.chain} calls per graph")  # fmt: skip
    print(f"{'rows':>4} {'slot':>5} {'splits':>8} {'us':>8} {'GB/s':>7}")
    results, wrong = [], 0
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        for rows in rows_list:
            g = torch.Generator().manual_seed(rows)
            k, v = (torch.randn(rows, H, S, D, generator=g).to(args.device, dtype) for _ in range(2))
            # a cache per call of the chain, as per layer (one would stay in L2): copy 0 is the one checked
            caches = [(k, v)] + [(k.roll(i, 2), v.roll(i, 2)) for i in range(1, args.chain)]
            q = torch.randn(rows, H * D, generator=g).to(args.device, dtype)
            valid = torch.ones(rows, S, dtype=torch.bool, device=args.device)
            valid[rows // 2 :, : min(20, S)] = False  # half the rows left-padded, as prompts of different lengths
            for slot in slots_list:
                pos = torch.tensor([slot], device=args.device)
                q4 = q.view(rows, 1, H, D).transpose(1, 2).float()
                expected = F.scaled_dot_product_attention(
                    q4, k.float(), v.float(), attn_mask=padding_causal_mask(valid, pos)
                ).transpose(1, 2).reshape(rows, H * D)  # fmt: skip
                nbytes = 2 * rows * H * (slot + 1) * D * k.element_size()  # keys and values of the filled slots
                for splits in splits_list:
                    out = decode_attention(q, k, v, valid, pos, splits=splits)
                    correct = torch.allclose(out.float(), expected, **tol)
                    wrong += not correct
                    call = functools.partial(layer_attention, caches, q, valid, pos, splits)
                    # not timed when wrong: what computes wrongly may also read or write out of bounds
                    us = chained_us(call, args.device, args.chain, args.steps) if correct else math.nan
                    label = f"{splits}" + ("" if correct else " WRONG")
                    print(f"{rows:4d} {slot:5d} {label:>8} {us:8.2f} {nbytes / us / 1e3:7.0f}")
                    results.append(dict(rows=rows, slot=slot, splits=splits, us=us, gbps=nbytes / us / 1e3,
                                        correct=correct))  # fmt: skip
                bound = 1e6 * nbytes / bandwidth
                print(f"{rows:4d} {slot:5d} {'bound':>8} {bound:8.2f} {bandwidth / 1e9:7.0f}")
                results.append(dict(rows=rows, slot=slot, splits="bound", us=bound, gbps=bandwidth / 1e9))
    sync(args.device)
    meta = dict(preset=args.preset, device=args.device, dtype=str(dtype), chain=args.chain, prefetch=args.prefetch,
                copy_bandwidth=bandwidth, device_name=torch.cuda.get_device_name() if gpu else "cpu")  # fmt: skip
    finish_checked(args.json, meta, results, wrong, "call(s)")


if __name__ == "__main__":
    main()
