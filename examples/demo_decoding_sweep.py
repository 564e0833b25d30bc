"""Choose the demo's decoding settings on validation prompts: CFG scale x top-p on a finished demo run.

The report's prompts use seed ``seed + 1`` (seen combinations) and the held-out split; this sweep draws its own
prompts with another seed (default 7; the run's own seed and seed + 1 are refused), so the settings it picks are not
fitted to the figures the report shows.
``cm3leon_lightning.demo_eval.METHODS`` holds the chosen values; docs/architecture.md records the sweep.

Usage::

    python examples/demo_decoding_sweep.py runs/demo --prompts 24 --samples 8
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from cm3leon_lightning import VQGAN, TextTokenizer, generate_image, load_checkpoint
from cm3leon_lightning.data.shapes import generate_pairs
from cm3leon_lightning.demo_cli import non_negative_int, positive_int
from cm3leon_lightning.demo_eval import attribute_scores, to_uint8
from cm3leon_lightning.demo_report import stage_results


def run_seed(run: Path) -> int | None:
    """The seed the demo run was made with (``demo.json``, else ``metrics.json``), or None if neither records it."""
    for name in ("demo.json", "metrics.json"):
        path = run / name
        if path.is_file():
            seed = json.loads(path.read_text()).get("seed")
            if seed is not None:
                return int(seed)
    return None


def as_float(text: str) -> float:
    """``text`` as a float; NaN for what does not parse (the argparse types below then refuse it)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def cfg_scale(text: str) -> float:
    """argparse type: a finite CFG scale (a NaN or infinite scale turns every guided logit into NaN)."""
    if not math.isfinite(value := as_float(text)):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def top_p_mass(text: str) -> float:
    """argparse type: a nucleus mass in (0, 1] (argparse names the flag in its error)."""
    if not 0 < (value := as_float(text)) <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[tuple[float, float], dict[str, float]]:
    """Score every (CFG scale, top-p) pair on fresh seen-combination prompts and print one line per pair.

    Returns:
        ``(cfg, top_p)`` -> attribute accuracy (:func:`~cm3leon_lightning.demo_eval.attribute_scores`).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished demo run directory (runs/demo)")
    p.add_argument(
        "--prompts", type=positive_int, default=24, help="validation prompts (seen colour-shape combinations)"
    )
    p.add_argument("--samples", type=positive_int, default=8, help="images per prompt and setting")
    p.add_argument(
        "--seed", type=non_negative_int, default=7, help="prompt seed (the report uses seed + 1 of the demo's)"
    )
    p.add_argument("--cfg", type=cfg_scale, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="CFG scales")
    p.add_argument("--top-p", type=top_p_mass, nargs="+", default=[0.9, 0.6], help="nucleus masses")
    args = p.parse_args(argv)
    try:
        stage_results(args.run, ("tokenizer", "vqgan", "train"))  # finished, or an error naming what to run
    except FileNotFoundError as e:
        p.error(f"run: {e}")
    demo_seed = run_seed(args.run)
    if demo_seed is not None and args.seed in (demo_seed, demo_seed + 1):
        p.error(
            f"--seed {args.seed}: the run's training pairs use seed {demo_seed} and its report's prompts seed "
            f"{demo_seed + 1}; pick another seed so the sweep's prompts are neither"
        )
    torch.set_num_threads(1)
    model, vocab = load_checkpoint(args.run / "train" / "cm3leon.ckpt")  # the run's own files, wherever it now lies
    tok = TextTokenizer.load(args.run / "tokenizer" / "tokenizer.json")
    vqgan = VQGAN.from_pretrained(args.run / "vqgan" / "model").eval()
    size = vqgan.config.resolution
    pairs = list(generate_pairs(args.prompts, "train", size, args.seed))
    ids, scenes = tok.encode_batch([q.caption for q in pairs]), [q.scene for q in pairs]
    print(f"{args.prompts} prompts x {args.samples} samples; share of images with every attribute right")
    results = {}
    for cfg in args.cfg:
        for top_p in args.top_p:
            gen = generate_image(model.eval(), vocab, ids, num_samples=args.samples, cfg=cfg, top_p=top_p, seed=0,
                                 vqgan=vqgan, compile=False)  # fmt: skip
            wanted = [s for s in scenes for _ in range(args.samples)]
            scores = attribute_scores(to_uint8(gen.images.flatten(0, 1)), wanted)
            results[(cfg, top_p)] = scores
            shown = "  ".join(f"{k} {scores[k]:.3f}" for k in ("all", "colour", "shape", "position", "count"))
            print(f"cfg {cfg:<4} top-p {top_p:<4} {shown}")
    return results


if __name__ == "__main__":
    main()
