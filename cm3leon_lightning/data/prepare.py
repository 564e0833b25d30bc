"""``cm3leon prepare``: raw image-caption pairs -> retrieval-augmented training shards (DESIGN sections 1 and 4).

Stages, each resumable and each skipping outputs that are already complete (checked by sha256):

1. ``tokenizer``: train the byte-level BPE on the training captions (``train_tokenizer_vocab``) or copy a given one
   (``tokenizer``) to ``work/tokenizer.json``.
2. ``encode`` (parallel over parts): per part of ``samples_per_shard`` source documents, clean captions and images
   (rules in :mod:`cm3leon_lightning.data.sources`), BPE-encode captions, VQGAN-encode images, and CLIP-embed the
   document (mean of normalised text and image embeddings, renormalised), the text query (after query dropout keyed
   by the document) and the image query, stored as float16. Output: ``work/parts/<collection>-<index>/`` (with
   ``skipped.json``: each skipped document's key, reason, message and place in the source).
3. ``bank``: drop duplicate keys, gather the memory-bank documents (the training split, or a separate bank source)
   into float16 / int32 memory-mapped arrays and build the faiss :class:`MemoryBank` (``work/bank/``).
4. ``write`` (parallel over parts): search the bank by text and by image, select neighbours with the paper's rules
   (:func:`cm3leon_lightning.retrieval.select.select_neighbors`) and write ``train/shard-<index>.tar`` and
   ``val/shard-<index>.tar`` (held-out documents keep their source image as ``jpg``) plus ``stats/part-<index>.json``
   (its counts; ``skipped``: the documents skipped, duplicate keys included, each with its key, reason, message and
   ``where`` (file, row, tar...); digests of the encoded part and bank it was written from: a part written from an
   earlier ``work/``, since deleted, is written again).
5. ``manifest``: the merge step: ``train/manifest.json`` and ``val/manifest.json`` from every part's stats, a
   ``tokenizer.json`` copy next to each (the manifest's tokenizer path is relative to it) and ``summary.json``.

Part ``i`` holds source documents ``[i * samples_per_shard, (i + 1) * samples_per_shard)``, so outputs do not depend
on the number of processes or on which machine ran which part (``shard_range``), and a rerun after a kill rebuilds
exactly the missing parts, byte for byte. A part with no document of a split writes no shard for it (shard numbers
follow the part index and may skip). The settings that change the output are stored in ``work/plan.json`` with the
sources and a fingerprint of their input files; a rerun with different ones, or on input files that changed since
(added, removed, replaced or edited), is refused once an output depends on them (an encoded part; for the bank
settings, the bank; for the tokenizer's inputs, the tokenizer). Settings and model files are checked, and the models
loaded, before anything is written.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cm3leon_lightning.data import prepare_stages as st
from cm3leon_lightning.data.prepare_plan import check_plan
from cm3leon_lightning.data.sources import REPAIR_REASONS, SKIP_REASONS, PairSource

STAGES = ("tokenizer", "encode", "bank", "write", "manifest")
_RUNTIME_FIELDS = ("workers", "device", "shard_range", "stages", "progress")


@dataclass
class PrepareConfig:
    """Settings of ``cm3leon prepare`` (the command line flags have the same names with dashes).

    Attributes:
        vqgan: the image tokenizer: our ``save_pretrained`` directory, or a taming / Chameleon checkpoint
            (file or directory) as accepted by ``VQGAN.from_pretrained``.
        clip_weights: CLIP weights: a local checkpoint file (e.g. ``ClipModule.export_weights``) or an open_clip tag
            whose weights are already in the local cache.
        clip_model: open_clip architecture (paper: ``ViT-B-32``; ``cm3leon-clip-tiny`` for tests and the demo).
        vqgan_preset: architecture preset for a bare checkpoint without a config file (``f8_8192``, ``chameleon``...).
        vqgan_config: architecture file (taming / Chameleon yaml, or our config.json) for a bare checkpoint.
        tokenizer: a trained ``tokenizer.json`` to use; or None to train one with ``train_tokenizer_vocab``.
        train_tokenizer_vocab: vocabulary size of the BPE trained on the training captions (paper: 56320).
        tokenizer_min_frequency: BPE ``min_frequency`` when training.
        samples_per_shard: source documents per part (and so at most this many samples per output shard).
        val_fraction: share of documents held out for validation (chosen by a hash of the key and ``seed``).
        keep_val_jpg: store the source image as ``jpg`` in validation samples (FID / CIDEr references).
        k_per_modality: neighbours taken from the text search and from the image search (paper: 2).
        max_relevance: candidates scoring above this are skipped as near copies (paper: 0.9).
        duplicate_threshold: cosine above which a candidate duplicates an already chosen neighbour.
        image_duplicate_threshold: image-embedding cosine above which a candidate holds the query's picture or a
            chosen neighbour's (a re-post under another caption); 1 or above turns the rule off.
        query_dropout: share of caption words dropped from the text query (paper: 0.2).
        prefer_multimodal: consider image+caption documents first (paper section 2.1).
        search_k: candidates fetched per search before the rules apply (a margin over ``k_per_modality``).
        bank_factory: faiss index factory string of the memory bank (``Flat`` exact; ``IVF4096,PQ64``, ``HNSW32``).
        bank_train_size: rows (evenly spaced) used to train an IVF/PQ bank.
        min_image_size: images whose shorter side is smaller are skipped.
        max_caption_chars: longer captions are truncated at a word boundary.
        max_caption_tokens: longer BPE encodings are truncated (and the stored caption decoded from them).
        batch_size: images per VQGAN / CLIP forward pass.
        seed: seed of the validation split and of query dropout (keyed by document, so order-independent).
        workers: processes per parallel stage (1: in this process).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        shard_range: ``(start, stop)``: run encode / write only for parts ``start .. stop-1`` (several machines).
        stages: which stages to run, in pipeline order.
        progress: show tqdm progress bars.
    """

    vqgan: str
    clip_weights: str
    clip_model: str = "ViT-B-32"
    vqgan_preset: str | None = None
    vqgan_config: str | None = None
    tokenizer: str | None = None
    train_tokenizer_vocab: int | None = None
    tokenizer_min_frequency: int = 2
    samples_per_shard: int = 1000
    val_fraction: float = 0.0
    keep_val_jpg: bool = True
    k_per_modality: int = 2
    max_relevance: float = 0.9
    duplicate_threshold: float = 0.95
    image_duplicate_threshold: float = 0.95
    query_dropout: float = 0.2
    prefer_multimodal: bool = True
    search_k: int = 16
    bank_factory: str = "Flat"
    bank_train_size: int = 100_000
    min_image_size: int = 32
    max_caption_chars: int = 1000
    max_caption_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    shard_range: tuple[int, int] | None = None
    stages: tuple[str, ...] = STAGES
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.tokenizer is None) == (self.train_tokenizer_vocab is None):
            raise ValueError(
                "give exactly one of tokenizer (--tokenizer: a tokenizer.json) and train_tokenizer_vocab "
                "(--train-tokenizer-vocab: a size)"
            )
        from cm3leon_lightning.tokenization.text import DEFAULT_NUM_SENTINELS, special_tokens

        min_vocab = 256 + len(special_tokens(DEFAULT_NUM_SENTINELS))  # byte tokens + special tokens
        checks = {
            "train_tokenizer_vocab": self.train_tokenizer_vocab is None or self.train_tokenizer_vocab >= min_vocab,
            "tokenizer_min_frequency": self.tokenizer_min_frequency >= 1,
            "samples_per_shard": self.samples_per_shard >= 1,
            "val_fraction": 0.0 <= self.val_fraction < 1.0,
            "k_per_modality": self.k_per_modality >= 0,
            "search_k": self.search_k >= 1,
            "min_image_size": self.min_image_size >= 1,
            "max_caption_chars": self.max_caption_chars >= 1,
            "max_caption_tokens": self.max_caption_tokens >= 1,
            "batch_size": self.batch_size >= 1,
            "workers": self.workers >= 1,
            "bank_train_size": self.bank_train_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid prepare settings {bad}: need train_tokenizer_vocab >= {min_vocab} (256 byte tokens + "
                f"special tokens), k_per_modality >= 0, tokenizer_min_frequency, samples_per_shard, search_k, "
                f"min_image_size, max_caption_*, batch_size, workers, bank_train_size >= 1, 0 <= val_fraction < 1; "
                f"got {', '.join(f'{k}={getattr(self, k)}' for k in bad)}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
        if self.shard_range is not None:
            a, b = (int(x) for x in self.shard_range)
            if not 0 <= a < b:
                raise ValueError(f"shard_range must be (start, stop) with 0 <= start < stop, got {self.shard_range}")
            self.shard_range = (a, b)
        try:
            self.selection()  # validates the selection settings
        except ValueError as e:  # its messages begin with the field: name the flag too (the command line's errors)
            name = str(e).split(" ", 1)[0]
            raise ValueError(f"--{name.replace('_', '-')}: {e}" if hasattr(self, name) else str(e)) from e

    def selection(self) -> Any:
        """The :class:`~cm3leon_lightning.retrieval.select.SelectionConfig` of these settings."""
        from cm3leon_lightning.retrieval.select import SelectionConfig

        return SelectionConfig(
            self.k_per_modality,
            self.max_relevance,
            self.duplicate_threshold,
            self.prefer_multimodal,
            self.query_dropout,
            self.image_duplicate_threshold,
        )

    def identity(self) -> dict[str, Any]:
        """The settings that decide the output bytes (everything but processes, device, range, stages, progress)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RUNTIME_FIELDS}


# ------------------------------------------------------------------------------------------- orchestration
_WORKER: dict[str, Any] = {}


def _init_worker(run: st.Run, ids: Any, threads: int) -> None:
    import torch

    run.worker_id = ids.get()
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    _WORKER["run"] = run


def _call_worker(fn_name: str, args: tuple) -> dict[str, Any]:
    return getattr(st, fn_name)(_WORKER["run"], *args)


def run_parts(run: st.Run, fn: Callable[..., dict], tasks: Sequence[tuple], total: int, desc: str) -> list[dict]:
    """Run ``fn(run, *task)`` for every task, in this process (``workers=1``) or a spawn pool, with a progress bar.

    Tasks are independent and write their own outputs, so the results do not depend on the number of processes.
    """
    from tqdm.auto import tqdm

    cfg = run.cfg
    results: list[dict] = []
    skipped: Counter = Counter()
    bar = tqdm(total=total, desc=desc, unit="doc", disable=not cfg.progress, dynamic_ncols=True)

    def finished(res: dict) -> None:
        results.append(res)
        skipped.update({k: v for k, v in res.get("counts", res).items() if k in SKIP_REASONS})
        if skipped:
            bar.set_postfix(skipped=sum(skipped.values()), refresh=False)

    workers = min(cfg.workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            finished(fn(run, *task, progress=bar.update))
    else:
        ctx = mp.get_context("spawn")
        ids = ctx.Queue()
        for i in range(workers):
            ids.put(i)
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(run, ids, threads)) as ex:
            futures = {ex.submit(_call_worker, fn.__name__, tuple(task)): task for task in tasks}
            for future in as_completed(futures):
                res = future.result()
                c = res.get("counts", res)
                bar.update(
                    c.get("read", 0)
                    if "counts" not in res
                    else sum(v for k, v in c.items() if k.startswith("written_"))
                )
                finished(res)
    bar.close()
    return results


def check_inputs(cfg: PrepareConfig, device: str = "cpu") -> None:
    """Fail before anything is written (plan.json records these) on model files that do not exist or do not load
    (the VQGAN as ``vqgan_preset`` / ``vqgan_config`` or its own config describe it, the CLIP weights as
    ``clip_model``), CLIP weights that are neither a file nor a tag of ``clip_model``, a CUDA ``device`` this machine
    lacks, and a ``bank_factory`` faiss cannot build for its dimension. The models are loaded on ``device`` and kept
    for the stages (:func:`~cm3leon_lightning.data.prepare_encode.load_image_models`).

    Raises:
        FileNotFoundError: ``vqgan``, ``vqgan_config`` or ``tokenizer`` does not exist (the flag named).
        ValueError: unknown ``clip_model``, ``clip_weights`` neither a file nor a tag, model files that cannot be read
            or do not fit their architecture, a missing CUDA device, or a bad ``bank_factory``.
        ClipWeightsUnavailableError: ``clip_weights`` is a tag whose weights are not cached and cannot be downloaded.
    """
    import open_clip
    import torch

    from cm3leon_lightning.retrieval.encoder import register_clip_configs
    from cm3leon_lightning.retrieval.index import MemoryBank

    for name in ("vqgan", "vqgan_config", "tokenizer"):
        path = getattr(cfg, name)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')}: not found: {path}")
    if not cfg.clip_model.startswith(("local-dir:", "hf-hub:")):  # open_clip resolves these when the models load
        register_clip_configs()
        if open_clip.get_model_config(cfg.clip_model) is None:
            raise ValueError(f"--clip-model {cfg.clip_model!r} is not an open_clip architecture")
        if not os.path.isfile(cfg.clip_weights) and not open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_weights):
            tags = open_clip.list_pretrained_tags_by_model(cfg.clip_model)
            raise ValueError(
                f"--clip-weights {cfg.clip_weights!r} is neither an existing file nor a pretrained tag of "
                f"{cfg.clip_model!r} (tags: {tags})"
            )
    if cfg.device.startswith("cuda") and int(cfg.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    _, clip = st.load_image_models(cfg, device)
    try:
        MemoryBank(clip.dim, cfg.clip_model, cfg.bank_factory)
    except ValueError as e:
        raise ValueError(
            f"--bank-factory {cfg.bank_factory!r} cannot index {clip.dim}-d {cfg.clip_model} embeddings: {e}"
        ) from e


def prepare(
    source: PairSource,
    out: str | Path,
    config: PrepareConfig | None = None,
    bank_source: PairSource | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Prepare training shards from raw image-caption pairs (the Python API of ``cm3leon prepare``).

    Args:
        source: the documents to turn into samples (see :mod:`cm3leon_lightning.data.sources`).
        out: the output directory: ``train/`` and ``val/`` datasets (manifest + shards), ``stats/``,
            ``summary.json`` and the intermediate ``work/``.
        config: the settings; or pass them as keyword arguments (the fields of :class:`PrepareConfig`).
        bank_source: documents for the memory bank instead of the training split of ``source``.

    Returns:
        The summary: counts (documents read, kept, skipped and repaired by reason, written per split, duplicates),
        neighbours per sample, shards and samples per split (after the manifest stage), and seconds per stage.

    Raises:
        ValueError: bad settings, or ``out`` holds a preparation with other settings or of input files that changed
            since it began.
        RuntimeError: a stage needs outputs (parts) that another machine has not delivered yet.
    """
    cfg = config if config is not None else PrepareConfig(**settings)
    if config is not None and settings:
        raise ValueError(f"pass either config or keyword settings, not both (got {sorted(settings)})")
    sources = {"main": source, **({"bank": bank_source} if bank_source is not None else {})}
    run = st.Run(cfg, Path(out), sources)
    if len(source) == 0:
        raise ValueError("the source has no documents")
    if run.out.exists() and not run.out.is_dir():
        raise ValueError(f"--out {run.out} exists and is not a directory")
    check_inputs(cfg, st.models_device(run))
    check_plan(run, bank_source)
    st.reset_part_counts()
    summary: dict[str, Any] = {"seconds": {}}
    stages = [s for s in STAGES if s in cfg.stages]
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "tokenizer":
            summary["tokenizer"] = st.stage_tokenizer(run)
        elif stage == "encode":
            tasks = [(c, i) for c in sources for i in run.selected(c) if not st.is_sealed(run.part_dir(c, i))]
            if tasks:
                st.require_inputs(run, stage)
            total = sum(run.part_range(c, i)[1] - run.part_range(c, i)[0] for c, i in tasks)
            run_parts(run, st.encode_part, tasks, total, "encode")
            summary["encoded_parts"] = len(tasks)
        elif stage == "bank":
            summary["bank"] = st.stage_bank(run)
        elif stage == "write":
            tasks = [(i,) for i in run.selected("main") if not st.part_written(run, i)]
            st.require_inputs(run, stage, [i for (i,) in tasks])
            if tasks:
                st.warn_bank_without_pictures(run)
            run.sections = st.manifest_sections(run)
            total = sum(st.load_part(run.part_dir("main", i))["stats"].get("kept", 0) for (i,) in tasks)
            run_parts(run, st.write_part, tasks, total, "write")
            summary["written_parts"] = len(tasks)
        elif stage == "manifest":
            if not run.sections:
                st.require_inputs(run, stage)
                run.sections = st.manifest_sections(run)
            summary.update(st.stage_manifest(run))
        summary["seconds"][stage] = round(time.perf_counter() - t0, 3)
    if cfg.progress:
        print_summary(summary, run.out, file=sys.stderr)
    return summary


def print_summary(summary: dict[str, Any], out: Path, file: Any = None) -> None:
    """Print the counts, skip / repair reasons, splits and per-stage times of a run (to ``file``, default stdout)."""
    counts = summary.get("counts", {})
    lines = [f"cm3leon prepare: {out}"]
    if counts:
        written = sum(s["samples"] for s in summary.get("splits", {}).values())
        line = f"  documents read {counts.get('read', 0)}, kept {counts.get('kept', 0)}"
        lines.append(line + (f", written {written} (duplicate keys are dropped when written)" if written else ""))
        for title, names in (("skipped", SKIP_REASONS), ("repaired", REPAIR_REASONS)):
            got = {n: counts[n] for n in names if counts.get(n)}
            lines.append(f"  {title}: " + (", ".join(f"{k} {v}" for k, v in got.items()) or "none"))
            if title == "skipped" and got:
                lines[-1] += f" (which ones and why: 'skipped' of {out / 'stats'}/part-*.json)"
    bank = summary.get("bank", {})
    if bank.get("counts"):  # a separate bank source
        bc = bank["counts"]
        skipped = {n: bc[n] for n in SKIP_REASONS if bc.get(n)}
        lines.append(
            f"  memory bank source: read {bc.get('read', 0)}, kept {bc.get('kept', 0)}, {bank.get('rows', 0)} rows; "
            "skipped: "
            + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none")
            + (f" (which ones and why: {out / 'work' / 'parts'}/bank-*/skipped.json)" if skipped else "")
        )
    for split, s in summary.get("splits", {}).items():
        lines.append(f"  {split}: {s['samples']} samples in {s['shards']} shards -> {out / split}")
    if "neighbors_per_sample" in summary:
        lines.append(f"  neighbours per sample: {summary['neighbors_per_sample']}")
    if summary.get("rejected_candidates"):
        lines.append(f"  retrieval candidates skipped, by rule: {summary['rejected_candidates']}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.get("seconds", {}).items()))
    print("\n".join(lines), file=file or sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """``cm3leon prepare ...`` (see :mod:`cm3leon_lightning.data.prepare_cli`)."""
    from cm3leon_lightning.data.prepare_cli import main as cli_main

    return cli_main(argv)
