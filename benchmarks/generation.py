"""Benchmark text-to-image decoding: seconds per image and ms per token, eager and compiled, against a plain loop.

For each preset (random weights; the timing does not depend on them) it measures, on one device:

* ``1 img``: one image with classifier-free guidance (2 streams: conditional + ``<mask>``), top-p sampling;
* ``8 img``: eight candidates of one prompt with CFG (16 streams), in one batch;

with :func:`cm3leon_lightning.generation.generate_image` in each decode-step mode of ``--modes`` (eager; on GPU also
the fused Triton step in one captured CUDA graph, ``torch.compile(mode="reduce-overhead")`` and the eager step in one
captured CUDA graph; see ``generation/graphs.py``) and each attention implementation of ``--attention``
(``sdpa``, ``flex``); the fused modes once per set of launch options of ``--fused-options`` (e.g.
``base,prefetch,pdl+splits+prefetch``, see ``model/fused_launch.py``; default the environment's); and a plain reference
loop in the same run:
no KV cache (the whole sequence re-run every token), the two CFG streams as two separate forwards, and sampling with
``torch.multinomial`` followed by ``.item()`` (a host sync per token). The reference runs one image only and at most
``--reference-tokens`` tokens (its cost grows quadratically, so its ms/token is a lower bound for longer images).
These rows exclude VQGAN decoding and CLIP re-ranking. With ``--rerank`` (default on GPU at 1024 tokens) a row
per preset, before the reference's, times the issue's whole "8 candidates with CFG plus re-ranking": decoding in the
first mode, an f8_8192 VQGAN decoding the 8 images to 256x256 and a ViT-B-32 CLIP scoring them (random weights: the
timing depends only on the architectures).

Usage::

    python benchmarks/generation.py                      # CUDA: tiny + 350m, 1024 tokens, bf16 (~3 min on an H100)
    python benchmarks/generation.py --device cpu          # CPU: fewer tokens per image (said in the output)
    python benchmarks/generation.py --presets 350m --image-tokens 256 --json out.json
    python benchmarks/generation.py --presets 350m --modes reduce-overhead --attention sdpa,flex
    python benchmarks/generation.py --presets 350m --modes fused-graph --fused-options base,prefetch,pdl,splits

``benchmarks/decode_profile.py`` shows where the time of one decode step goes, kernel by kernel.

Prints a table and writes the numbers as JSON (``--json``, default ``generation_benchmark.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm3leon_lightning.config import PRESETS, CM3LeonConfig
from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.generate import image_prompt, unconditional_image_prompt
from cm3leon_lightning.generation.graphs import FUSED_MODES, MODES
from cm3leon_lightning.model import ATTENTION_IMPLS, CM3Leon
from cm3leon_lightning.model.fused_launch import OPTION_ENV, FusedOptions, use_fused_options
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

PROMPT_LEN = 24  # text tokens of the caption
ALL_OPTIONS = FusedOptions(**dict.fromkeys(OPTION_ENV, True))  # every launch option on: their labels


def grid_for(tokens: int) -> tuple[int, int]:
    """A grid with ``tokens`` cells: square when possible, else ``1 x tokens``."""
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def build(preset: str, image_tokens: int, device: str, dtype: torch.dtype) -> tuple[CM3Leon, MultimodalVocab]:
    """A randomly initialised model of ``preset`` and a vocabulary whose images have ``image_tokens`` codes."""
    gh, gw = grid_for(image_tokens)
    if preset == "tiny":
        vocab = MultimodalVocab(n_text=256, n_codes=256, grid_h=gh, grid_w=gw)
    else:
        vocab = MultimodalVocab(n_text=56320, n_codes=8192, grid_h=gh, grid_w=gw)
    base = CM3LeonConfig.from_preset(preset)
    max_seq = max(base.max_seq_len, PROMPT_LEN + image_tokens + 8)
    cfg = CM3LeonConfig.from_preset(preset, vocab_size=vocab.padded_size, max_seq_len=max_seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = CM3Leon(cfg)
    return model.to(dtype).eval(), vocab


def comma_list(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """The comma-separated values of ``flag``, each one of ``allowed`` (else an argparse error naming it)."""
    values = [v.strip() for v in text.split(",")]
    for v in values:
        if v not in allowed:
            p.error(f"{flag}: unknown value {v!r}; choose from {allowed}")
    return values


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``low`` (else an error naming the flag and the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def chosen_device(p: argparse.ArgumentParser, text: str) -> str:
    """The device of ``--device``: ``auto`` is ``cuda`` when torch sees a CUDA device, else ``cpu``; a CUDA device
    torch does not see is an argparse error naming the flag (else a traceback from deep in torch)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {text}: torch sees no CUDA device here")
    return text


def fused_option_list(p: argparse.ArgumentParser, text: str | None) -> list[str | None]:
    """The labels of ``--fused-options`` (``[None]``: the environment's options), each checked by
    :meth:`FusedOptions.parse` (else an argparse error naming it)."""
    if text is None:
        return [None]
    labels = [v.strip() for v in text.split(",")]
    for label in labels:
        try:
            FusedOptions.parse(label)
        except ValueError as e:
            p.error(f"--fused-options: {e}")
    return labels


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds (after ``fn`` was called once to warm up)."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def reference_loop(
    model: CM3Leon, vocab: MultimodalVocab, prompt: list[int], steps: int, cfg: float, seed: int
) -> list[int]:
    """Plain decoding: no cache, conditional and unconditional as two forwards, multinomial + ``.item()`` per token."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    cond = torch.tensor([image_prompt(vocab, prompt)], device=device)
    uncond = torch.tensor([unconditional_image_prompt(vocab)], device=device)
    out = []
    for _ in range(steps):
        lc = model(cond)[0, -1, vocab.n_text : vocab.size].float()
        lu = model(uncond)[0, -1, vocab.n_text : vocab.size].float()
        logits = lu + cfg * (lc - lu)
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < 0.9
        p = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
        tok = int(torch.multinomial(p, 1, generator=gen).item()) + vocab.n_text  # host sync
        out.append(tok)
        nxt = torch.tensor([[tok]], device=device)
        cond, uncond = torch.cat([cond, nxt], 1), torch.cat([uncond, nxt], 1)
    return out


def bench_preset(
    preset: str, args: argparse.Namespace, device: str, dtype: torch.dtype, emit: Callable[[dict], None]
) -> None:
    """Every row of one preset, each handed to ``emit`` as soon as it is measured. A mode (or set of launch options)
    that fails gives a row with its ``error`` and the next one runs: one broken option set must not cost the rows
    after it, on a GPU whose minutes are counted."""
    tokens = args.image_tokens
    model, vocab = build(preset, tokens, device, dtype)
    prompt = [vocab.num_special + (7 * i) % (vocab.n_text - vocab.num_special) for i in range(PROMPT_LEN)]
    eager_codes: dict[int, torch.Tensor] = {}
    for attention in args.attention:
        model.set_attention(attention)
        for mode in args.modes:
            for label in args.fused_options if mode in FUSED_MODES else [None]:
                name = mode_name(mode, label)
                for n in dict.fromkeys((1, args.candidates)):  # --candidates 1: one row
                    try:
                        with options_for(label):
                            row = bench_mode(model, vocab, prompt, mode, n, args, device)
                    except Exception as err:  # recorded in its row; the next one runs
                        emit(failed_row(preset, name, attention, n, tokens, err))
                        continue
                    codes = row.pop("codes")
                    eager_codes.setdefault(n, codes)  # the first mode (eager by default) is the reference
                    same = float((codes == eager_codes[n]).float().mean())
                    emit(dict(preset=preset, mode=name, attention=attention, **row, same_codes=same))
    model.set_attention(args.attention[0])
    if args.rerank:
        try:
            with options_for(args.fused_options[0]):
                row = bench_rerank(model, vocab, prompt, preset, args, device, dtype)
        except Exception as err:  # recorded in its row
            row = failed_row(preset, rerank_name(args), args.attention[0], args.candidates, vocab.image_tokens, err)
        if row is not None:
            emit(row)
    ref_tokens = min(tokens, args.reference_tokens)
    if ref_tokens > 0:
        reference_loop(model, vocab, prompt, min(ref_tokens, 4), 3.0, 0)  # warm-up
        sec = timed(lambda: reference_loop(model, vocab, prompt, ref_tokens, 3.0, 0), device, 1)
        emit(dict(preset=preset, mode="reference", attention="sdpa", images=1, streams=2, tokens=ref_tokens,
                  seconds=sec, sec_per_image=sec * tokens / ref_tokens, ms_per_token=1e3 * sec / ref_tokens,
                  warmup_seconds=0.0, same_codes=float("nan"), extrapolated=ref_tokens < tokens))  # fmt: skip
    model.clear_kv_cache()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def failed_row(preset: str, mode: str, attention: str, n: int, tokens: int, err: Exception) -> dict:
    """The row of a measurement that raised ``err``: no figures, the error named."""
    nan = float("nan")
    return dict(preset=preset, mode=mode, attention=attention, images=n, streams=2 * n, tokens=tokens, seconds=nan,
                sec_per_image=nan, ms_per_token=nan, warmup_seconds=nan, same_codes=nan,
                error=f"{type(err).__name__}: {err}")  # fmt: skip


def mode_name(mode: str, label: str | None) -> str:
    """A row's mode: ``mode``, or ``mode[label]`` when run under the fused launch options ``label``."""
    return mode if label is None else f"{mode}[{label}]"


def rerank_name(args: argparse.Namespace) -> str:
    """The re-ranking row's mode: the first mode (under the first launch options, if fused) with ``+rerank``."""
    mode = args.modes[0]
    return mode_name(mode, args.fused_options[0] if mode in FUSED_MODES else None) + "+rerank"


def options_for(label: str | None) -> contextlib.AbstractContextManager:
    """The fused kernels' launch options named by ``label`` for the block (None: the environment's)."""
    return contextlib.nullcontext() if label is None else use_fused_options(FusedOptions.parse(label))


def bench_mode(model: CM3Leon, vocab: MultimodalVocab, prompt: list[int], mode: str, n: int, args, device: str) -> dict:
    """Time ``n`` candidates with CFG in decode-step ``mode``, after one warm-up run (compilation, graph capture)."""
    kw = dict(num_samples=n, method="top_p", cfg=3.0, seed=0, compile=mode)
    t0 = time.perf_counter()
    codes = generate_image(model, vocab, [prompt], **kw).codes
    warm = time.perf_counter() - t0
    sec = timed(lambda: generate_image(model, vocab, [prompt], **kw), device, args.repeats)
    tokens = args.image_tokens
    return dict(images=n, streams=2 * n, tokens=tokens, seconds=sec, sec_per_image=sec / n,
                ms_per_token=1e3 * sec / tokens, warmup_seconds=warm, codes=codes)  # fmt: skip


def bench_rerank(
    model: CM3Leon, vocab: MultimodalVocab, prompt: list[int], preset: str, args, device: str, dtype: torch.dtype
) -> dict | None:
    """Time 8 candidates with CFG, decoded to pixels by an f8_8192 VQGAN and re-ranked by a ViT-B-32 CLIP
    (None, said on stdout, when open_clip_torch is not installed)."""
    import warnings

    from cm3leon_lightning.generation.rerank import rerank
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    try:
        from cm3leon_lightning.retrieval.encoder import ClipEncoder
    except ImportError as e:
        print(f"no re-ranking row: {e} (install open_clip_torch)", flush=True)
        return None

    vqgan = VQGAN.from_name("f8_8192").to(device=device, dtype=dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised": intended, only the architecture is timed
        clip = ClipEncoder("ViT-B-32", pretrained=None, device=device)
    mode, n = args.modes[0], args.candidates

    def run() -> None:
        with torch.no_grad():
            out = generate_image(model, vocab, [prompt], num_samples=n, cfg=3.0, seed=0, compile=mode, vqgan=vqgan)
            rerank(clip, ["a caption of eight words for the clip model"], out.images, out.codes, keep=1)

    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    sec = timed(run, device, args.repeats)
    tokens = vocab.image_tokens
    return dict(preset=preset, mode=rerank_name(args), attention=args.attention[0], images=n, streams=2 * n,
                tokens=tokens, seconds=sec, sec_per_image=sec / n, ms_per_token=1e3 * sec / tokens,
                warmup_seconds=warm, same_codes=float("nan"))  # fmt: skip


HEADER = f"{'preset':<7} {'mode':<34} {'attn':<5} {'images':>6} {'streams':>7} {'tokens':>6} {'s total':>9} " \
         f"{'s/image':>9} {'ms/token':>9} {'warm-up s':>9} {'= first':>7}"  # fmt: skip


def fmt_row(r: dict) -> str:
    """One row of the table (a failed row: its error in place of the figures)."""
    head = f"{r['preset']:<7} {r['mode']:<34} {r['attention']:<5} {r['images']:>6} {r['streams']:>7} {r['tokens']:>6}"
    if "error" in r:
        return f"{head} FAILED {r['error']}"
    note = " (s/image extrapolated linearly from fewer tokens: a lower bound)" if r.get("extrapolated") else ""
    return (
        f"{head} {r['seconds']:>9.3f} {r['sec_per_image']:>9.3f} {r['ms_per_token']:>9.2f} "
        f"{r['warmup_seconds']:>9.1f} {r['same_codes']:>7.3f}{note}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--presets", default="tiny,350m", help="comma-separated presets")
    p.add_argument("--image-tokens", type=at_least(1), help="codes per image (default: 1024 GPU, 16 CPU)")
    p.add_argument("--candidates", type=at_least(1), default=8, help="candidates of the many-image case")
    p.add_argument("--reference-tokens", type=at_least(0), help="tokens of the plain loop (default 256 GPU, 8 CPU)")
    p.add_argument("--repeats", type=at_least(1), help="timed repeats, best taken (default 3 GPU, 1 CPU)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated decode-step modes of {MODES} (default: eager,fused-graph,reduce-overhead,graph on "
        "CUDA; eager on CPU, add inductor to compile there)",
    )
    p.add_argument(
        "--fused-options",
        default=None,
        help="comma-separated launch options of the fused modes, each run in turn: 'base' (none) or of "
        f"{', '.join(ALL_OPTIONS.label.split('+'))} joined by + (e.g. base,persistent,pdl+splits+prefetch; default: "
        f"what {', '.join(OPTION_ENV.values())} say)",
    )
    p.add_argument(
        "--attention",
        default="sdpa",
        help=f"comma-separated attention implementations over the KV cache, of {ATTENTION_IMPLS}",
    )
    p.add_argument(
        "--rerank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time 8 candidates + VQGAN decoding + CLIP re-ranking (default: on GPU with 1024 image tokens)",
    )
    p.add_argument(
        "--sdpa",
        choices=["default", "efficient", "math"],
        default="default",
        help="restrict scaled_dot_product_attention to one backend (plus math as fallback) for the whole run",
    )
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default="generation_benchmark.json", help="where to write the results")
    args = p.parse_args()
    device = chosen_device(p, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.startswith("cuda")
    args.image_tokens = args.image_tokens or (1024 if gpu else 16)
    args.reference_tokens = args.reference_tokens if args.reference_tokens is not None else (256 if gpu else 8)
    args.repeats = args.repeats or (3 if gpu else 1)
    default_modes = "eager,fused-graph,reduce-overhead,graph" if gpu else "eager"
    presets = comma_list(p, "--presets", args.presets, tuple(PRESETS))
    args.modes = comma_list(p, "--modes", args.modes or default_modes, MODES)
    args.attention = comma_list(p, "--attention", args.attention, ATTENTION_IMPLS)
    args.fused_options = fused_option_list(p, args.fused_options)
    if args.rerank is None:
        args.rerank = gpu and args.image_tokens == 1024
    elif args.rerank and args.image_tokens != 1024:
        p.error("--rerank decodes with the f8_8192 VQGAN: it needs --image-tokens 1024")
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
    dtype = dtype[args.dtype]
    name = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    note = "" if args.image_tokens == 1024 else " (the paper's images have 1024; fewer here to fit the time)"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {dtype}, "
          f"{args.image_tokens} image tokens per image{note}")  # fmt: skip
    meta = dict(device=device, device_name=name, torch=torch.__version__, dtype=str(dtype),
                image_tokens=args.image_tokens, candidates=args.candidates, repeats=args.repeats,
                threads=torch.get_num_threads(), sdpa=args.sdpa, attention=args.attention)  # fmt: skip
    print(HEADER)
    rows: list[dict] = []

    def emit(row: dict) -> None:  # print it, and rewrite the JSON: a run cut short keeps every row it measured
        rows.append(row)
        print(fmt_row(row), flush=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)

    backends = {"efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], "math": [SDPBackend.MATH]}
    with sdpa_kernel(backends[args.sdpa]) if args.sdpa != "default" else contextlib.nullcontext():
        for preset in presets:
            bench_preset(preset, args, device, dtype, emit)
    print(f"wrote {args.json}")
    failed = [r["mode"] for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} rows failed (marked FAILED above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
