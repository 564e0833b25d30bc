"""How fast can one decode step be at a preset's shape with stock PyTorch kernels? The floor under the decode step.

The issue's goal (0.5 s per 1024-token image with CFG at 350m) needs 0.49 ms per decode step. This script takes the
real step apart and times growing pieces of it, each replayed from one captured CUDA graph (a plain loop on a CPU),
on the model's own weights and at the decoder's own cache size:

* ``gemms``: only the matmuls of every block (QKV, out-projection, MLP in and out) and the image-code slice of the LM
  head, chained: what cuBLAS alone needs per token;
* ``+pointwise``: plus the LayerNorms, GELU and residual additions (one kernel each, as eager runs them);
* ``+cache``: plus writing each block's new keys and values into its cache slot;
* ``+sdpa`` / ``+flex``: plus attention over the cache, half filled (SDPA with a boolean mask reads every slot;
  FlexAttention's block mask only the filled blocks): the model's forward minus the embeddings, without fusion;
* ``step <mode>``: the real decode step (:class:`~cm3leon_lightning.generation.decoder.Decoder`, embeddings, guidance
  and top-p sampling included) in each of ``--modes`` (default on CUDA ``graph``, the eager step in one CUDA graph
  like the pieces, so the difference to ``+sdpa`` is what the step adds, and ``fused-graph``, the fused Triton step
  of :mod:`cm3leon_lightning.model.fused`; ``generation.py`` times the compiled modes), its timed steps centred on
  the image's middle, where the pieces' cache and the bound are filled;

and ``bound``: the bytes one step must read (weights once, plus the filled cache) over the device's copy bandwidth,
measured in the same run. Each piece at 2 rows (one image with CFG) and at ``2 x --candidates`` rows, as ms per
step, ``s total`` (the decode of all the rows' images, ``rows / 2`` with CFG, at that step time) and ``s/image``.

If ``gemms`` alone is far above the goal, no fusion of the rest reaches it with cuBLAS; if ``+pointwise`` or the step
is far above ``gemms``, fusion is what is missing.

Usage::

    python benchmarks/decode_floor.py                                  # CUDA: 350m, bf16, 1024 tokens
    python benchmarks/decode_floor.py --device cpu --preset tiny --image-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from generation import PROMPT_LEN, at_least, build, chosen_device, comma_list, sync  # benchmarks/generation.py

from cm3leon_lightning.config import PRESETS
from cm3leon_lightning.generation.decoder import Decoder, SamplingSpec
from cm3leon_lightning.generation.generate import image_prompt, unconditional_image_prompt
from cm3leon_lightning.generation.graphs import MODES
from cm3leon_lightning.model import ATTENTION_IMPLS, CM3Leon
from cm3leon_lightning.model.kv_cache import padding_causal_mask
from cm3leon_lightning.model.transformer import cache_block_mask, flex_cached_attention, layer_norm

STAGES = ("gemms", "+pointwise", "+cache", "+sdpa", "+flex")


def replay_ms(fn: Callable[[], object], device: str, steps: int) -> float:
    """Milliseconds per call of ``fn``: captured once in a CUDA graph and replayed ``steps`` times on CUDA, called
    ``steps`` times on a CPU (after two warm-up calls)."""
    if not device.startswith("cuda"):
        fn(), fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / steps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def chained_us(call: Callable[[int], object], device: str, chain: int, steps: int) -> float:
    """Microseconds per call in a chain of ``call(0), ..., call(chain - 1)``, replayed ``steps`` times from one
    captured graph (:func:`replay_ms`): a call's time with the gap to the next, as inside a decode step. Each call
    should read its own weights or cache (call ``i`` as layer ``i``), or the chain times them from L2."""
    return 1e3 * replay_ms(lambda: [call(i) for i in range(chain)], device, steps) / chain


def row_counts(text: str) -> list[int]:
    """An argparse ``type``: comma-separated row counts, each an integer >= 1 (``--rows 2,16``)."""
    try:
        rows = [int(r) for r in text.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return rows


def kernel_parser(doc: str, chain: bool = True) -> argparse.ArgumentParser:
    """The arguments the fused kernels' benchmarks share: preset, device, rows, replays, JSON output and (``chain``,
    for those that chain calls in one graph) ``--chain``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--preset", default="350m", choices=("tiny", "350m", "760m", "7b"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--rows", type=row_counts, default=None, help="comma-separated row counts (default: 2 and 2 x --candidates)"
    )
    p.add_argument("--candidates", type=at_least(1), default=8)
    if chain:
        p.add_argument("--chain", type=at_least(1), default=24, help="calls per captured graph (one per layer)")
    p.add_argument("--steps", type=at_least(1), default=50, help="graph replays timed per row")
    p.add_argument("--json", default=None)
    return p


def finish_checked(path: str | None, meta: dict, results: list[dict], wrong: int, what: str) -> None:
    """End a benchmark that checks what it times: write ``{"meta", "results"}`` to ``path`` (if given), then exit
    with an error if ``wrong`` of its ``what`` computed wrong results."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {path}")
    if wrong:
        raise SystemExit(f"{wrong} {what} computed wrong results (marked WRONG above)")


def piece(model: CM3Leon, stage: str, rows: int, slots: int, lo: int, hi: int) -> Callable[[], torch.Tensor]:
    """One decode step's work up to ``stage`` of :data:`STAGES`, for ``rows`` rows over ``slots`` cache slots,
    on the model's weights (its own KV cache is not touched)."""
    c, w = model.config, model.wte.weight
    H, D, C = c.n_head, c.head_dim, c.d_model
    level = STAGES.index(stage)
    pointwise, cache, attention = level >= 1, level >= 2, level >= 3
    x0 = torch.randn(rows, 1, C, device=w.device, dtype=w.dtype)
    kv = [torch.zeros(2, rows, H, slots, D, device=w.device, dtype=w.dtype) for _ in range(c.n_layer)]
    pos = torch.tensor([slots // 2], device=w.device)  # a half-filled cache; attention still reads every slot
    valid = torch.arange(slots, device=w.device)[None].expand(rows, slots) <= pos  # (rows, S)
    mask = padding_causal_mask(valid, pos)  # (rows, 1, 1, S)
    head = model.lm_head.weight[lo:hi]
    eps = c.layer_norm_eps

    def step() -> torch.Tensor:
        x = x0  # (R, 1, C)
        block_mask = cache_block_mask(valid, pos) if stage == "+flex" else None  # once per step, as the model does
        for block, cache_l in zip(model.blocks, kv):
            h = layer_norm(x, eps) if pointwise else x
            qkv = F.linear(h, block.attn.qkv.weight)  # (R, 1, 3C)
            if cache:
                q, k, v = (t.view(rows, 1, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))  # (R, H, 1, D)
                cache_l[0][:, :, pos] = k
                cache_l[1][:, :, pos] = v
            if attention:
                if stage == "+flex":
                    y = flex_cached_attention(q, cache_l[0], cache_l[1], block_mask)
                else:
                    y = F.scaled_dot_product_attention(q, cache_l[0], cache_l[1], attn_mask=mask)  # (R, H, 1, D)
                y = y.transpose(1, 2).reshape(rows, 1, C)
            else:
                y = qkv[..., :C]
            y = F.linear(y, block.attn.out_proj.weight)
            x = x + y if pointwise else y
            h = layer_norm(x, eps) if pointwise else x
            h = F.linear(h, block.mlp.fc_in.weight)  # (R, 1, F)
            h = F.linear(F.gelu(h) if pointwise else h, block.mlp.fc_out.weight)
            x = x + h if pointwise else h
        return F.linear(layer_norm(x, eps) if pointwise else x, head)  # (R, 1, hi - lo)

    return step


def prompt_rows(vocab, candidates: int) -> list[list[int]]:
    """The CFG rows of ``candidates`` candidates of one caption: conditional rows, then unconditional ones."""
    prompt = [vocab.num_special + (7 * i) % (vocab.n_text - vocab.num_special) for i in range(PROMPT_LEN)]
    return [image_prompt(vocab, prompt)] * candidates + [unconditional_image_prompt(vocab)] * candidates


def step_ms(model: CM3Leon, vocab, rows: int, mode: str, attention: str, steps: int, warmup: int) -> float:
    """Milliseconds per real decode step (:meth:`Decoder.step`) of ``rows // 2`` candidates with CFG: ``warmup``
    steps, then untimed ones up to where the ``steps`` timed ones are centred on the image's middle, as the pieces'
    half-filled cache and the bound (attention that reads only the filled slots costs more late in an image)."""
    model.set_attention(attention)
    spec = SamplingSpec(method="top_p", streams=2, cfg=3.0, lo=vocab.n_text, hi=vocab.size)
    dec = Decoder(model, spec, prompt_rows(vocab, rows // 2), vocab.image_tokens, seed=0, compile=mode)
    _, feed = dec.prefill()
    for _ in range(max(warmup, (vocab.image_tokens - steps) // 2)):
        _, feed = dec.step(feed)
    sync(dec.device.type)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, feed = dec.step(feed)
    sync(dec.device.type)
    return 1e3 * (time.perf_counter() - t0) / steps


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = replay_ms(lambda: dst.copy_(src), device, 10)
    return 2 * nbytes / (ms / 1e3)


def step_bytes(model: CM3Leon, rows: int, slots: int, filled: int, width: int) -> int:
    """Bytes one step must read: every block's weights, the sampled LM-head rows and the ``filled`` cache slots."""
    c, size = model.config, model.wte.weight.element_size()
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    cache = 2 * c.n_layer * rows * filled * c.d_model
    return size * (c.n_layer * per_block + width * c.d_model + cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--preset", default="350m", choices=tuple(PRESETS))
    p.add_argument("--image-tokens", type=at_least(4), help="codes per image, 4 or more (default: 1024 GPU, 64 CPU)")
    p.add_argument(
        "--candidates", type=at_least(1), default=8, help="candidates of the many-image case (x2 rows with CFG)"
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"real-step modes of {MODES} (default on CUDA: graph, the eager step in one CUDA graph like the pieces, "
        "and fused-graph, the fused Triton step; eager on CPU; benchmarks/generation.py times the compiled modes)",
    )
    p.add_argument("--attention", default="sdpa", help="attention of the real step: sdpa, flex or both")
    p.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated pieces of {STAGES} (default: all on CUDA; no +flex on a CPU, where FlexAttention "
        "outside torch.compile is an unfused reference)",
    )
    p.add_argument("--steps", type=at_least(1), help="timed steps per row (default 200 GPU, 5 CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--json", default="decode_floor.json", help="where to write the results")
    args = p.parse_args()
    device = chosen_device(p, args.device)
    gpu = device.startswith("cuda")
    tokens = args.image_tokens or (1024 if gpu else 64)
    steps = args.steps or (200 if gpu else 5)
    modes = comma_list(p, "--modes", args.modes or ("graph,fused-graph" if gpu else "eager"), MODES)
    stages = comma_list(p, "--stages", args.stages or ",".join(STAGES if gpu else STAGES[:-1]), STAGES)
    attentions = comma_list(p, "--attention", args.attention, ATTENTION_IMPLS)
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
    model, vocab = build(args.preset, tokens, device, dtype[args.dtype])
    prompt_len = max(len(r) for r in prompt_rows(vocab, 1))
    slots = min(model.config.max_seq_len, -(-(prompt_len + tokens) // 64) * 64)  # as Decoder sizes its cache
    bandwidth = copy_bandwidth(device, 1 << (29 if gpu else 26))
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.preset}, {dtype[args.dtype]}, {tokens} tokens "
          f"per image, {slots} cache slots, copy bandwidth {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
    print(f"{'piece':<28} {'rows':>4} {'ms/step':>9} {'s total':>9} {'s/image':>9}")
    results = []

    def report(name: str, rows: int, ms: float) -> None:
        seconds = ms * tokens / 1e3  # the whole decode at this step time: rows // 2 images with CFG
        per_image = seconds / (rows // 2)
        results.append(dict(piece=name, rows=rows, ms_per_step=ms, seconds=seconds, sec_per_image=per_image))
        print(f"{name:<28} {rows:>4} {ms:>9.3f} {seconds:>9.3f} {per_image:>9.3f}", flush=True)

    width = vocab.size - vocab.n_text
    with torch.no_grad():
        for rows in dict.fromkeys((2, 2 * args.candidates)):  # --candidates 1: one row per piece
            mean_filled = prompt_len + tokens // 2
            report("bound", rows, 1e3 * step_bytes(model, rows, slots, mean_filled, width) / bandwidth)
            for stage in stages:
                step = piece(model, stage, rows, slots, vocab.n_text, vocab.size)
                report(stage, rows, replay_ms(step, device, steps))
            for attention in attentions:
                for mode in modes:
                    # compiling / autotuning modes warm up longer; an image of few tokens bounds both counts
                    warmup = min(8 if mode in ("eager", "graph") else 16, (tokens - 2) // 2)
                    timed = min(steps, tokens - warmup - 2)
                    ms = step_ms(model, vocab, rows, mode, attention, steps=timed, warmup=warmup)
                    report(f"step {mode} / {attention}", rows, ms)
    meta = dict(device=device, device_name=name, torch=torch.__version__, preset=args.preset,
                dtype=str(dtype[args.dtype]),
                image_tokens=tokens, slots=slots, copy_bandwidth=bandwidth)  # fmt: skip
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
