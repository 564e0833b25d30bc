"""Stages 1 and 2 of ``cm3leon prepare`` (see :mod:`cm3leon_lightning.data.prepare`): the text tokenizer and the
encoding of parts (BPE ids, VQ codes, CLIP embeddings) into ``work/parts/``, and the models they load (cached per
process). The later stages are in :mod:`cm3leon_lightning.data.prepare_stages`, which re-exports these.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cm3leon_lightning.data.prepare_run import Run, hard_exit, is_val, kill_point, part_done, seal, write_json
from cm3leon_lightning.data.shards import file_sha256

if TYPE_CHECKING:
    from cm3leon_lightning.data.prepare import PrepareConfig

# ----------------------------------------------------------------------------------------- models (cached)
_CACHE: dict[str, tuple[Any, Any]] = {}  # "models:<device>" / "tokenizer:<work>" / "bank:<out>" -> (stamp, objects)
_VQGAN_FLAGS = {"pass preset= ": "pass --vqgan-preset ", "config_path= ": "--vqgan-config ",
                "(architecture from preset ": "(architecture from --vqgan-preset ",
                "(architecture from config_path ": "(architecture from --vqgan-config ",
                "(--clip-pretrained, ClipEncoder(model_name, pretrained=PATH))": "(--clip-weights)"}  # fmt: skip


def _cache_hit(key: str, stamp: Any) -> bool:
    """Whether ``_CACHE[key]`` was loaded from ``stamp`` (a ``work/`` rebuilt in this process is loaded again)."""
    return key in _CACHE and _CACHE[key][0] == stamp


def files_stamp(path: str | None) -> tuple:
    """Size, mtime and inode of a file or of a directory's files (a model file replaced in place is loaded again);
    empty for None or an open_clip tag."""
    p = Path(path) if path else None
    files = [] if p is None else [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) for f in files)


def load_image_models(cfg: PrepareConfig, device: str) -> tuple[Any, Any]:
    """The VQGAN (eval) and ClipEncoder of ``cfg`` on ``device``, loaded once per process and device (again when a
    model setting or file changes). The input check loads them before anything is written; the stages reuse them.

    Raises:
        ValueError: the VQGAN or CLIP files cannot be read or do not fit the architecture given (the flags named).
        FileNotFoundError: a VQGAN file is missing.
        ClipWeightsUnavailableError: an open_clip tag whose weights are not cached and cannot be downloaded.
    """
    key = f"models:{device}"
    stamp = (cfg.vqgan, cfg.vqgan_preset, cfg.vqgan_config, cfg.clip_model, cfg.clip_weights, cfg.batch_size,
             files_stamp(cfg.vqgan), files_stamp(cfg.vqgan_config), files_stamp(cfg.clip_weights))  # fmt: skip
    if not _cache_hit(key, stamp):
        from cm3leon_lightning.retrieval.encoder import ClipEncoder
        from cm3leon_lightning.tokenization.vqgan import VQGAN

        _CACHE.pop(key, None)  # free the models of other settings first
        if cfg.vqgan_preset is not None and cfg.vqgan_config is not None:
            raise ValueError("give either --vqgan-preset or --vqgan-config (the VQGAN's architecture), not both")
        try:
            vqgan = VQGAN.from_pretrained(cfg.vqgan, cfg.vqgan_preset, cfg.vqgan_config, map_location=device)
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)  # load_vqgan names its Python arguments: name the flags
            for python, flag in _VQGAN_FLAGS.items():
                msg = msg.replace(python, flag)
            raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(msg) from e
        clip = ClipEncoder(cfg.clip_model, cfg.clip_weights, device=device, batch_size=cfg.batch_size)
        _CACHE[key] = (stamp, (vqgan.eval(), clip))
    return _CACHE[key][1]


def load_models(run: Run) -> tuple[Any, Any, Any]:
    """The text tokenizer, VQGAN (eval, on the device) and ClipEncoder of this run, loaded once per process (again
    when ``work/tokenizer.json`` or the model settings change: a second ``prepare`` after ``work/`` was deleted)."""
    from cm3leon_lightning.tokenization.text import TextTokenizer

    path = run.work / "tokenizer.json"
    key, stamp = f"tokenizer:{run.work}", files_stamp(str(path))
    if not _cache_hit(key, stamp):
        _CACHE[key] = (stamp, TextTokenizer.load(path))
    return (_CACHE[key][1], *load_image_models(run.cfg, run.device()))


def models_device(run: Run) -> str:
    """Where this process loads the models to check the inputs and read their shapes: the run's device, or the CPU
    when worker processes encode (each loads its own; this one needs only the shapes)."""
    return run.device() if run.cfg.workers == 1 else "cpu"


# ------------------------------------------------------------------------------------------------ stage 1
def stage_tokenizer(run: Run) -> dict[str, Any]:
    """Copy the given tokenizer, or train one on the training split's cleaned captions (skipped when done)."""
    from cm3leon_lightning.data.sources import BadInput, clean_caption
    from cm3leon_lightning.tokenization.text import TextTokenizer

    cfg, target = run.cfg, run.work / "tokenizer.json"
    marker = run.work / "tokenizer.done.json"
    if target.is_file() and marker.is_file():
        if json.loads(marker.read_text())["sha256"] == file_sha256(target):
            return {"skipped": True}
    if cfg.tokenizer is not None:
        tok = TextTokenizer.load(cfg.tokenizer)  # validates the special ids
    else:

        def texts() -> Any:
            for split_key, caption in run.sources["main"].split_captions():  # no image read
                if is_val(split_key, cfg.val_fraction, cfg.seed):
                    continue
                try:
                    yield clean_caption(caption, cfg.max_caption_chars)[0]
                except BadInput:
                    continue

        tok = TextTokenizer.train(texts(), cfg.train_tokenizer_vocab, min_frequency=cfg.tokenizer_min_frequency)
    tmp = tok.save(run.work / ".tokenizer.tmp.json")  # renamed when complete: a killed save leaves no tokenizer.json
    os.replace(tmp, target)
    write_json(marker, {"sha256": file_sha256(target)})
    return {"skipped": False, "vocab_size": tok.vocab_size}


# ------------------------------------------------------------------------------------------------ stage 2
def encode_part(run: Run, collection: str, index: int, progress: Callable[[int], Any] | None = None) -> dict:
    """Encode one part of a collection into ``work/parts/<collection>-<index>/`` (see the module docstring).

    Returns:
        The part's counts: ``read``, ``kept``, skip reasons and repair reasons.
    """
    import torch

    from cm3leon_lightning.data.images import resize_center_crop
    from cm3leon_lightning.data.sources import BadInput, clean_caption, load_image, source_jpeg
    from cm3leon_lightning.retrieval.select import drop_caption_tokens, query_rng

    cfg, final = run.cfg, run.part_dir(collection, index)
    tok, vqgan, clip = load_models(run)
    res = vqgan.config.resolution
    start, stop = run.part_range(collection, index)
    counts: Counter = Counter()
    keys, captions, texts, vals, jpgs, codes, embs = [], [], [], [], [], [], []
    groups: list[str] = []  # split groups: documents of one group (captions of one image) never retrieve each other
    seg_docs: list[list[list[Any]] | None] = []  # per kept document: [[kind, length], ...] or None
    seg_ids: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    dropped: list[str] = []
    skipped: list[dict[str, Any]] = []  # which documents were skipped, and where they came from

    def flush() -> None:
        if not batch:
            return
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()  # (B, 3, R, R) uint8
        codes.append(vqgan.encode(x.to(vqgan.conv_dtype_device()[1])).cpu().numpy().astype(np.int32))  # (B, T)
        v = clip.embed_images(x)  # (B, D)
        t = clip.embed_texts(captions[len(captions) - len(batch) :])  # (B, D)
        q = clip.embed_texts(dropped)  # (B, D), text queries after query dropout
        d = t + v
        d /= np.linalg.norm(d, axis=1, keepdims=True)  # the document embedding (paper section 2.1)
        embs.append(np.stack([d, q, v], axis=1).astype(np.float16))  # (B, 3, D)
        if progress is not None:
            progress(len(batch))
        batch.clear()
        dropped.clear()

    whole = run.sources[collection].kind == "sft"  # instruction texts end with their answer: never cut
    for pair in run.sources[collection].iter_range(start, stop):
        counts["read"] += 1
        try:
            caption, repairs = clean_caption(pair.caption, cfg.max_caption_chars)
            ids = tok.encode(caption)
            if whole and "segments" not in pair.meta:
                check_whole(pair.key, repairs, len(ids), cfg.max_caption_tokens)
            image, image_repairs = load_image(pair.image, cfg.min_image_size)
            segments = None
            if "segments" in pair.meta:
                segments = encode_segments(pair.meta["segments"], run, repairs, whole, pair.key)
        except BadInput as e:
            counts[e.reason] += 1
            skipped.append(skip_record(pair.key, e.reason, str(e), pair.meta))
            continue
        seg_docs.append(None if segments is None else [[k, len(a)] for k, a in segments])
        seg_ids += [a for _, a in segments or ()]
        if len(ids) > cfg.max_caption_tokens:
            ids = ids[: cfg.max_caption_tokens]
            caption = tok.decode(ids)
            repairs.append("repaired_caption_tokens")
        counts.update(repairs + image_repairs + ["kept"])
        val = collection == "main" and is_val(pair.split_key, cfg.val_fraction, cfg.seed)
        keys.append(pair.key)
        groups.append(pair.split_key)
        captions.append(caption)
        texts.append(np.asarray(ids, np.int32))
        vals.append(val)
        jpgs.append(source_jpeg(pair.image, image) if val and cfg.keep_val_jpg else b"")
        batch.append(np.asarray(resize_center_crop(image, res), np.uint8))  # (R, R, 3)
        dropped.append(drop_caption_tokens(caption, cfg.query_dropout, query_rng(cfg.seed, pair.key)))
        if len(batch) == cfg.batch_size:
            flush()
    flush()

    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
    (tmp / "groups.json").write_text(json.dumps(groups), encoding="utf-8")
    if kill_point("encode"):
        hard_exit()
    dim, n_tok = clip.dim, vqgan.config.num_tokens
    np.save(tmp / "captions.npy", np.asarray(captions, dtype=str) if captions else np.zeros(0, "<U1"))
    np.save(tmp / "text.npy", np.concatenate(texts) if texts else np.zeros(0, np.int32))
    np.save(tmp / "text_offsets.npy", np.cumsum([0] + [len(t) for t in texts]).astype(np.int64))
    np.save(tmp / "codes.npy", np.concatenate(codes) if codes else np.zeros((0, n_tok), np.int32))
    np.save(tmp / "emb.npy", np.concatenate(embs) if embs else np.zeros((0, 3, dim), np.float16))
    np.save(tmp / "val.npy", np.asarray(vals, bool))
    (tmp / "segments.json").write_text(json.dumps(seg_docs), encoding="utf-8")
    np.save(tmp / "seg_ids.npy", np.concatenate(seg_ids).astype(np.int32) if seg_ids else np.zeros(0, np.int32))
    (tmp / "jpg.bin").write_bytes(b"".join(jpgs))
    np.save(tmp / "jpg_offsets.npy", np.cumsum([0] + [len(j) for j in jpgs]).astype(np.int64))
    write_json(tmp / "stats.json", dict(sorted(counts.items())))
    (tmp / "skipped.json").write_text(json.dumps(skipped), encoding="utf-8")
    seal(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    part_done("encode")
    return dict(counts)


WHERE_FIELDS = ("file", "row", "shard", "key", "image_id", "annotation_id", "source")  # RawPair.meta that locates


def skip_record(key: str, reason: str, detail: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a part records of a skipped document: its key, the skip reason, the message, and where it came from (the
    source's file, row, tar and member key, COCO ids or SFT line found in ``meta``)."""
    where = {k: meta[k] for k in WHERE_FIELDS if meta and meta.get(k) is not None}
    return {"key": key, "reason": reason, "detail": detail, "where": where}


def check_whole(key: str, repairs: list[str], n_ids: int, max_tokens: int) -> None:
    """Refuse a text that cleaning cut (``repaired_caption_truncated``) or that has more than ``max_tokens`` ids.

    Raises:
        BadInput: ``text_too_long`` (counted, the document skipped).
    """
    from cm3leon_lightning.data.cleaning import BadInput

    if "repaired_caption_truncated" in repairs or n_ids > max_tokens:
        raise BadInput(
            "text_too_long",
            f"{key}: its text would be cut (--max-caption-chars / --max-caption-tokens), losing its end, the answer",
        )


def encode_segments(
    segments: list[list[str]], run: Run, repairs: list[str], whole: bool = False, key: str = ""
) -> list[tuple[str, np.ndarray]]:
    """A document's segments (``[kind, text or image path]``, :class:`~cm3leon_lightning.data.sft.SFTSource`) as
    BPE ids and VQ codes, cleaned and cut like captions (repairs appended to ``repairs``); with ``whole``, a text
    segment that would be cut skips the document (:func:`check_whole`).

    Raises:
        BadInput: a text segment empty after cleaning, or cut with ``whole``, or an image that cannot be used
            (counted, skipped).
    """
    import torch

    from cm3leon_lightning.data.images import resize_center_crop
    from cm3leon_lightning.data.sources import clean_caption, load_image

    cfg = run.cfg
    tok, vqgan, _ = load_models(run)
    out: list[tuple[str, Any]] = []
    for kind, value in segments:
        if kind == "text":
            text, fixes = clean_caption(value, cfg.max_caption_chars)
            ids = tok.encode(text)
            if whole:
                check_whole(key, fixes, len(ids), cfg.max_caption_tokens)
            repairs += fixes + (["repaired_caption_tokens"] if len(ids) > cfg.max_caption_tokens else [])
            out.append(("text", np.asarray(ids[: cfg.max_caption_tokens], np.int32)))
        else:
            image, fixes = load_image(Path(value), cfg.min_image_size)
            repairs += fixes
            out.append(("image", np.asarray(resize_center_crop(image, vqgan.config.resolution), np.uint8)))
    pixels = [a for k, a in out if k == "image"]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (n, 3, R, R) uint8
    codes = iter(vqgan.encode(x.to(vqgan.conv_dtype_device()[1])).cpu().numpy().astype(np.int32))  # (n, T)
    return [(k, next(codes) if k == "image" else a) for k, a in out]


def load_part(directory: Path) -> dict[str, Any]:
    """The arrays of an encoded part (large ones memory-mapped)."""
    part: dict[str, Any] = {"keys": json.loads((directory / "keys.json").read_text(encoding="utf-8"))}
    groups_file = directory / "groups.json"  # absent in parts encoded before groups were kept: each its own group
    part["groups"] = json.loads(groups_file.read_text(encoding="utf-8")) if groups_file.is_file() else part["keys"]
    seg_file = directory / "segments.json"  # absent in parts encoded before documents had segments
    part["segments"] = json.loads(seg_file.read_text(encoding="utf-8")) if seg_file.is_file() else None
    if part["segments"] is not None:
        part["seg_ids"] = np.load(directory / "seg_ids.npy", allow_pickle=False)
        sizes = [sum(n for _, n in doc) if doc else 0 for doc in part["segments"]]
        part["seg_offsets"] = np.cumsum([0, *sizes])
    for name in ("captions", "text", "text_offsets", "val", "jpg_offsets"):
        part[name] = np.load(directory / f"{name}.npy", allow_pickle=False)
    for name in ("codes", "emb"):
        part[name] = np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    part["stats"] = json.loads((directory / "stats.json").read_text(encoding="utf-8"))
    skipped = directory / "skipped.json"  # absent in parts encoded before skipped documents were listed
    part["skipped"] = json.loads(skipped.read_text(encoding="utf-8")) if skipped.is_file() else []
    return part
