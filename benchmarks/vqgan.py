"""Images per second of VQGAN encode and decode (default: the f8_8192 preset, 256x256 -> 32x32 codes).

Random weights (speed does not depend on them). Uses CUDA when available, else CPU with a small batch::

    python benchmarks/vqgan.py                       # auto device
    python benchmarks/vqgan.py --device cuda --batch-size 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
from generation import at_least, chosen_device  # benchmarks/generation.py, beside this script

from cm3leon_lightning.tokenization.vqgan import VQGAN


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    """Parse arguments, time encode and decode, print images/s."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="f8_8192")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="default: 32 on cuda, 2 on cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=at_least(1), default=None, help="default: 20 on cuda, 2 on cpu")
    p.add_argument("--warmup", type=at_least(0), default=1)
    args = p.parse_args()
    device = torch.device(chosen_device(p, args.device))
    on_cpu = device.type == "cpu"
    batch = args.batch_size or (2 if on_cpu else 32)
    iters = args.iters or (2 if on_cpu else 20)
    torch.manual_seed(0)
    model = VQGAN.from_name(args.preset).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    res = model.config.resolution
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
    codes = model.encode(images)
    t_enc = bench(lambda: model.encode(images), device, iters, args.warmup)
    t_dec = bench(lambda: model.decode(codes), device, iters, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"VQGAN {args.preset} {res}x{res} -> {tuple(model.config.grid_size)} codes, {args.dtype}, batch {batch}, {name}"
    )
    print(f"encode: {batch / t_enc:8.2f} images/s ({t_enc * 1000:.0f} ms/batch)")
    print(f"decode: {batch / t_dec:8.2f} images/s ({t_dec * 1000:.0f} ms/batch)")


if __name__ == "__main__":
    main()
