"""The demo's outputs: the sample grid (``samples.png``), ``metrics.json`` and ``report.md``; and the stage results of
a finished run, for the examples that build on it.

Targets (issue 8) are checked here and the report says plainly which were met; the figures are never adjusted.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from cm3leon_lightning.demo import Context


def stage_results(run: Path, stages: tuple[str, ...] = ("tokenizer", "vqgan", "clip", "train")) -> dict[str, Any]:
    """The ``result`` of each of ``stages`` of a finished demo run (``<run>/<stage>/stage.json``).

    Raises:
        FileNotFoundError: a stage has not finished, or its marker was cut short (names the marker file and the
            command that writes it).
    """
    out = {}
    for stage in stages:
        marker = Path(run) / stage / "stage.json"
        rerun = f"run `make demo` (or `cm3leon demo --out {run}`) first"
        if not marker.is_file():
            raise FileNotFoundError(f"{marker} not found: {rerun}")
        try:
            out[stage] = json.loads(marker.read_text())["result"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FileNotFoundError(f"{marker} is unreadable ({e!r}), cut short? {rerun}") from e
    return out


def _method_names() -> dict[str, str]:
    """Report names of the generation methods, from the settings :data:`~cm3leon_lightning.demo_eval.METHODS` uses."""
    from cm3leon_lightning.demo_eval import METHODS

    ng, cfg, cdk = METHODS["no_guidance"], METHODS["cfg"], METHODS["cd_k"]
    return {
        "no_guidance": f"no guidance (top-p {ng['top_p']})",
        "cfg": f"CFG {cfg['cfg']} + top-p {cfg['top_p']}",
        "cd_k": f"CD-K (k {cdk['cdk_k']}, alpha {cdk['cdk_alpha']})",
        "cfg_rerank": "CFG + CLIP re-ranking (best of N)",
        "cfg_mask": f"CFG {cfg['cfg']} + top-p {cfg['top_p']}, plain `<mask>` stream",
    }


METHOD_NAMES = _method_names()
GRID_COLUMNS = (("render", "real render"), ("no_guidance", "no guidance"), ("cfg", "CFG"), ("cd_k", "CD-K"),
                ("cfg_rerank", "CFG + CLIP"))  # fmt: skip
SPLIT_NAMES = {"seen": "seen combinations", "heldout": "held-out combinations (zero-shot)",
               "validation": "validation images (seen combinations)"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ grid
def sample_grid(samples: dict[str, np.ndarray], prompts: dict[str, list[dict]], per_split: int, scale: int = 3,
                pad: int = 4) -> Image.Image:  # fmt: skip
    """One block per prompt: the prompt above a row of images (real render, then each decoding method).

    Seen-combination prompts fill the left column of blocks, held-out ones the right column.
    """
    first = next(iter(samples.values()))
    side = first.shape[-2] * scale
    cell = side + pad
    block_w = len(GRID_COLUMNS) * cell + pad
    text_h, header_h = 12, 28
    block_h = 2 * text_h + cell + pad
    splits = [s for s in ("seen", "heldout") if f"{s}__cfg" in samples]
    n = min(per_split, *(len(prompts[s]) for s in splits))
    grid = Image.new("RGB", (len(splits) * block_w, header_h + n * block_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, split in enumerate(splits):
        x0 = c * block_w
        draw.text((x0 + pad, 2), SPLIT_NAMES[split], fill="black")
        for j, (_, label) in enumerate(GRID_COLUMNS):
            draw.text((x0 + pad + j * cell, 15), label, fill=(90, 90, 90))
        for i in range(n):
            y0 = header_h + i * block_h
            lines = textwrap.wrap(prompts[split][i]["caption"], width=block_w // 6 - 2)[:2]
            for k, line in enumerate(lines):
                draw.text((x0 + pad, y0 + k * text_h), line, fill="black")
            for j, (key, _) in enumerate(GRID_COLUMNS):
                arr = samples[f"{split}__{key}"][i]
                arr = arr if arr.ndim == 3 else arr[0]  # first candidate of a method
                tile = Image.fromarray(arr).resize((side, side), Image.NEAREST)
                grid.paste(tile, (x0 + pad + j * cell, y0 + 2 * text_h))
    return grid


# ------------------------------------------------------------------------------------------------ targets
def check_targets(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    gen, cap = ev["generation"], ev["captioning"]
    out = []
    for split in ("seen", "heldout"):
        v = gen[split]["cfg"]["all"]
        out.append({"target": f"CFG: all attributes right in >= 50% of images ({SPLIT_NAMES[split]})",
                    "value": v, "met": v >= 0.5})  # fmt: skip
        a, b = gen[split]["cfg"]["all"], gen[split]["no_guidance"]["all"]
        out.append({"target": f"CFG better than no guidance ({SPLIT_NAMES[split]})", "value": f"{a:.1%} vs {b:.1%}",
                    "met": a > b})  # fmt: skip
    for split in ("validation", "heldout"):
        v = cap[split]["colour_and_shape"]
        out.append({"target": f"captions name the right colour and shape >= 80% ({SPLIT_NAMES[split]})", "value": v,
                    "met": v >= 0.8})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ report
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(metrics: dict[str, Any]) -> str:
    """The short human-readable report."""
    ev, r = metrics["evaluate"], metrics
    gen, cap, loss, fid = ev["generation"], ev["captioning"], ev["retrieval_loss"], ev["fid"]
    lines = [
        "# CM3Leon demo report",
        "",
        f"Synthetic shapes, {r['size']['image_size']}px images, {r['data']['counts']['train']} training pairs; "
        f"VQGAN {r['vqgan']['grid'][0]}x{r['vqgan']['grid'][1]} codes from {r['vqgan']['n_codes']}; "
        f"text BPE {r['tokenizer']['vocab_size']} ids; CM3Leon {r['train']['parameters'] / 1e6:.2f}M parameters "
        f"trained {r['train']['steps']} steps. Stage times: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items())
        + " (with more than one core the clip stage runs alongside the vqgan stage).",
        "",
        "![samples](samples.png)",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in r["targets"]:
        value = _pct(t["value"]) if isinstance(t["value"], float) else t["value"]
        lines.append(f"| {t['target']} | {value} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Text to image: attribute accuracy by the checker", ""]
    for split in ("seen", "heldout"):
        g = gen[split]
        lines += [
            f"{SPLIT_NAMES[split]}: {g['prompts']} prompts x {g['samples_per_prompt']} samples "
            "(re-ranking keeps one per prompt). Chance: the checker on real renders of other prompts' scenes. "
            "CFG and CD-K use the `<eos> <mask:0> <break>` unconditional stream (the CM3 sentinel that masks a whole "
            "caption in training); the `<mask>` row puts the plain `<mask>` id there, which no training example holds.",
            "",
            "| method | all | colour | shape | size | position | count |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in ("no_guidance", "cfg", "cd_k", "cfg_rerank", "cfg_mask", "chance"):
            row = g[m]
            name = METHOD_NAMES.get(m, "chance")
            attrs = ("all", "colour", "shape", "size", "position", "count")
            lines.append(f"| {name} | " + " | ".join(_pct(row[a]) for a in attrs) + " |")
        lines.append("")
    rec = r["vqgan"]["reconstruction"]
    lines += [
        f"Ceiling: the checker is right on {_pct(rec['renders']['all'])} of real held-out renders and on "
        f"{_pct(rec['reconstructions']['all'])} of their VQGAN reconstructions (mean L1 {rec['l1']:.3f}).",
        "",
        "## Image to text: greedy captions",
        "",
        "| images | colour and shape | colour | shape | CIDEr-D | chance: colour and shape | chance: CIDEr-D |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("validation", "heldout"):
        c = cap[split]
        lines.append(
            f"| {SPLIT_NAMES[split]} ({c['images']}) | {_pct(c['colour_and_shape'])} | {_pct(c['colour'])} | "
            f"{_pct(c['shape'])} | {_num(c['cider'])} | {_pct(c['chance']['colour_and_shape'])} | "
            f"{_num(c['chance']['cider'])} |"
        )
    w, wo = loss["with_retrieval"], loss["without_retrieval"]
    lines += [
        "",
        "Chance: a random training caption for each image. CIDEr-D references: every template caption of the scene.",
        "",
        "## Retrieval",
        "",
        f"Cross-entropy (nats/token) on {loss['documents']} validation documents' own tokens, with up to "
        f"{loss['max_retrieved']} retrieved documents before them and without (uniform chance: "
        f"{np.log(r['vocab_padded']):.2f}):",
        "",
        "| prompt | all tokens | caption tokens | image tokens |",
        "|---|---|---|---|",
        f"| with retrieval | {_num(w['all'])} | {_num(w['text'])} | {_num(w['image'])} |",
        f"| without retrieval | {_num(wo['all'])} | {_num(wo['text'])} | {_num(wo['image'])} |",
        "",
        "## FID",
        "",
        f"Feature extractor: {fid['feature_extractor']}; {fid['real_images']} validation renders against "
        f"{fid['generated_images']} generated images per method (seen-combination prompts) and "
        f"{fid['reference_images']} renders of the same prompts' scenes for the references (FID grows as "
        "a set shrinks, so all rows use sets of one size). Lower is better.",
        "",
        "| images | FID |",
        "|---|---|",
        f"| no guidance | {_num(fid['no_guidance'])} |",
        f"| CFG | {_num(fid['cfg'])} |",
        f"| CD-K | {_num(fid['cd_k'])} |",
        f"| reference: real renders of the prompts | {_num(fid['reference_renders'])} |",
        f"| reference: VQGAN reconstructions of those renders | {_num(fid['reference_vqgan_reconstructions'])} |",
        "",
    ]
    return "\n".join(lines)


def write_report(ctx: Context, out: Path) -> dict[str, Any]:
    """The report stage: ``samples.png``, ``metrics.json`` and ``report.md`` in the run directory."""
    from dataclasses import asdict

    res = ctx.results
    ev = res["evaluate"]
    eval_dir = ctx.stage_dir("evaluate")
    with np.load(eval_dir / "samples.npz") as z:
        samples = {k: z[k] for k in z.files}
    prompts = json.loads((eval_dir / "prompts.json").read_text())
    grid_path = ctx.out / "samples.png"
    sample_grid(samples, prompts, max(1, ctx.size.grid_prompts // 2)).save(grid_path)
    seconds = {}
    for name in ("data", "tokenizer", "vqgan", "clip", "prepare", "train", "evaluate"):
        marker = json.loads((ctx.stage_dir(name) / "stage.json").read_text())
        seconds[name] = marker["seconds"]
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    vocab = MultimodalVocab(res["tokenizer"]["vocab_size"], res["vqgan"]["n_codes"], *res["vqgan"]["grid"])
    metrics = {
        "size": asdict(ctx.size),
        "seed": ctx.seed,
        "data": res["data"],
        "tokenizer": res["tokenizer"],
        "vqgan": res["vqgan"],
        "clip": res["clip"],
        "prepare": {k: v for k, v in res["prepare"]["summary"].items() if k in ("counts", "splits", "seconds",
                                                                                 "neighbors_per_sample")},
        "train": {k: v for k, v in res["train"].items() if k != "checkpoint"},
        "evaluate": ev,
        "vocab_padded": vocab.padded_size,
        "seconds": seconds,
    }  # fmt: skip
    metrics["targets"] = check_targets(ev)
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))
    (ctx.out / "report.md").write_text(render_markdown(metrics), encoding="utf-8")
    return {"samples": str(grid_path), "metrics": str(ctx.out / "metrics.json"), "report": str(ctx.out / "report.md"),
            "targets": metrics["targets"]}  # fmt: skip
