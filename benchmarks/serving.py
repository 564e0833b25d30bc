"""Benchmark ``cm3leon serve``'s batching: R concurrent requests decoded one at a time vs in one batch.

It writes a random-weight checkpoint of ``--preset`` and a text tokenizer (for presets other than ``tiny``, a BPE of the
paper's 56,320 tokens trained on random words, so the output head has its real size) to a temporary directory, loads
them through :class:`~cm3leon_lightning.serve.CM3LeonAPI` exactly as the server does, and times
:meth:`CM3LeonAPI.predict` on R requests with CFG (2 streams each): once per request (what a server with
``--max-batch-size 1`` does) and once for all R together (what it does when they arrive within ``--batch-timeout``).
HTTP and VQGAN decoding are excluded: this measures what batching changes. With ``--method greedy`` the batched codes
are compared with the one-at-a-time codes (``same_codes``). ``--kind infill`` sends caption-infilling requests
instead (``"a few words <mask> more words"``, ``--span-tokens`` new tokens at most, no guidance): one row per sample.

Usage::

    python benchmarks/serving.py                                  # CUDA: 350m, 8 requests, 1024 tokens, bf16
    python benchmarks/serving.py --device cpu --preset tiny       # CPU: 16 image tokens (said in the output)
    python benchmarks/serving.py --requests 16 --num-samples 2 --json out.json
    python benchmarks/serving.py --kind infill --num-samples 4    # infill requests (4 fillings each)

Prints a table and writes the numbers as JSON (``--json``, default ``serving_benchmark.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from generation import at_least, chosen_device  # benchmarks/generation.py, beside this script

from cm3leon_lightning.config import PRESETS, CM3LeonConfig
from cm3leon_lightning.generation.graphs import MODES
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.serve import CM3LeonAPI, Rejected
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab


def random_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Lines of 12 random lowercase words (from 30,000), enough for a BPE of the paper's size."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(30000)]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_lines)]


def write_assets(root: Path, preset: str, image_tokens: int) -> tuple[Path, Path]:
    """A tokenizer and a random-weight ``CM3LeonModule`` checkpoint of ``preset`` with ``image_tokens`` codes per
    image; returns their paths."""
    side = math.isqrt(image_tokens)
    grid = (side, side) if side * side == image_tokens else (1, image_tokens)
    tiny = preset == "tiny"
    tok = TextTokenizer.train(random_corpus(2000 if tiny else 40000), vocab_size=300 if tiny else 56320)
    tok.save(root / "tok")
    vocab = tok.make_vocab(n_codes=256 if tiny else 8192, grid_h=grid[0], grid_w=grid[1])
    # the tokenizer's hash, as training records it: else loading warns that the tokenizer cannot be checked
    vocab = MultimodalVocab.from_dict({**vocab.to_dict(), "text_tokenizer_sha256": tok.sha256})
    max_seq = max(CM3LeonConfig.from_preset(preset).max_seq_len, 64 + image_tokens)
    torch.manual_seed(0)
    module = CM3LeonModule(preset=preset, vocab=vocab.to_dict(), max_seq_len=max_seq)
    module.configure_model()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, root / "model.ckpt")
    return root / "model.ckpt", root / "tok"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up call, and the last call's result."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def answered(outs: list, what: str) -> list:
    """``outs``, the answers of :meth:`CM3LeonAPI.predict`, when none is a :class:`Rejected` (a decode the API
    refused or that failed returns one fast, which would be timed as a decode); else exit naming ``what`` and the
    first rejection."""
    rejected = [o for o in outs if isinstance(o, Rejected)]
    if rejected:
        raise SystemExit(f"{what}: {len(rejected)} of {len(outs)} requests rejected, nothing measured: "
                         f"{rejected[0].status} {rejected[0].detail}")  # fmt: skip
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--kind", default="image", choices=["image", "infill"], help="text-to-image or infill requests")
    p.add_argument(
        "--span-tokens", type=at_least(1), default=16, help="--kind infill: the most tokens of a filled span"
    )
    p.add_argument(
        "--preset", default=None, choices=tuple(PRESETS), help="model preset (default: 350m on CUDA, tiny on CPU)"
    )
    p.add_argument("--requests", type=at_least(1), default=8, help="concurrent requests R")
    p.add_argument("--num-samples", type=at_least(1), default=1, help="candidates per request")
    p.add_argument("--image-tokens", type=at_least(1), default=None, help="codes per image (default: 1024 GPU, 16 CPU)")
    p.add_argument("--method", default="top_p", choices=["greedy", "top_p"], help="greedy also checks equal codes")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument(
        "--compile", default="auto", choices=("auto", *MODES), help="decode-step mode (auto: the fastest available)"
    )
    p.add_argument("--repeats", type=at_least(1), default=None, help="timed repeats, best taken (default 3 GPU, 1 CPU)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default="serving_benchmark.json", help="where to write the results")
    args = p.parse_args()
    device = chosen_device(p, args.device)
    cuda = device.startswith("cuda")
    preset = args.preset or ("350m" if cuda else "tiny")
    tokens = args.image_tokens or (1024 if cuda else 16)
    repeats = args.repeats or (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok = write_assets(Path(tmp), preset, tokens)
        compile = None if args.compile == "auto" else args.compile
        api = CM3LeonAPI(str(ckpt), str(tok), max_num_samples=max(16, args.num_samples), dtype=args.dtype,
                         compile=compile, max_batch_size=args.requests)  # fmt: skip
        api.setup(device)
    prompts = [" ".join(line.split()[:8]) for line in random_corpus(args.requests, seed=1)]
    if args.kind == "infill":  # a span in the middle of each caption; the output key is "texts"
        prompts = [" ".join([*p.split()[:3], "<mask>", *p.split()[3:]]) for p in prompts]
        body = {"num_samples": args.num_samples, "method": args.method, "max_span_tokens": args.span_tokens}
        jobs = [api.decode_request({"infill": prompt, **body}) for prompt in prompts]
    else:
        body = {"num_samples": args.num_samples, "method": args.method, "cfg": args.cfg}
        jobs = [api.decode_request({"prompt": prompt, **body}) for prompt in prompts]
    bad = [j for j in jobs if not hasattr(j, "ids")]
    if bad:
        raise SystemExit(f"a request was rejected: {bad[0]}")

    rows = []
    alone_s, alone = timed(lambda: answered([api.predict(j) for j in jobs], "one at a time"), device, repeats)
    batch_s, batched = timed(lambda: answered(api.predict(jobs), "batched"), device, repeats)
    same, key = None, "texts" if args.kind == "infill" else "codes"
    if args.method == "greedy":
        same = sum(a[key] == b[key] for a, b in zip(alone, batched)) / len(jobs)
    streams = 2 if args.cfg != 1.0 and args.kind == "image" else 1
    if args.kind == "infill":
        tokens = args.span_tokens  # at most: a span may stop earlier
    per_request = streams * args.num_samples  # guidance streams x candidates: rows of one request's decode
    for mode, seconds, rows_per_decode in (("one at a time", alone_s, per_request),
                                           ("batched", batch_s, per_request * args.requests)):  # fmt: skip
        rows.append({
            "preset": preset, "kind": args.kind, "mode": mode, "requests": args.requests,
            "num_samples": args.num_samples, "image_tokens": tokens, "rows_per_decode": rows_per_decode,
            "seconds": seconds,
            "requests_per_s": args.requests / seconds, "ms_per_token": 1000 * seconds / (args.requests * tokens),
            "same_codes": same,
        })  # fmt: skip

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    dtype = str(next(api.model.parameters()).dtype).removeprefix("torch.")
    what = (
        f"infill, spans of at most {tokens} tokens"
        if args.kind == "infill"
        else f"{tokens} image tokens, CFG {args.cfg}"
    )
    print(f"{preset} on {device} ({name}), {dtype}, {what}, {args.requests} requests x {args.num_samples} samples, "
          f"method {args.method}")  # fmt: skip
    print(f"{'mode':<14} {'rows/decode':>11} {'seconds':>9} {'req/s':>8} {'ms/token':>9}")
    for r in rows:
        print(f"{r['mode']:<14} {r['rows_per_decode']:>11} {r['seconds']:>9.3f} {r['requests_per_s']:>8.2f} "
              f"{r['ms_per_token']:>9.3f}")  # fmt: skip
    print(f"batching speed-up: {alone_s / batch_s:.2f}x" + ("" if same is None else f"; same {key}: {same:.0%}"))
    meta = {"device": device, "device_name": name, "dtype": dtype, "torch": torch.__version__, "method": args.method}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
