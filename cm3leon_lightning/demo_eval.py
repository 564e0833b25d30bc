"""The demo's measurements: attribute accuracy of generated images, captioning, retrieval loss and FID.

Every figure comes with a reference that says what it means:

- *chance* for attribute accuracy: the checker's verdict on real renders of *other* prompts' scenes of the same
  split (an image that ignores its caption); for captions, the rate at which a random training caption names the
  right colour-shape pairs (and its CIDEr).
- *ceiling*: the checker on the VQGAN's reconstructions of real images (generation cannot beat its tokenizer), and on
  the renders themselves (the checker's own accuracy).

Nothing here tunes the judge: :func:`cm3leon_lightning.data.shapes.check_image` and
:func:`~cm3leon_lightning.data.shapes.caption_attributes` are used as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from cm3leon_lightning.demo import Context

ATTRIBUTES = ("all", "colour", "shape", "size", "position", "count")
CHANCE_SHIFTS = 8  # chance level: each prompt against the scenes of 8 other prompts


# ------------------------------------------------------------------------------------------------ images
def load_images(folder: Path, keys: list[str]) -> np.ndarray:
    """``<folder>/<key>.png`` for each key as uint8 ``(N, H, W, 3)``."""
    return np.stack([np.asarray(Image.open(folder / f"{k}.png").convert("RGB")) for k in keys])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images in ``[-1, 1]``, ``(N, C, H, W)`` -> uint8 ``(N, H, W, C)``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def attribute_scores(images: np.ndarray, scenes: list[Any]) -> dict[str, float]:
    """Share of images the checker finds right, per attribute and for all of them (``all``)."""
    from cm3leon_lightning.data.shapes import check_image

    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    verdicts = [check_image(img, sc) for img, sc in zip(images, scenes)]
    return {a: float(np.mean([v[a] for v in verdicts])) for a in ATTRIBUTES}


def chance_scores(renders: np.ndarray, scenes: list[Any]) -> dict[str, float | None]:
    """Attribute accuracy of images that ignore their caption: each render judged against other prompts' scenes
    (up to :data:`CHANCE_SHIFTS` of them). None for every attribute with fewer than two prompts (no other scene)."""
    n = len(scenes)
    if len(renders) != n:
        raise ValueError(f"{len(renders)} renders for {n} scenes")
    if n < 2:
        return {a: None for a in ATTRIBUTES}
    shifts = range(1, min(CHANCE_SHIFTS, n - 1) + 1)
    per = [attribute_scores(renders, [scenes[(i + s) % n] for i in range(n)]) for s in shifts]
    return {a: float(np.mean([p[a] for p in per])) for a in ATTRIBUTES}


@torch.no_grad()
def reconstruction_accuracy(vqgan: nn.Module, folder: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The checker on real renders and on their VQGAN reconstructions (the ceiling of generated images)."""
    from cm3leon_lightning.data.shapes import scene_from_dict

    images = load_images(folder, [r["key"] for r in rows])
    scenes = [scene_from_dict(r["scene"]) for r in rows]
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    rec = to_uint8(vqgan.decode(vqgan.encode(x)))
    return {"renders": attribute_scores(images, scenes), "reconstructions": attribute_scores(rec, scenes),
            "l1": float(np.abs(rec.astype(np.float32) - images).mean() / 255.0), "n": len(rows)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ generation
METHODS: dict[str, dict[str, Any]] = {
    "no_guidance": {"method": "top_p", "cfg": 1.0, "top_p": 0.6},
    "cfg": {"method": "top_p", "cfg": 1.5, "top_p": 0.6},
    "cd_k": {"method": "cd_k", "cdk_k": 8, "cdk_alpha": 0.5},
    "cfg_mask": {"method": "top_p", "cfg": 1.5, "top_p": 0.6, "plain_mask": True},
}
"""Decoding settings of :func:`~cm3leon_lightning.generation.generate_image`; ``cfg`` and ``cd_k`` use its
unconditional stream ``<eos> <mask:0> <break>``; ``cfg_mask`` (``plain_mask``) the plain ``<mask>`` id in its place,
a token no training example holds, for comparison. CFG 1.5 and top-p 0.6 were chosen with
``examples/demo_decoding_sweep.py`` on validation prompts drawn apart from the report's (docs/architecture.md)."""


def generation_eval(model: nn.Module, vocab: Any, tok: Any, vqgan: nn.Module, clip: Any, prompts: dict[str, list],
                    samples: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Generate ``samples`` images per prompt with each method and judge them; CLIP re-ranks the CFG samples.

    Args:
        prompts: split name -> rows ``{"caption", "scene"}``.

    Returns:
        ``(metrics, images)``: metrics[split][method] = attribute accuracy (and ``chance`` per split); images[split]
        [method] = uint8 ``(P, N, H, W, 3)`` arrays for the sample grid.
    """
    from cm3leon_lightning.data.shapes import scene_from_dict
    from cm3leon_lightning.generation import generate_image, rerank

    metrics: dict[str, Any] = {}
    images: dict[str, Any] = {}
    for split, rows in prompts.items():
        captions = [r["caption"] for r in rows]
        scenes = [scene_from_dict(r["scene"]) for r in rows]
        ids = tok.encode_batch(captions)
        metrics[split], images[split] = {}, {}
        for name, kwargs in METHODS.items():
            kwargs = dict(kwargs)
            if kwargs.pop("plain_mask", False):
                kwargs["unconditional"] = [vocab.eos_id, vocab.mask_id, vocab.break_id]
            generated = generate_image(
                model, vocab, ids, num_samples=samples, seed=seed, vqgan=vqgan, compile=False, **kwargs
            ).images
            P, N = generated.shape[:2]
            flat = to_uint8(generated.flatten(0, 1))  # (P*N, H, W, 3)
            metrics[split][name] = attribute_scores(flat, [s for s in scenes for _ in range(N)])
            images[split][name] = flat.reshape(P, N, *flat.shape[1:])
            if name == "cfg":
                best = rerank(clip, captions, generated)
                picked = to_uint8(best.images[:, 0])
                metrics[split]["cfg_rerank"] = attribute_scores(picked, scenes)
                images[split]["cfg_rerank"] = picked[:, None]
        metrics[split]["prompts"], metrics[split]["samples_per_prompt"] = len(rows), samples
    return metrics, images


# ------------------------------------------------------------------------------------------------ captioning
class _Pick:
    """A stand-in random generator whose ``integers(n)`` returns a fixed index (to list every caption template)."""

    def __init__(self, i: int) -> None:
        self.i = i

    def integers(self, n: int) -> int:
        return self.i % n


def reference_captions(scene: Any) -> list[str]:
    """Every template caption of a scene (the CIDEr references)."""
    from cm3leon_lightning.data.shapes import caption

    return list(dict.fromkeys(caption(scene, _Pick(i)) for i in range(4)))  # type: ignore[arg-type]


def caption_scores(texts: list[str], scenes: list[Any]) -> dict[str, float]:
    """Share of captions naming exactly the scene's colour-shape pairs, its colours, and its shapes."""
    from cm3leon_lightning.data.shapes import caption_attributes

    named = [caption_attributes(t) for t in texts]
    want = [sc.pairs() for sc in scenes]
    return {
        "colour_and_shape": float(np.mean([n == w for n, w in zip(named, want)])),
        "colour": float(np.mean([{c for c, _ in n} == {c for c, _ in w} for n, w in zip(named, want)])),
        "shape": float(np.mean([{s for _, s in n} == {s for _, s in w} for n, w in zip(named, want)])),
    }


def caption_eval(model: nn.Module, vocab: Any, tok: Any, codes: dict[str, torch.Tensor], scenes: dict[str, list],
                 train_captions: list[str], seed: int) -> tuple[dict[str, Any], dict[str, list[str]]]:  # fmt: skip
    """Greedy captions of each split's images, scored by the attribute parser and CIDEr-D (chance: random captions)."""
    from cm3leon_lightning.generation import generate_text
    from cm3leon_lightning.metrics.cider import cider_d

    rng = np.random.default_rng(seed)
    metrics: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    for split, c in codes.items():
        out = generate_text(model, vocab, c, max_new_tokens=24, method="greedy")
        texts[split] = [tok.decode(ids).strip() for ids in out]
        refs = [reference_captions(sc) for sc in scenes[split]]
        random_caps = [train_captions[i] for i in rng.integers(len(train_captions), size=len(refs))]
        metrics[split] = {
            **caption_scores(texts[split], scenes[split]),
            "cider": cider_d(texts[split], refs, tokenizer="simple")[0],
            "chance": {**caption_scores(random_caps, scenes[split]), "cider": cider_d(random_caps, refs, "simple")[0]},
            "images": len(refs),
        }
    return metrics, texts


# ------------------------------------------------------------------------------------------------ retrieval loss
def _neighbor_doc(n: Any) -> list:
    from cm3leon_lightning.tokenization.vocab import Segment

    segs = [Segment.text(n.text.tolist())] if len(n.text) else []
    return segs + ([Segment.image(n.image.tolist())] if len(n.image) else [])


@torch.no_grad()
def retrieval_loss(model: nn.Module, vocab: Any, samples: list[Any], max_retrieved: int = 2,
                   batch_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Cross-entropy on the query document's tokens with and without its retrieved documents before it.

    The same query tokens are scored both ways (caption, ``<break>``, image codes and the final ``<eos>``; no CM3
    masking), so the difference is what the retrieved documents in the prompt are worth (paper section 2.1).
    """
    from cm3leon_lightning.tokenization.vocab import Segment

    max_len = model.config.max_seq_len + 1  # inputs are ids[:-1]
    out: dict[str, Any] = {"documents": len(samples), "max_retrieved": max_retrieved}
    for name, k in (("with_retrieval", max_retrieved), ("without_retrieval", 0)):
        sums = {"all": 0.0, "text": 0.0, "image": 0.0}
        counts = {"all": 0, "text": 0, "image": 0}
        for i in range(0, len(samples), batch_size):
            rows, starts = [], []
            for s in samples[i : i + batch_size]:
                query = [Segment.text(s.text.tolist()), Segment.image(s.image.tolist())]
                docs = [_neighbor_doc(n) for n in s.neighbors[:k]]
                docs = [d for d in docs if d]
                ids = vocab.example_to_ids(docs, query)
                while len(ids) > max_len and docs:  # as training's context fitting: drop the last neighbours
                    docs = docs[:-1]
                    ids = vocab.example_to_ids(docs, query)
                rows.append(ids)
                starts.append(len(ids) - len(vocab.document_to_ids(query)) - 1)  # the query's <eos>
            T = max(len(r) for r in rows)
            batch = torch.full((len(rows), T), vocab.pad_id, dtype=torch.long)
            for j, r in enumerate(rows):
                batch[j, : len(r)] = torch.tensor(r)
            logits = model(batch[:, :-1]).float()  # (B, T-1, V)
            targets = batch[:, 1:]  # (B, T-1)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            ce = ce.view_as(targets)
            pos = torch.arange(T - 1)[None]  # target t is token t+1
            in_query = (pos >= torch.tensor(starts)[:, None]) & (targets != vocab.pad_id)
            is_image = vocab.is_image_id(targets)
            for part, mask in (("all", in_query), ("text", in_query & ~is_image), ("image", in_query & is_image)):
                sums[part] += float(ce[mask].sum())
                counts[part] += int(mask.sum())
        out[name] = {p: sums[p] / max(counts[p], 1) for p in sums}
    return out


# ------------------------------------------------------------------------------------------------ FID
class ClipImageFeatures(nn.Module):
    """FID feature extractor: the demo's trained CLIP image tower, uint8 ``(N, 3, H, W)`` -> ``(N, D)`` features."""

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings as float64 (FID's covariance wants the precision)."""
        return torch.from_numpy(self.clip.embed_images(images.to(torch.uint8))).double()


def scene_renders(scenes: list[Any], n: int, image_size: int, seed: int) -> np.ndarray:
    """``n`` renders of each scene (position and size jitter drawn anew), uint8 ``(len(scenes) * n, H, W, 3)``: the
    real counterpart of ``n`` generated samples per prompt (FID grows as a set shrinks: compare equal sizes)."""
    from cm3leon_lightning.data.shapes import render

    # four-number seeds: streams apart from generate_pairs' (seed, split, index)
    rngs = ((sc, np.random.default_rng([seed, 2, i, j])) for i, sc in enumerate(scenes) for j in range(n))
    return np.stack([render(sc, image_size, rng) for sc, rng in rngs])


def fid(clip: Any, real: np.ndarray, fake: np.ndarray) -> float | None:
    """FID between two uint8 ``(N, H, W, 3)`` image sets in the CLIP image-tower feature space (None if < 2 each)."""
    from cm3leon_lightning.metrics.fid import make_fid

    if len(real) < 2 or len(fake) < 2:
        return None
    metric = make_fid(ClipImageFeatures(clip), input_size=real.shape[1])
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2).contiguous(), real=False)
    value = float(metric.compute())
    return value if np.isfinite(value) else None


# ------------------------------------------------------------------------------------------------ the stage
def _val_samples(prepared_val: Path, limit: int) -> list[Any]:
    from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest, read_shard

    manifest = Manifest.load(prepared_val / MANIFEST_NAME)
    out: list[Any] = []
    for shard in manifest.shards:
        for sample in read_shard(prepared_val / shard.name, manifest):
            out.append(sample)
            if len(out) >= limit:
                return out
    return out


def evaluate(ctx: Context, out: Path) -> dict[str, Any]:
    """The evaluate stage: load the trained pieces, measure everything, save sample images for the report."""
    import json
    import time

    from cm3leon_lightning.data.shapes import generate_pairs, scene_from_dict, scene_to_dict
    from cm3leon_lightning.demo_stages import read_jsonl
    from cm3leon_lightning.generation.cli import load_checkpoint
    from cm3leon_lightning.retrieval.encoder import ClipEncoder
    from cm3leon_lightning.tokenization.text import TextTokenizer
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    res, size, seconds = ctx.results, ctx.size, {}
    model, vocab = load_checkpoint(res["train"]["checkpoint"])
    tok = TextTokenizer.load(res["tokenizer"]["path"])
    vqgan = VQGAN.from_pretrained(res["vqgan"]["path"]).eval()
    clip = ClipEncoder(res["clip"]["model"], res["clip"]["path"], device="cpu")
    data_dir = ctx.stage_dir("data")
    train_rows = {r["key"]: r for r in read_jsonl(data_dir / "train.jsonl")}
    heldout_rows = read_jsonl(data_dir / "heldout.jsonl")

    # Prompts: fresh scenes of seen colour-shape combinations (another seed), and held-out combinations.
    seen_pairs = list(generate_pairs(size.eval_prompts, "train", size.image_size, ctx.seed + 1))
    prompts = {
        "seen": [{"caption": p.caption, "scene": scene_to_dict(p.scene)} for p in seen_pairs],
        "heldout": heldout_rows[: size.eval_prompts],
    }
    renders = {
        "seen": np.stack([p.image for p in seen_pairs]),
        "heldout": load_images(Path(res["data"]["heldout"]), [r["key"] for r in prompts["heldout"]]),
    }
    t0 = time.perf_counter()
    gen_metrics, gen_images = generation_eval(
        model, vocab, tok, vqgan, clip, prompts, size.samples_per_prompt, ctx.seed
    )
    for split in prompts:
        gen_metrics[split]["chance"] = chance_scores(
            renders[split], [scene_from_dict(r["scene"]) for r in prompts[split]]
        )
    seconds["generation"] = time.perf_counter() - t0

    # Captions: validation images (seen combinations, never trained on) and held-out combinations.
    t0 = time.perf_counter()
    val = _val_samples(Path(res["prepare"]["val"]), max(size.caption_images, size.loss_docs))
    cap_val = val[: size.caption_images]
    cap_held = heldout_rows[: size.caption_images]
    held_imgs = load_images(Path(res["data"]["heldout"]), [r["key"] for r in cap_held])
    with torch.no_grad():
        held_codes = vqgan.encode(torch.from_numpy(held_imgs).permute(0, 3, 1, 2))
    codes = {
        "validation": torch.from_numpy(np.stack([s.image for s in cap_val]).astype(np.int64)),
        "heldout": held_codes,
    }
    scenes = {
        "validation": [scene_from_dict(train_rows[s.key]["scene"]) for s in cap_val],
        "heldout": [scene_from_dict(r["scene"]) for r in cap_held],
    }
    train_captions = [r["caption"] for r in train_rows.values()]
    cap_metrics, cap_texts = caption_eval(model, vocab, tok, codes, scenes, train_captions, ctx.seed)
    seconds["captioning"] = time.perf_counter() - t0

    # Retrieval: the query documents' loss with and without their retrieved neighbours in the prompt.
    t0 = time.perf_counter()
    max_retrieved = res["train"].get("max_retrieved")
    if max_retrieved is None:  # a train stage recorded before the field existed: read the experiment file
        import yaml

        exp = yaml.safe_load((ctx.configs / "experiments" / "demo_shapes.yaml").read_text())
        max_retrieved = exp["data"]["init_args"].get("max_retrieved", 3)
    loss = retrieval_loss(model, vocab, val[: size.loss_docs], int(max_retrieved))
    seconds["retrieval_loss"] = time.perf_counter() - t0

    # FID in the trained CLIP image tower's feature space: generated (seen prompts) vs validation renders.
    t0 = time.perf_counter()
    real = load_images(Path(res["data"]["train"]), [s.key for s in val])
    seen_scenes = [scene_from_dict(r["scene"]) for r in prompts["seen"]]
    # as many real renders as each method's images: FID depends on the set size
    reference = scene_renders(seen_scenes, size.samples_per_prompt, size.image_size, ctx.seed + 1)
    with torch.no_grad():
        recon = to_uint8(vqgan.decode(vqgan.encode(torch.from_numpy(reference).permute(0, 3, 1, 2))))
    flat = {m: x.reshape(-1, *x.shape[2:]) for m, x in gen_images["seen"].items()}
    fids = {
        "feature_extractor": f"the demo's CLIP image tower ({res['clip']['model']}, {clip.dim}-d)",
        "real_images": len(real),
        "generated_images": len(flat["cfg"]),
        "reference_images": len(reference),
        **{m: fid(clip, real, flat[m]) for m in ("no_guidance", "cfg", "cd_k")},
        "reference_renders": fid(clip, real, reference),
        "reference_vqgan_reconstructions": fid(clip, real, recon),
    }
    seconds["fid"] = time.perf_counter() - t0

    np.savez_compressed(
        out / "samples.npz",
        **{f"{split}__{m}": x for split, d in gen_images.items() for m, x in d.items()},
        **{f"{split}__render": renders[split] for split in renders},
    )
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    captions = {
        split: [{"generated": t, "reference": reference_captions(sc)[0]} for t, sc in zip(texts, scenes[split])]
        for split, texts in cap_texts.items()
    }
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    return {
        "generation": gen_metrics,
        "captioning": cap_metrics,
        "retrieval_loss": loss,
        "fid": fids,
        "seconds": seconds,
        "samples": str(out / "samples.npz"),
    }
