"""Choose the demo's decoding settings on validation prompts: CFG scale x top-p on a finished demo run.

The report's prompts use seed ``seed + 1`` (seen combinations) and the held-out split; this sweep draws its own
prompts with another seed (default 7), so the settings it picks are not fitted to the figures the report shows.
``cm3leon_lightning.demo_eval.METHODS`` holds the chosen values; docs/architecture.md records the sweep.

Usage::

    python examples/demo_decoding_sweep.py runs/demo --prompts 24 --samples 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cm3leon_lightning.data.shapes import generate_pairs
from cm3leon_lightning.demo_eval import attribute_scores, to_uint8
from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished demo run directory (runs/demo)")
    p.add_argument("--prompts", type=int, default=24, help="validation prompts (seen colour-shape combinations)")
    p.add_argument("--samples", type=int, default=8, help="images per prompt and setting")
    p.add_argument("--seed", type=int, default=7, help="prompt seed (the report uses seed + 1 of the demo's)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="CFG scales")
    p.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.6], help="nucleus masses")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, vocab = load_checkpoint(args.run / "train" / "cm3leon.ckpt")
    tok = TextTokenizer.load(args.run / "tokenizer" / "tokenizer.json")
    vqgan = VQGAN.from_pretrained(args.run / "vqgan" / "model").eval()
    size = vqgan.config.resolution
    pairs = list(generate_pairs(args.prompts, "train", size, args.seed))
    ids, scenes = tok.encode_batch([q.caption for q in pairs]), [q.scene for q in pairs]
    print(f"{args.prompts} prompts x {args.samples} samples; share of images with every attribute right")
    for cfg in args.cfg:
        for top_p in args.top_p:
            gen = generate_image(model.eval(), vocab, ids, num_samples=args.samples, cfg=cfg, top_p=top_p, seed=0,
                                 vqgan=vqgan, compile=False)  # fmt: skip
            wanted = [s for s in scenes for _ in range(args.samples)]
            scores = attribute_scores(to_uint8(gen.images.flatten(0, 1)), wanted)
            shown = "  ".join(f"{k} {scores[k]:.3f}" for k in ("all", "colour", "shape", "position", "count"))
            print(f"cfg {cfg:<4} top-p {top_p:<4} {shown}")


if __name__ == "__main__":
    main()
