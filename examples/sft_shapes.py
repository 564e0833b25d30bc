"""Instruction-tune the demo's CM3Leon on shapes captioning and VQA, and measure it before and after (paper section 4).

On a finished demo run (``make demo``), on a CPU, in a few minutes:

1. writes instruction-tuning examples as JSON lines: captions (``caption`` task), questions about one-shape
   scenes (``vqa`` task: colour, shape, size, position) and recolouring edits of them (``edit`` task: source image,
   ``make it <colour>``, target image), images as PNG files, all from the seen colour-shape combinations with a seed
   of their own;
2. ``cm3leon prepare --source sft`` with the demo's tokenizer, VQGAN and CLIP (no retrieval; three datasets balanced);
3. ``cm3leon fit --config configs/experiments/demo_shapes.yaml --config configs/experiments/sft.yaml`` with
   ``--model.init_args.init_from <demo checkpoint>`` (the demo's schedule scaled down 10x, as the paper's SFT LR is
   ~10x below its pretraining LR);
4. answers the questions and captions images of fresh scenes, seen and held-out (zero-shot) combinations, with the
   demo checkpoint and with the fine-tuned one, greedy, the VQA prompt ``Question: ... Answer:`` of the VQA callback,
   in both prompt layouts: the infilled span after the image (caption-first training) and the text after the image
   (image-first documents, ``--image-first`` of them in the fine-tuning data); and recolours seen one-shape scenes
   with ``edit_image``, judged by the attribute checker.

The demo's tokenizer is trained on these instruction texts too (``shapes.instruction_texts``), as a real pretraining
tokenizer covers the words of the instructions; the demo's model has never seen them before fine-tuning.

Writes ``<out>/report.json`` and prints a table. Usage::

    python examples/sft_shapes.py runs/demo --out runs/sft

``<out>/args.json`` records the arguments. A rerun into the same ``--out`` reuses its data (and resumes its
``cm3leon prepare``) and fits and evaluates again, with the fit's and evaluation's arguments it is given; one asking
for other data (the demo run, ``--pairs``, ``--seed``) is refused before it writes anything: give another ``--out``,
or ``--fresh`` to delete the old output first. A fit stopped by Ctrl-C or ``kill`` says so in one line and exits
with status 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cm3leon_lightning import VQGAN, SFTSource, TextTokenizer, edit_image, generate_text, load_checkpoint, prepare
from cm3leon_lightning.cli import stopped_status
from cm3leon_lightning.data import shapes
from cm3leon_lightning.demo import CONFIG_DIR, MAX_SEED
from cm3leon_lightning.demo_cli import positive_int
from cm3leon_lightning.demo_eval import attribute_scores, caption_scores, to_uint8
from cm3leon_lightning.demo_report import stage_results
from cm3leon_lightning.demo_stages import fit_with_cli
from cm3leon_lightning.files import ARGS_FILE, check_output_dir, make_output_dir, write_text_whole
from cm3leon_lightning.generation.generate import TEXT_LAYOUTS as LAYOUTS


def one_shape_scenes(n: int, split: str, seed: int) -> list[shapes.Scene]:
    """``n`` seeded scenes of one shape each, of the ``split``'s colour-shape combinations."""
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, split, two_shape_prob=0.0) for _ in range(n)]


def write_sft_data(folder: Path, n_pairs: int, image_size: int, seed: int) -> dict[str, int]:
    """Caption, VQA and editing examples (JSON lines) with their PNG images in ``folder``; returns lines per file.

    An edit recolours a one-shape scene (``shapes.recolour``); source and target are drawn with the same jitter, so
    only the colour differs.
    """
    (folder / "img").mkdir(parents=True, exist_ok=True)
    captions, vqa, edits = [], [], []
    for i, pair in enumerate(shapes.generate_pairs(n_pairs, "train", image_size, seed)):
        Image.fromarray(pair.image).save(folder / "img" / f"{i}.png")
        captions.append({"task": "caption", "image": f"img/{i}.png", "caption": pair.caption})
        for question, answer in shapes.questions(pair.scene).values():
            vqa.append({"task": "vqa", "image": f"img/{i}.png", "question": question, "answer": answer})
        if len(pair.scene.shapes) == 1:
            instruction, target = shapes.recolour(pair.scene, np.random.default_rng([seed, i]))
            for name, scene in (("src", pair.scene), ("tgt", target)):
                image = shapes.render(scene, image_size, np.random.default_rng([seed, i, 1]))
                Image.fromarray(image).save(folder / "img" / f"{i}-{name}.png")
            edits.append({"task": "edit", "image": f"img/{i}-src.png", "instruction": instruction,
                          "target": f"img/{i}-tgt.png"})  # fmt: skip
    for name, lines in (("captions", captions), ("vqa", vqa), ("edits", edits)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"captions": len(captions), "vqa": len(vqa), "edits": len(edits)}


DATA_ARGS = {"run": "run", "pairs": "--pairs", "seed": "--seed", "image_size": "image size (the run's VQGAN's)"}


def prepare_out(out: Path, data: dict[str, Any], fresh: bool) -> None:
    """Check that ``out`` is new, empty, or an output of this example made from the same ``data`` settings (the keys
    of :data:`DATA_ARGS`, recorded in its ``args.json``); with ``fresh``, delete such an output whatever its settings
    (:func:`~cm3leon_lightning.files.check_output_dir`: rewriting another run's data would leave it neither run's, and
    ``cm3leon prepare`` refuses the changed input)."""
    check_output_dir(out, "data", data, DATA_ARGS, fresh, "examples/sft_shapes.py", "SFT data",
                     "its data and what was prepared from it")  # fmt: skip


def normalise(text: str) -> str:
    """Lower case, no surrounding spaces or final full stop."""
    return text.strip().lower().rstrip(".").strip()


@torch.no_grad()
def evaluate(ckpt: Path, tok: TextTokenizer, vqgan: VQGAN, scenes: dict[str, list], size: int) -> dict[str, Any]:
    """Per split and prompt layout: VQA accuracy per question type, caption accuracy (plain and instructed)."""
    model, vocab = load_checkpoint(ckpt)
    out: dict[str, Any] = {}
    for split, split_scenes in scenes.items():
        renders = np.stack([shapes.render(sc, size, np.random.default_rng(i)) for i, sc in enumerate(split_scenes)])
        codes = vqgan.encode(torch.from_numpy(renders).permute(0, 3, 1, 2).contiguous())  # (N, grid_h * grid_w)
        truth = [shapes.questions(sc) for sc in split_scenes]
        for layout in LAYOUTS:
            res: dict[str, Any] = {"examples": {}}
            for kind, question in shapes.QUESTIONS.items():
                prompt = tok.encode(f"Question: {question} Answer:")
                ids = generate_text(model, vocab, codes, prompt, max_new_tokens=8, layout=layout)
                answers = [normalise(tok.decode(a)) for a in ids]
                res[f"vqa_{kind}"] = float(np.mean([a == t[kind][1] for a, t in zip(answers, truth)]))
                res["examples"][kind] = answers[:3]
            res["vqa_all"] = float(np.mean([res[f"vqa_{k}"] for k in shapes.QUESTIONS]))
            for name, text in (("caption", ""), ("caption_instructed", "Describe the given picture.")):
                ids = generate_text(model, vocab, codes, tok.encode(text) if text else None, max_new_tokens=24,
                                    layout=layout)  # fmt: skip
                texts = [tok.decode(a).strip() for a in ids]
                res[name] = caption_scores(texts, split_scenes)["colour_and_shape"]
                res["examples"][name] = texts[:3]
            out[f"{split}/{layout}"] = res
    return out


@torch.no_grad()
def evaluate_edits(ckpt: Path, tok: TextTokenizer, vqgan: VQGAN, scenes: list, size: int, seed: int) -> dict:
    """Recolour each scene with ``edit_image`` (text CFG 3, image CFG 1.5, top-p 0.6) and judge the edited images
    against the scene asked for; the unedited sources and the VQGAN's reconstructions of the targets for reference."""
    model, vocab = load_checkpoint(ckpt)
    rng = np.random.default_rng(seed)
    edits = [shapes.recolour(sc, rng) for sc in scenes]
    targets = [t for _, t in edits]
    sources = np.stack([shapes.render(sc, size, np.random.default_rng([seed, i])) for i, sc in enumerate(scenes)])
    renders = np.stack([shapes.render(t, size, np.random.default_rng([seed, i])) for i, t in enumerate(targets)])
    codes = vqgan.encode(torch.from_numpy(sources).permute(0, 3, 1, 2).contiguous())  # (N, grid_h * grid_w)
    out = edit_image(model, vocab, codes, [tok.encode(i) for i, _ in edits],
                     tok.encode("Edit first image following the instruction"), text_cfg=3.0, image_cfg=1.5,
                     top_p=0.6, seed=seed, vqgan=vqgan)  # fmt: skip
    edited = to_uint8(out.images[:, 0])
    recon = to_uint8(vqgan.decode(vqgan.encode(torch.from_numpy(renders).permute(0, 3, 1, 2).contiguous())))
    return {
        "edited": attribute_scores(edited, targets),
        "unedited_source": attribute_scores(sources, targets),
        "target_reconstruction": attribute_scores(recon, targets),
        "examples": [i for i, _ in edits[:3]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished demo run (runs/demo)")
    p.add_argument("--out", type=Path, default=Path("runs/sft"), help="output directory")
    p.add_argument("--pairs", type=positive_int, default=3000, help="image-caption pairs drawn for the SFT data")
    p.add_argument("--steps", type=positive_int, default=800, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the demo pretrains at 3e-3)")
    p.add_argument("--warmup", type=int, default=40, help="warm-up steps")
    p.add_argument("--eval", type=positive_int, default=96, help="evaluation scenes per split")
    p.add_argument("--seed", type=int, default=100, help="seed of the SFT data (the demo's data uses 0)")
    p.add_argument("--image-first", type=float, default=0.5, help="share of SFT documents written image first "
                   "(input, then output: what the image_first prompt layout reads)")  # fmt: skip
    p.add_argument("--fit-arg", action="append", default=[], help="one more argument for the fit, repeatable: "
                   "--fit-arg=--data.init_args.batch_size=4")  # fmt: skip
    p.add_argument("--fresh", action="store_true", help="delete --out first (an output of this example, holding "
                   f"its {ARGS_FILE}) and start over; without it, a rerun of other data is refused")  # fmt: skip
    args = p.parse_args(argv)
    for flag, ok, wanted in (
        ("--warmup", args.warmup >= 0, "an integer >= 0"),
        ("--lr", 0 < args.lr < math.inf, "a finite number > 0"),
        ("--seed", args.seed >= 0, "an integer >= 0"),
        ("--seed", args.seed <= MAX_SEED, f"an integer <= {MAX_SEED} (the fit's seed_everything takes no more)"),
        ("--image-first", 0 <= args.image_first <= 1, "a number in [0, 1]"),
    ):  # checked before any file is written (NaN fails too)
        if not ok:
            p.error(f"argument {flag}: expected {wanted}, got {getattr(args, flag[2:].replace('-', '_'))}")
    try:
        demo, out = stage_results(args.run), args.out
    except FileNotFoundError as e:
        p.error(f"run: {e}")
    tok = TextTokenizer.load(demo["tokenizer"]["path"])
    vqgan = VQGAN.from_pretrained(demo["vqgan"]["path"]).eval()
    size = vqgan.config.resolution
    data = {"run": str(args.run.resolve()), "pairs": args.pairs, "seed": args.seed, "image_size": size}
    try:
        prepare_out(out, data, args.fresh)
        make_output_dir(out)  # a file on its path, no permission: named, not a traceback
    except ValueError as e:
        p.error(str(e))
    fit = {k: getattr(args, k) for k in ("steps", "lr", "warmup", "eval", "image_first", "fit_arg")}
    write_text_whole(out / ARGS_FILE, json.dumps({"data": data, "fit": fit}, indent=1))
    lines = write_sft_data(out / "data", args.pairs, size, args.seed)
    source = SFTSource(out / "data", seed=args.seed)
    prepare(source, out / "prepared", vqgan=demo["vqgan"]["path"], clip_weights=demo["clip"]["path"],
            clip_model=demo["clip"]["model"], tokenizer=demo["tokenizer"]["path"], k_per_modality=0,
            val_fraction=0.05, samples_per_shard=1000, device="cpu", progress=False)  # fmt: skip
    fit_args = [
        "--config", str(CONFIG_DIR / "experiments" / "sft.yaml"),
        f"--model.init_args.init_from={demo['train']['checkpoint']}", f"--model.init_args.lr={args.lr}",
        f"--model.init_args.warmup_steps={args.warmup}", f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.steps}", f"--trainer.default_root_dir={out / 'train'}",
        f"--trainer.logger.init_args.save_dir={out / 'train'}", f"--seed_everything={args.seed}",
        f"--data.init_args.train_data={out / 'prepared' / 'train'}",
        f"--data.init_args.val_data={out / 'prepared' / 'val'}",
        f"--data.init_args.image_first_prob={args.image_first}", *args.fit_arg,
    ]  # fmt: skip
    try:
        cli = fit_with_cli(CONFIG_DIR / "experiments" / "demo_shapes.yaml", fit_args)
    except SystemExit as e:  # Lightning ends a fit stopped by SIGTERM with SystemExit(None): status 0, no word
        status = stopped_status(e)
        if status is None:
            raise
        how = "SIGTERM" if status == 143 else "Ctrl-C"
        print(f"sft_shapes.py: stopped by {how} during the fit; the SFT data and its prepared shards in {out} are "
              "kept: rerun the same command to reuse them", file=sys.stderr)  # fmt: skip
        raise SystemExit(status) from e
    ckpt = out / "train" / "sft.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=True)
    scenes = {
        "seen": one_shape_scenes(args.eval, "train", args.seed + 1),
        "heldout": one_shape_scenes(args.eval, "heldout", args.seed + 2),
    }
    report = {
        "sft_lines": lines,
        "mixture": source.describe()["datasets"],
        "steps": int(cli.trainer.global_step),
        "before": evaluate(Path(demo["train"]["checkpoint"]), tok, vqgan, scenes, size),
        "after": evaluate(ckpt, tok, vqgan, scenes, size),
        "edits_before": evaluate_edits(Path(demo["train"]["checkpoint"]), tok, vqgan, scenes["seen"], size, args.seed),
        "edits_after": evaluate_edits(ckpt, tok, vqgan, scenes["seen"], size, args.seed),
        "chance": {
            f"vqa_{k}": 1 / n
            for k, n in (
                ("colour", len(shapes.COLOURS)),
                ("shape", len(shapes.SHAPES)),
                ("size", len(shapes.SIZES)),
                ("position", len(shapes.POSITIONS)),
            )
        },  # fmt: skip
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"{'':38} {'before':>8} {'after':>8}")
    for where in report["after"]:
        for key in ["vqa_all", *(f"vqa_{q}" for q in shapes.QUESTIONS), "caption", "caption_instructed"]:
            before, after = report["before"][where][key], report["after"][where][key]
            print(f"{where + ' ' + key:38} {before:8.1%} {after:8.1%}")
    for key in ("all", "colour", "shape", "position"):
        before, after = report["edits_before"]["edited"][key], report["edits_after"]["edited"][key]
        print(f"{'edit (seen) ' + key:38} {before:8.1%} {after:8.1%}")
    refs = {k: report["edits_after"][k]["all"] for k in ("unedited_source", "target_reconstruction")}
    print(f"edit references (all attributes): unedited source {refs['unedited_source']:.1%}, VQGAN reconstruction "
          f"of the target {refs['target_reconstruction']:.1%}")  # fmt: skip
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
