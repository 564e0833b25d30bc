"""Where the time of one text-to-image decode step goes, op by op and kernel by kernel.

Builds ``--preset`` with random weights (the timing does not depend on them), prefills one caption with CFG (2
streams per candidate, ``--candidates`` candidates) and, for each decode-step mode of ``--modes`` and attention
implementation of ``--attention``:

* times ``--steps`` decode steps without the profiler (ms per step, the figure that matters);
* profiles ``--steps`` more with ``torch.profiler`` and prints the ``--rows`` ops/kernels with the most self time
  (device time on CUDA, CPU time on CPU) and the number of device kernels per step.

Profile the compiled step without CUDA graphs (``inductor``) to see each kernel's own time; the graph modes show
what one replay costs. Tables go to ``--out`` (one text file per mode and attention) as well as to stdout.

Usage::

    python benchmarks/decode_profile.py --preset 350m --modes eager,inductor,reduce-overhead   # on a GPU
    python benchmarks/decode_profile.py --device cpu --preset tiny --modes eager --steps 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from generation import PROMPT_LEN, at_least, build, chosen_device, comma_list, sync  # benchmarks/generation.py
from torch.profiler import ProfilerActivity, profile

from cm3leon_lightning.config import PRESETS
from cm3leon_lightning.generation.decoder import Decoder, SamplingSpec
from cm3leon_lightning.generation.generate import image_prompt, unconditional_image_prompt
from cm3leon_lightning.generation.graphs import MODES
from cm3leon_lightning.model import ATTENTION_IMPLS


def profile_mode(model, vocab, args, mode: str, attention: str, device: str) -> str:
    """Time and profile ``args.steps`` decode steps in ``mode``; returns the report text."""
    model.set_attention(attention)
    n = args.candidates
    prompt = [vocab.num_special + (7 * i) % (vocab.n_text - vocab.num_special) for i in range(PROMPT_LEN)]
    rows = [image_prompt(vocab, prompt)] * n + [unconditional_image_prompt(vocab)] * n
    spec = SamplingSpec(method="top_p", streams=2, cfg=3.0, lo=vocab.n_text, hi=vocab.size)
    gpu = device.startswith("cuda")
    with torch.no_grad():
        dec = Decoder(model, spec, rows, vocab.image_tokens, seed=0, compile=mode)
        _, feed = dec.prefill()
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # compilation, graph capture
            _, feed = dec.step(feed)
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            _, feed = dec.step(feed)
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                _, feed = dec.step(feed)
            sync(device)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    head = (
        f"== {mode} / {attention}: {ms:.3f} ms per step ({2 * n} streams, {model.config.n_layer} layers), "
        f"warm-up {warm:.1f} s" + (f", {kernels / args.steps:.0f} device kernels per step" if gpu else "")
    )
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70)
    return f"{head}\n{table}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--preset", default="350m", choices=tuple(PRESETS))
    p.add_argument("--image-tokens", type=at_least(1), help="codes per image (default: 1024 GPU, 64 CPU)")
    p.add_argument("--candidates", type=at_least(1), default=1, help="candidates (x2 streams with CFG)")
    p.add_argument("--modes", default=None, help=f"comma-separated modes of {MODES} (default: eager,inductor)")
    p.add_argument("--attention", default="sdpa", help=f"comma-separated of {ATTENTION_IMPLS}")
    p.add_argument(
        "--steps", type=at_least(1), help="decode steps timed, then as many profiled (default 32 GPU, 8 CPU)"
    )
    p.add_argument("--warmup", type=at_least(0), default=4, help="steps run before timing (compilation)")
    p.add_argument("--rows", type=at_least(1), default=25, help="rows of each table")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads")
    p.add_argument("--out", default="decode_profile", help="directory for the tables")
    args = p.parse_args()
    device = chosen_device(p, args.device)
    gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.image_tokens or (1024 if gpu else 64)
    args.steps = args.steps or (32 if gpu else 8)
    if args.warmup + 2 * args.steps >= tokens:
        p.error(f"--warmup + 2 x --steps must stay below the image's {tokens} tokens (--image-tokens)")
    modes = comma_list(p, "--modes", args.modes or "eager,inductor", MODES)
    attentions = comma_list(p, "--attention", args.attention, ATTENTION_IMPLS)
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
    model, vocab = build(args.preset, tokens, device, dtype[args.dtype])
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.preset}, {dtype[args.dtype]}, {tokens} tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for attention in attentions:
        for mode in modes:
            report = profile_mode(model, vocab, args, mode, attention, device)
            (out / f"{mode}-{attention}.txt").write_text(report + "\n", encoding="utf-8")
            print(report, flush=True)


if __name__ == "__main__":
    main()
