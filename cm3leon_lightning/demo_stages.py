"""The demo's stages (what each one computes) and their registry: :data:`STAGES` in order, :data:`DEPENDS` (what
each reads), :data:`STAGE_FUNCS` (the function that runs it), :data:`STAGE_FIELDS` and :data:`STAGE_FILES` (the size
fields and files its output follows). Each stage function takes the run's :class:`~cm3leon_lightning.demo.Context` and
its own emptied directory and returns a JSON-serialisable result; :mod:`cm3leon_lightning.demo` runs and caches them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cm3leon_lightning.data.shapes import scene_to_dict

if TYPE_CHECKING:
    from cm3leon_lightning.demo import Context

STAGES = ("data", "tokenizer", "vqgan", "clip", "prepare", "train", "evaluate", "report")
# The picture rule is off: the demo's CLIP, trained for seconds, gives all shape pictures image-embedding cosines
# above 0.9999 (the rule would empty every retrieved context), and the shapes generator makes no re-posts.
PREPARE_SETTINGS: dict[str, Any] = {
    "k_per_modality": 2, "query_dropout": 0.2, "image_duplicate_threshold": 2.0, "device": "cpu", "workers": 1,
}  # fmt: skip


DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "tokenizer": ("data",),
    "vqgan": ("data",),
    "clip": ("data",),
    "prepare": ("tokenizer", "vqgan", "clip"),
    "train": ("prepare",),
    "evaluate": ("train",),
    "report": ("evaluate",),
}
"""The stages each stage reads; a stage's hash includes theirs, so a change reruns everything downstream of it."""


def stage_data(ctx: Context, out: Path) -> dict[str, Any]:
    """Write the training pairs as ``train/<key>.png`` + ``train/<key>.txt`` and the scenes of both splits."""
    from PIL import Image
    from tqdm import tqdm

    from cm3leon_lightning.data.shapes import generate_pairs

    s = ctx.size
    counts = {}
    for split, n in (("train", s.n_train), ("heldout", s.n_heldout)):
        folder = out / split
        folder.mkdir()
        scenes = []
        for pair in tqdm(generate_pairs(n, split, s.image_size, ctx.seed), total=n, desc=f"{split} pairs", leave=False):
            Image.fromarray(pair.image).save(folder / f"{pair.key}.png", compress_level=1)
            (folder / f"{pair.key}.txt").write_text(pair.caption, encoding="utf-8")
            scenes.append({"key": pair.key, "caption": pair.caption, "scene": scene_to_dict(pair.scene)})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scenes), encoding="utf-8")
        counts[split] = n
    return {"counts": counts, "train": str(out / "train"), "heldout": str(out / "heldout")}


def stage_tokenizer(ctx: Context, out: Path) -> dict[str, Any]:
    """Train the byte-level BPE on the training captions and the instruction texts of a quarter of them."""
    from cm3leon_lightning.data.shapes import instruction_texts, scene_from_dict
    from cm3leon_lightning.tokenization.text import TextTokenizer

    rows = read_jsonl(ctx.stage_dir("data") / "train.jsonl")
    captions = [r["caption"] for r in rows]
    # instruction texts too: the tokenizer covers the words of examples/sft_shapes.py, as a real one covers its language
    extra = [t for r in rows[::4] for t in instruction_texts(r["caption"], scene_from_dict(r["scene"]))]
    tok = TextTokenizer.train(captions + extra, ctx.size.tokenizer_vocab, min_frequency=2)
    path = tok.save(out / "tokenizer.json")
    lengths = [len(ids) for ids in tok.encode_batch(captions[:1000])]
    return {"path": str(path), "vocab_size": tok.vocab_size, "mean_caption_tokens": sum(lengths) / len(lengths)}


def fit_with_cli(config: Path, overrides: Sequence[str], callbacks: Sequence[Any] = ()) -> Any:
    """``cm3leon fit --config <config> <overrides>`` in this process (plus ``callbacks``); returns the LightningCLI."""
    from cm3leon_lightning.cli import CM3LeonCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args and sys.argv holds others
    try:
        defaults = {"callbacks": list(callbacks)} if callbacks else None
        return CM3LeonCLI(args=["fit", "--config", str(config), *overrides], trainer_defaults=defaults)
    finally:
        sys.argv = argv


def _fit_overrides(ctx: Context, config: Path, out: Path, steps: int | None) -> list[str]:
    """The demo's overrides of a fit config: outputs under ``out`` (the config's logger too), seed, steps, sizes."""
    import yaml

    args = [f"--trainer.default_root_dir={out}", f"--seed_everything={ctx.seed}"]
    logger = ((yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):  # else it logs to the YAML's path
        args.append(f"--trainer.logger.init_args.save_dir={out}")
    if not ctx.progress:
        args.append("--trainer.enable_progress_bar=false")
    if steps is not None:
        args.append(f"--trainer.max_steps={steps}")
    return args + list(ctx.size.batch_overrides)


def stage_vqgan(ctx: Context, out: Path) -> dict[str, Any]:
    """Train the VQGAN on the training images and export it; check the attribute judge on its reconstructions."""
    from cm3leon_lightning.demo_eval import reconstruction_accuracy

    data = ctx.results["data"]
    config = ctx.configs / "demo" / "vqgan.yaml"
    args = _fit_overrides(ctx, config, out, ctx.size.vqgan_steps) + [f"--data.init_args.train={data['train']}"]
    cli = fit_with_cli(config, args, ctx.fit_callbacks)
    vqgan = cli.model.vqgan.eval()
    model_dir = vqgan.save_pretrained(out / "model")
    heldout = read_jsonl(ctx.stage_dir("data") / "heldout.jsonl")
    recon = reconstruction_accuracy(vqgan, Path(data["heldout"]), heldout)
    h, w = vqgan.config.grid_size
    return {"path": str(model_dir), "n_codes": vqgan.config.n_embed, "grid": [h, w], "reconstruction": recon}


def stage_clip(ctx: Context, out: Path) -> dict[str, Any]:
    """Train the tiny CLIP retriever (ClipModule) on the training pairs and export its weights."""
    data = ctx.results["data"]
    weights = out / "clip.safetensors"
    config = ctx.configs / "demo" / "clip.yaml"
    args = _fit_overrides(ctx, config, out, ctx.size.clip_steps) + [
        f"--data.init_args.data_dir={data['train']}",
        f"--model.init_args.export_path={weights}",
    ]
    cli = fit_with_cli(config, args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"path": str(weights), "model": cli.model.hparams.model_name, "val": metrics}


def stage_prepare(ctx: Context, out: Path) -> dict[str, Any]:
    """``cm3leon prepare`` on the image folder: BPE ids, VQ codes, CLIP retrieval, train/val shards."""
    from cm3leon_lightning.data.prepare import prepare
    from cm3leon_lightning.data.sources import FolderSource

    settings = {**prepare_settings(ctx), "progress": ctx.verbose}
    summary = prepare(FolderSource(ctx.results["data"]["train"]), out, **settings)  # prints its summary
    return {"train": str(out / "train"), "val": str(out / "val"), "summary": summary}


def prepare_settings(ctx: Context) -> dict[str, Any]:
    """The ``cm3leon prepare`` settings of the demo (paper section 2.1 rules, small sizes)."""
    res = ctx.results
    return {
        "vqgan": res["vqgan"]["path"],
        "clip_weights": res["clip"]["path"],
        "clip_model": res["clip"]["model"],
        "tokenizer": res["tokenizer"]["path"],
        "samples_per_shard": ctx.size.samples_per_shard,
        "val_fraction": ctx.size.val_fraction,
        "seed": ctx.seed,
        **PREPARE_SETTINGS,
    }


def stage_train(ctx: Context, out: Path) -> dict[str, Any]:
    """Train CM3Leon with ``configs/experiments/demo_shapes.yaml`` on the prepared shards."""
    prep = ctx.results["prepare"]
    config = ctx.configs / "experiments" / "demo_shapes.yaml"
    args = _fit_overrides(ctx, config, out, ctx.size.train_steps) + [
        f"--data.init_args.train_data={prep['train']}",
        f"--data.init_args.val_data={prep['val']}",
    ]
    cli = fit_with_cli(config, args)
    ckpt = out / "cm3leon.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=True)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "/" in k}
    return {
        "checkpoint": str(ckpt),
        "steps": int(cli.trainer.global_step),
        "parameters": sum(p.numel() for p in cli.model.model.parameters()),
        "config": cli.model.config.to_dict(),
        "max_retrieved": int(cli.datamodule.hparams.max_retrieved),
        "metrics": metrics,
    }


def stage_evaluate(ctx: Context, out: Path) -> dict[str, Any]:
    """Generate, caption and score (see :mod:`cm3leon_lightning.demo_eval`)."""
    import torch

    from cm3leon_lightning.demo_eval import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding is many small operations: one thread is fastest (no per-op sync)
    try:
        return evaluate(ctx, out)
    finally:
        torch.set_num_threads(threads)


def stage_report(ctx: Context, out: Path) -> dict[str, Any]:
    """Write ``samples.png``, ``metrics.json`` and ``report.md`` at the top of the run directory."""
    from cm3leon_lightning.demo_report import write_report

    return write_report(ctx, out)


STAGE_FUNCS: dict[str, Callable[[Context, Path], dict]] = {
    "data": stage_data,
    "tokenizer": stage_tokenizer,
    "vqgan": stage_vqgan,
    "clip": stage_clip,
    "prepare": stage_prepare,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("n_train", "n_heldout", "image_size"),
    "tokenizer": ("tokenizer_vocab",),
    "vqgan": ("vqgan_steps", "batch_overrides"),
    "clip": ("clip_steps", "batch_overrides"),
    "prepare": ("samples_per_shard", "val_fraction"),
    "train": ("train_steps", "batch_overrides"),
    "evaluate": ("eval_prompts", "samples_per_prompt", "caption_images", "loss_docs"),
    "report": ("grid_prompts",),
}
STAGE_FILES: dict[str, tuple[str, ...]] = {  # config files (under configs/) and source files a stage's output follows
    "data": ("package:data/shapes.py",),  # the scenes, captions and renders it writes
    "tokenizer": ("package:data/shapes.py", "package:data/sft.py"),  # the instruction texts in its corpus
    "vqgan": ("configs:demo/vqgan.yaml",),
    "clip": ("configs:demo/clip.yaml",),
    "train": ("configs:experiments/demo_shapes.yaml",),
    "evaluate": ("package:demo_eval.py",),
    "report": ("package:demo_report.py",),
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
