"""The stages of ``cm3leon prepare`` (see :mod:`cm3leon_lightning.data.prepare` for the pipeline and its layout).

Each stage function works on a :class:`Run` (settings, output directory, sources) and is safe to run in a worker
process: models and the memory bank are loaded once per process and cached. Every output is written under a
temporary name and renamed into place when complete, with the sha256 of its files, so a rerun can tell finished
outputs from ones a killed run left half written.

Stages 1 and 2 (tokenizer, encode) and the models they load live in :mod:`cm3leon_lightning.data.prepare_encode` and
are re-exported here; this module holds what every stage checks, and stages 3 to 5 (bank, write, manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon_lightning.data.prepare_encode import (  # noqa: F401  (re-exported: stages 1 and 2)
    _CACHE,
    _cache_hit,
    encode_part,
    encode_segments,
    load_image_models,
    load_models,
    load_part,
    models_device,
    skip_record,
    stage_tokenizer,
)
from cm3leon_lightning.data.prepare_run import (  # noqa: F401  (re-exported: the stages' shared bookkeeping)
    DONE_FILE,
    KILL_ENV,
    MissingPartsError,
    Run,
    SimulatedKill,
    hard_exit,
    is_sealed,
    is_val,
    kill_point,
    part_done,
    path_sha256,
    reset_part_counts,
    seal,
    seal_digest,
    write_inputs,
    write_json,
)
from cm3leon_lightning.data.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SEGMENTS_FORMAT_VERSION,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    file_sha256,
)


# ------------------------------------------------------------------------------------------ shared
def manifest_sections(run: Run) -> dict[str, dict[str, Any]]:
    """The manifest's tokenizer, image tokenizer, CLIP and retrieval sections (DESIGN section 4)."""
    from cm3leon_lightning.tokenization.text import TextTokenizer
    from cm3leon_lightning.tokenization.vocab import vqgan_weights_sha256

    cfg = run.cfg
    tok = TextTokenizer.load(run.work / "tokenizer.json")
    vqgan, clip = load_image_models(cfg, models_device(run))  # only their shapes: the input check loaded them
    gh, gw = vqgan.config.grid_size
    bank = "separate" if "bank" in run.sources else "train split"
    return {
        "text_tokenizer": {"path": "tokenizer.json", "sha256": tok.sha256, "n_text": tok.vocab_size,
                           "num_sentinels": tok.num_sentinels},
        "image_tokenizer": {"checkpoint_sha256": path_sha256(cfg.vqgan), "weights_sha256": vqgan_weights_sha256(vqgan),
                            "n_codes": vqgan.n_embed, "grid_h": gh, "grid_w": gw,
                            "image_size": vqgan.config.resolution},
        "clip": {"model": cfg.clip_model, "dim": clip.dim,
                 "weights_sha256": path_sha256(cfg.clip_weights) if os.path.isfile(cfg.clip_weights)
                 else f"open_clip:{cfg.clip_weights}"},
        "retrieval": {"k_per_modality": cfg.k_per_modality, "max_relevance": cfg.max_relevance,
                      "duplicate_threshold": cfg.duplicate_threshold, "query_dropout": cfg.query_dropout,
                      "image_duplicate_threshold": cfg.image_duplicate_threshold,
                      "prefer_multimodal": cfg.prefer_multimodal, "search_k": cfg.search_k,
                      "bank_factory": cfg.bank_factory, "bank": bank, "seed": cfg.seed},
    }  # fmt: skip


def require_inputs(run: Run, stage: str, parts: list[int] | None = None) -> None:
    """Check that ``stage`` has its inputs: the tokenizer stage's ``work/tokenizer.json``, and for ``write`` the
    encoded ``parts`` it writes and the memory bank, complete (sha256 as sealed).

    Raises:
        MissingPartsError: naming what is missing and the stage that makes it.
    """
    tok = run.work / "tokenizer.json"
    if not tok.is_file():
        raise MissingPartsError(
            f"the {stage} stage needs {tok}: run the tokenizer stage first (--stages tokenizer), or copy "
            f"work/tokenizer.json from the machine that ran it"
        )
    if stage != "write" or not parts:
        return
    missing = [f"main-{i:06d}" for i in parts or () if not is_sealed(run.part_dir("main", i))]
    if missing:
        raise MissingPartsError(
            f"the write stage needs the encoded parts it writes; missing or incomplete: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all). Run the encode stage for them, or gather "
            f"work/parts/ from the machines that ran them (--shard-range)."
        )
    if not is_sealed(run.work / "bank"):
        raise MissingPartsError(
            f"the write stage needs the memory bank {run.work / 'bank'} (missing or incomplete): run the bank stage "
            f"first, or copy work/bank/ from the machine that ran it"
        )


# ------------------------------------------------------------------------------------------------ stage 3
def stage_bank(run: Run) -> dict[str, Any]:
    """Drop duplicate keys (first in source order wins), gather the bank documents and build the faiss index.

    The bank holds the training split of the main source, or every document of a separate bank source. Its
    arrays (``emb.npy`` float16 document embeddings, ``img.npy`` their image embeddings, ``codes.npy``, ``text.npy``
    + ``text_offsets.npy``) are written as memory maps, part by part; ``dups.json`` lists the duplicates the write
    stage skips.
    """
    from numpy.lib.format import open_memmap

    from cm3leon_lightning.retrieval.index import MemoryBank

    cfg, final = run.cfg, run.work / "bank"
    if is_sealed(final):
        return {**json.loads((final / "stats.json").read_text(encoding="utf-8")), "skipped": True}
    collections = ["main"] + (["bank"] if "bank" in run.sources else [])
    missing = [f"{c}-{i:06d}" for c in collections for i in range(run.n_parts(c)) if not is_sealed(run.part_dir(c, i))]
    if missing:
        raise MissingPartsError(
            f"the bank stage needs every encoded part; missing or incomplete: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all). Run the encode stage for them, or gather "
            f"work/parts/ from the machines that ran them (--shard-range)."
        )
    bank_collection = collections[-1]
    dups: dict[str, list[int]] = {}
    rows: dict[int, np.ndarray] = {}  # part index -> local indices of bank rows
    n_text = 0
    for c in collections:
        seen: set[str] = set()
        for p in range(run.n_parts(c)):
            d = run.part_dir(c, p)
            keys = json.loads((d / "keys.json").read_text(encoding="utf-8"))
            val, offsets = np.load(d / "val.npy"), np.load(d / "text_offsets.npy")
            dup = [i for i, k in enumerate(keys) if k in seen or seen.add(k)]  # set.add returns None
            if dup:
                dups[d.name] = dup
            if c == bank_collection:
                keep = np.setdiff1d(np.flatnonzero(~val), dup).astype(np.int64)
                rows[p] = keep
                n_text += int((offsets[keep + 1] - offsets[keep]).sum())
    n = sum(len(r) for r in rows.values())
    if n == 0:
        raise MissingPartsError(empty_bank_message(run, bank_collection))
    tmp = final.with_name(".bank.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    first = load_part(run.part_dir(bank_collection, next(iter(rows))))
    dim, n_tok = first["emb"].shape[2], first["codes"].shape[1]
    emb = open_memmap(tmp / "emb.npy", "w+", np.float16, (n, dim))
    img = open_memmap(tmp / "img.npy", "w+", np.float16, (n, dim))  # for the query's picture under other captions
    codes = open_memmap(tmp / "codes.npy", "w+", np.int32, (n, n_tok))
    text = open_memmap(tmp / "text.npy", "w+", np.int32, (n_text,))
    text_offsets = np.zeros(n + 1, np.int64)
    keys_out: list[str] = []
    groups_out: list[str] = []
    r = 0
    for p, idx in rows.items():
        part = load_part(run.part_dir(bank_collection, p))
        emb[r : r + len(idx)] = part["emb"][idx, 0]  # the document embeddings
        img[r : r + len(idx)] = part["emb"][idx, 2]  # the image embeddings (the image queries)
        codes[r : r + len(idx)] = part["codes"][idx]
        off = part["text_offsets"]
        for i in idx:
            t = part["text"][off[i] : off[i + 1]]
            text[text_offsets[r] : text_offsets[r] + len(t)] = t
            text_offsets[r + 1] = text_offsets[r] + len(t)
            keys_out.append(part["keys"][i])
            groups_out.append(part["groups"][i])
            r += 1
    for arr in (emb, img, codes, text):
        arr.flush()
    del emb, img, codes, text
    np.save(tmp / "text_offsets.npy", text_offsets)
    emb = np.load(tmp / "emb.npy", mmap_mode="r")
    step = max(1, n // cfg.bank_train_size)
    chunk = 65536
    try:
        bank = MemoryBank.build(
            ((emb[i : i + chunk], keys_out[i : i + chunk]) for i in range(0, n, chunk)),
            dim,
            cfg.clip_model,
            cfg.bank_factory,
            train_sample=np.asarray(emb[::step][: cfg.bank_train_size], np.float32),
        )
    except ValueError as e:
        raise ValueError(
            f"the memory bank of {n} documents cannot be built with --bank-factory {cfg.bank_factory!r}: {e}. Rerun "
            f"with another --bank-factory (or --bank-train-size): the encoded parts are kept"
        ) from e
    bank.save(tmp / "index")
    write_json(tmp / "dups.json", dups)
    write_json(tmp / "groups.json", groups_out)
    stats: dict[str, Any] = {"rows": n, "duplicates": sum(len(v) for v in dups.values()), "factory": cfg.bank_factory}
    if bank_collection == "bank":  # a separate bank source: its read / kept / skip counts, as the main source's
        counts: Counter = Counter()
        for p in range(run.n_parts("bank")):
            counts.update(json.loads((run.part_dir("bank", p) / "stats.json").read_text(encoding="utf-8")))
        stats["counts"] = dict(sorted(counts.items()))
    write_json(tmp / "stats.json", stats)
    seal(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {**stats, "skipped": False}


def empty_bank_message(run: Run, collection: str) -> str:
    """Why the memory bank has no document: the read / kept / skip counts of ``collection``'s encoded parts (the
    training split's documents held out for validation when some were kept), and where the counts per part are."""
    from cm3leon_lightning.data.sources import SKIP_REASONS

    counts: Counter = Counter()
    for p in range(run.n_parts(collection)):
        counts.update(json.loads((run.part_dir(collection, p) / "stats.json").read_text(encoding="utf-8")))
    skipped = ", ".join(f"{k} {counts[k]}" for k in SKIP_REASONS if counts.get(k)) or "none"
    source = "the --bank-source" if collection == "bank" else "the --source"
    why = "no bank document survived cleaning"
    if counts.get("kept"):
        why = f"every document kept is held out for validation (--val-fraction {run.cfg.val_fraction}) or a duplicate"
    return (
        f"the memory bank is empty: {why} ({source}: read {counts.get('read', 0)}, kept {counts.get('kept', 0)}; "
        f"skipped: {skipped}; counts per part in {run.work / 'parts'}/{collection}-*/stats.json)"
    )


# ------------------------------------------------------------------------------------------------ stage 4
def load_bank(run: Run) -> dict[str, Any]:
    """The memory bank and its token arrays (memory-mapped), loaded once per process."""
    key, stamp = f"bank:{run.out}", seal_digest(run.work / "bank")
    if not _cache_hit(key, stamp):
        from cm3leon_lightning.retrieval.index import MemoryBank

        d = run.work / "bank"
        index = MemoryBank.load(d / "index", model_name=run.cfg.clip_model)
        bank = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in ("emb", "codes", "text")}
        bank.update(
            index=index,
            text_offsets=np.load(d / "text_offsets.npy"),
            row={k: i for i, k in enumerate(index.keys)},
            dups=json.loads((d / "dups.json").read_text(encoding="utf-8")),
        )
        groups = d / "groups.json"  # absent in banks built before groups were kept
        bank["groups"] = json.loads(groups.read_text(encoding="utf-8")) if groups.is_file() else list(index.keys)
        img = d / "img.npy"  # absent in banks built before image embeddings were kept: the group rule only
        bank["img"] = np.load(img, mmap_mode="r") if img.is_file() else None
        _CACHE[key] = (stamp, bank)
    return _CACHE[key][1]


def stats_path(run: Run, index: int) -> Path:
    """The per-part stats JSON written by the write stage."""
    return run.out / "stats" / f"part-{index:06d}.json"


def part_written(run: Run, index: int) -> bool:
    """Whether part ``index`` has its stats JSON and its shards with the recorded sha256, written from the encoded
    part and bank now in ``work/`` (shards of an earlier preparation whose ``work/`` was deleted are stale).

    An input absent here (a merge machine without ``work/parts/``) or not recorded (an earlier version) is not
    compared.
    """
    try:
        stats = json.loads(stats_path(run, index).read_text(encoding="utf-8"))
        if not all(file_sha256(run.out / split / s["name"]) == s["sha256"] for split, s in stats["shards"].items()):
            return False
        recorded = stats.get("inputs", {})
        return all(now is None or recorded.get(k, now) == now for k, now in write_inputs(run, index).items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def write_part(run: Run, index: int, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Select neighbours for part ``index``'s documents and write its train / val shards and stats JSON.

    Returns:
        The part's stats (also written to ``stats/part-<index>.json``).
    """
    from cm3leon_lightning.data.shards import Neighbor, ShardSample, ShardWriter
    from cm3leon_lightning.retrieval.select import select_neighbors

    cfg, src = run.cfg, run.part_dir("main", index)
    part, bank = load_part(src), load_bank(run)
    dup = set(bank["dups"].get(src.name, []))
    skipped = part["skipped"] + [
        skip_record(part["keys"][i], "duplicate_key", "an earlier document has this key") for i in sorted(dup)
    ]
    rows = [i for i in range(len(part["keys"])) if i not in dup]
    emb = np.asarray(part["emb"][rows], np.float32)  # (n, 3, D): document, text query, image query
    k = min(cfg.search_k, len(bank["index"]))
    by_text, by_image = (bank["index"].search(emb[:, q], k) if rows else None for q in (1, 2))
    jpg, jo, to, bo = (src / "jpg.bin").read_bytes(), part["jpg_offsets"], part["text_offsets"], bank["text_offsets"]
    selection = cfg.selection()
    counts: Counter = Counter(part["stats"])
    counts["duplicate_key"] += len(dup)
    n_neighbors: Counter = Counter()
    rejected: Counter = Counter()  # candidates skipped, by rule
    writers: dict[str, Any] = {}
    for j, i in enumerate(rows):
        key = part["keys"][i]
        chosen = select_neighbors(
            key, by_text.ids[j], by_text.scores[j], by_image.ids[j], by_image.scores[j],
            bank["index"].keys, None, bank["emb"], selection, query_embedding=emb[j, 0],
            query_group=part["groups"][i], groups=bank["groups"], image_embeddings=bank["img"],
            query_image_embedding=emb[j, 2], rejected=rejected,
        )  # fmt: skip
        neighbors = []
        for c in chosen:
            r = bank["row"][c["key"]]
            neighbors.append(Neighbor(c["key"], c["score"], c["by"], bank["text"][bo[r] : bo[r + 1]], bank["codes"][r]))
            counts[f"neighbors_by_{c['by']}"] += 1
        split = "val" if part["val"][i] else "train"
        sample = ShardSample(
            key, str(part["captions"][i]), part["text"][to[i] : to[i + 1]], part["codes"][i], neighbors,
            (jpg[jo[i] : jo[i + 1]] or None) if split == "val" else None, part_segments(part, i),
        )  # fmt: skip
        if sample.segments is not None:
            counts[f"segment_documents_{split}"] += 1
        if split not in writers:
            tmp = run.out / f".{split}-{index:06d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            writers[split] = ShardWriter(tmp, **run.sections, samples_per_shard=1 << 62)
        writers[split].write(sample)
        counts[f"written_{split}"] += 1
        n_neighbors[str(len(neighbors))] += 1
        if j == 0 and kill_point("write"):
            hard_exit()
        if progress is not None:
            progress(1)
    shards = {}
    for split, writer in sorted(writers.items()):
        info = writer.close().shards[0]
        name = SHARD_PATTERN.format(index)
        (run.out / split).mkdir(parents=True, exist_ok=True)
        os.replace(writer.out_dir / info.name, run.out / split / name)
        shutil.rmtree(writer.out_dir)
        shards[split] = {"name": name, "count": info.count, "sha256": info.sha256}
    start, stop = run.part_range("main", index)
    stats = {"part": index, "range": [start, stop], "counts": dict(sorted(counts.items())),
             "neighbors_per_sample": dict(sorted(n_neighbors.items())),
             "rejected_candidates": dict(sorted(rejected.items())), "picture_rule": bank["img"] is not None,
             "shards": shards, "inputs": write_inputs(run, index), "skipped": skipped}  # fmt: skip
    stats_path(run, index).parent.mkdir(parents=True, exist_ok=True)
    write_json(stats_path(run, index), stats)
    part_done("write")
    return stats


def warn_image_duplicates(run: Run, skipped: int, chosen: int, samples: int) -> None:
    """Warn when the picture rule skipped more candidates than all the neighbours chosen and the contexts are less
    than half full: a CLIP that is not trained (enough) maps every picture to nearly one direction, and the rule then
    empties the retrieved contexts. Full contexts are not warned of: a picture shared by several documents (the
    questions of one image in SFT data) legitimately skips more candidates than are chosen."""
    if skipped > chosen and chosen < samples * run.cfg.k_per_modality:  # under k of the 2k slots per sample
        warnings.warn(
            f"cm3leon prepare: the picture rule (--image-duplicate-threshold {run.cfg.image_duplicate_threshold}) "
            f"skipped {skipped} retrieval candidates as the query's or a chosen neighbour's picture, more than the "
            f"{chosen} neighbours chosen: the CLIP ({run.cfg.clip_model}) gives different pictures nearly one "
            f"embedding (not trained?). Use a trained CLIP, or a threshold above 1 to turn the rule off "
            f"(in a new --out); counts per rule: 'rejected_candidates' of {run.out / 'summary.json'}",
            stacklevel=2,
        )


def warn_bank_without_pictures(run: Run) -> None:
    """Warn when the picture rule is on but the memory bank was built before image embeddings were kept (no
    ``img.npy``, a preparation begun by an earlier version): the parts written now skip no candidate by it."""
    bank = run.work / "bank"
    if run.cfg.image_duplicate_threshold < 1 and not (bank / "img.npy").is_file():
        warnings.warn(
            f"cm3leon prepare: the memory bank {bank} was built by an earlier version without image embeddings (no "
            f"img.npy): the parts written now do not apply the picture rule (--image-duplicate-threshold "
            f"{run.cfg.image_duplicate_threshold}), so a query's photo re-posted under another caption can be "
            f"retrieved into its own context. To apply it, delete {bank} and rerun the bank, write and manifest "
            f"stages (the encoded parts are kept; the parts already written are rewritten)",
            stacklevel=2,
        )


def parts_without_pictures(run: Run, stats: list[dict[str, Any]]) -> list[int]:
    """The parts whose stats say they were written without the picture rule while it is on (``picture_rule``: the
    bank had no ``img.npy``). Stats of earlier versions lack the key: the bank here tells (the parts were written
    from it, :func:`part_written` checks), and without a bank here (a merge machine) they count as without."""
    if run.cfg.image_duplicate_threshold >= 1:  # off: no cosine is above 1
        return []
    here = (run.work / "bank" / "img.npy").is_file()
    return [s["part"] for s in stats if not s.get("picture_rule", here)]


def warn_parts_without_pictures(run: Run, parts: list[int], total: int) -> None:
    """Warn that the manifest is written for ``parts`` written without the picture rule (it records
    ``image_duplicate_threshold`` null): a rerun of a preparation an earlier version finished writes nothing, so the
    write stage's warning is not given."""
    warnings.warn(
        f"cm3leon prepare: {len(parts)} of {total} parts (e.g. {parts[:3]}) were written without the picture rule "
        f"(--image-duplicate-threshold {run.cfg.image_duplicate_threshold}): their memory bank was built by an "
        f"earlier version without image embeddings (no img.npy), so a query's photo re-posted under another caption "
        f"can be in its own context; the manifests record image_duplicate_threshold null. To apply the rule, delete "
        f"{run.work / 'bank'} and rerun the bank, write and manifest stages (the encoded parts are kept)",
        stacklevel=2,
    )


def part_segments(part: dict[str, Any], i: int) -> list[tuple[str, np.ndarray]] | None:
    """Document ``i``'s segments, from the part's flat ``seg_ids``; None for a caption-image document."""
    doc = part["segments"][i] if part["segments"] is not None else None
    if not doc:
        return None
    out, start = [], int(part["seg_offsets"][i])
    for kind, n in doc:
        out.append((kind, part["seg_ids"][start : start + n]))
        start += n
    return out


# ------------------------------------------------------------------------------------------------ stage 5
def stage_manifest(run: Run) -> dict[str, Any]:
    """The merge step: each split's ``manifest.json`` from every part's stats, and ``summary.json``."""
    missing = [i for i in range(run.n_parts("main")) if not part_written(run, i)]
    if missing:
        raise MissingPartsError(
            f"the manifest stage needs every part written; missing or incomplete parts: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Run the write stage for them, or gather train/, val/ and stats/ "
            f"from the machines that ran them (--shard-range)."
        )
    stats = [json.loads(stats_path(run, i).read_text(encoding="utf-8")) for i in range(run.n_parts("main"))]
    for leftover in run.out.glob(".*.tmp"):  # half-written shards of killed runs
        shutil.rmtree(leftover, ignore_errors=True)
    totals: Counter = Counter()
    hist: Counter = Counter()
    rejected: Counter = Counter()
    for s in stats:
        totals.update(s["counts"])
        hist.update(s["neighbors_per_sample"])
        rejected.update(s.get("rejected_candidates", {}))  # absent in parts written by earlier versions
    summary: dict[str, Any] = {"counts": dict(sorted(totals.items())), "splits": {}}
    summary["neighbors_per_sample"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    summary["rejected_candidates"] = dict(sorted(rejected.items()))
    chosen = totals["neighbors_by_text"] + totals["neighbors_by_image"]
    warn_image_duplicates(run, rejected["image_duplicate"], chosen, totals["written_train"] + totals["written_val"])
    sections, without = run.sections, parts_without_pictures(run, stats)
    if without:  # the manifest records the settings used: this rule was not
        warn_parts_without_pictures(run, without, len(stats))
        sections = {**sections, "retrieval": {**sections["retrieval"], "image_duplicate_threshold": None}}
    for split in ("train", "val"):
        shards = [ShardInfo(**s["shards"][split]) for s in stats if split in s["shards"]]
        if not shards:  # none in this preparation: a manifest left by an earlier one (work/ deleted) is not its data
            (run.out / split / MANIFEST_NAME).unlink(missing_ok=True)
            continue
        version = SEGMENTS_FORMAT_VERSION if totals[f"segment_documents_{split}"] else FORMAT_VERSION
        manifest = Manifest(**sections, shards=shards, format_version=version)
        shutil.copyfile(run.work / "tokenizer.json", run.out / split / "tokenizer.json")
        manifest.save(run.out / split / MANIFEST_NAME)
        summary["splits"][split] = {"shards": len(shards), "samples": manifest.num_samples}
    bank_stats = run.work / "bank" / "stats.json"  # absent on a merge machine without work/bank/
    if bank_stats.is_file():
        summary["bank"] = json.loads(bank_stats.read_text(encoding="utf-8"))
    write_json(run.out / "summary.json", summary)
    return summary
