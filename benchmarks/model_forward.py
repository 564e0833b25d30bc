"""Throughput of the CM3Leon transformer: training forward+backward, prefill, and KV-cached decode steps.

Prints numbers only (no assertions). Examples::

    python benchmarks/model_forward.py                                   # tiny on CPU
    python benchmarks/model_forward.py --preset 350m --device cuda --dtype bfloat16 --seq 4096 --batch 4
    python benchmarks/model_forward.py --preset 760m --device cuda --dtype bfloat16 --compile --cuda-graph
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from generation import at_least, chosen_device  # benchmarks/generation.py, beside this script
from torch._dynamo.utils import counters

from cm3leon_lightning.config import PRESETS, CM3LeonConfig
from cm3leon_lightning.model import CM3Leon


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Parse arguments, build the model and print tokens per second for each use of the forward."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--seq", type=at_least(1), default=256, help="training/prefill length")
    parser.add_argument("--decode-steps", type=at_least(1), default=32)
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed runs, the median taken")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--cuda-graph", action="store_true", help="compile with mode='reduce-overhead' (CUDA graphs)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the training step")
    args = parser.parse_args()

    device, dtype = torch.device(chosen_device(parser, args.device)), getattr(torch, args.dtype)
    cfg = CM3LeonConfig.from_preset(args.preset)
    if args.decode_steps >= cfg.max_seq_len:
        parser.error(f"--decode-steps must be below the {args.preset} context of {cfg.max_seq_len} tokens")
    seq = min(args.seq, cfg.max_seq_len - args.decode_steps)
    torch.manual_seed(0)
    model = CM3Leon(cfg, gradient_checkpointing=args.checkpointing).to(device=device, dtype=dtype)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
    print(
        f"preset={args.preset} params={model.num_parameters() / 1e6:.1f}M device={device} dtype={dtype} "
        f"batch={args.batch} seq={seq}"
    )

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(idx).float().logsumexp(-1).mean().backward()

    model.train()
    t = timed(train_step, device, args.repeats)
    print(f"train fwd+bwd: {t * 1e3:.1f} ms, {args.batch * seq / t:,.0f} tok/s")

    model.eval()
    model.setup_kv_cache(args.batch, seq + args.decode_steps)
    slots = torch.arange(seq, device=device)
    with torch.no_grad():
        t = timed(lambda: model(idx, input_pos=slots, last_only=True), device, args.repeats)
        print(f"prefill: {t * 1e3:.1f} ms, {args.batch * seq / t:,.0f} tok/s")

        step, how = model, "eager"
        skips = counters["inductor"]["cudagraph_skips"]
        if args.compile or args.cuda_graph:
            mode = "reduce-overhead" if args.cuda_graph else "default"
            step = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
            how = f"torch.compile mode={mode}"
        tok = idx[:, -1:].clone()
        input_pos = torch.tensor([seq], device=device)

        def decode() -> None:
            input_pos.fill_(seq)
            for _ in range(args.decode_steps):
                step(tok, input_pos=input_pos)
                input_pos.add_(1)

        t = timed(decode, device, args.repeats)
        per_step = t / args.decode_steps
        if args.cuda_graph:  # torch.compile may skip them (and says why in its log): the step then ran without
            how += f", CUDA graphs skipped: {counters['inductor']['cudagraph_skips'] - skips}"
        print(f"decode: {per_step * 1e3:.2f} ms/step, {args.batch / per_step:,.0f} tok/s ({how})")


if __name__ == "__main__":
    main()
