"""CM3LeonDataModule: streams prepared shards (DESIGN section 4) into CM3 training batches.

A data source is a dataset directory (``manifest.json`` + shards), a ``manifest.json`` path, or shard paths/URLs
(a list, or brace patterns such as ``s3://bucket/ds/shard-{000000..000099}.tar``) with their manifest given by
``manifest`` or found as ``manifest.json`` beside the first shard. Remote URLs (fsspec) and ``pipe:`` commands are
refused unless ``allow_remote=True``.

The vocabulary comes from the manifest (:attr:`CM3LeonDataModule.vocab`), so the CLI links it to the model.
Training batches are exact (each sample once per epoch, see :mod:`cm3leon_lightning.data.plan`) or resampled, and
resume mid-epoch to the exact batch through :meth:`CM3LeonDataModule.state_dict`, which Lightning stores in every
checkpoint. Validation and test loaders are finite, exact and deterministic (no shuffling, epoch 0 masks).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from cm3leon_lightning.data.sampling import trainer_progress
from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest, ShardInfo, is_remote
from cm3leon_lightning.data.stages import PipelineConfig, document_length
from cm3leon_lightning.data.stream import ResumableLoader, ShardStream, _distributed_world_size
from cm3leon_lightning.tokenization.vocab import MultimodalVocab


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern or a list of them (``shard-{000000..000009}.tar``)."""
    from braceexpand import braceexpand

    patterns = [spec] if isinstance(spec, str) else list(spec)
    return [u for p in patterns for u in braceexpand(p)]


def resolve_source(
    spec: str | Sequence[str], manifest: str | None = None, allow_remote: bool = False
) -> tuple[Manifest, list[str], list[ShardInfo]]:
    """A data source -> (its manifest, the shard URLs, their manifest entries), in the same order.

    Raises:
        ValueError: a remote URL without ``allow_remote``, a local path that does not exist (neither a shard nor a
            pattern), a dataset directory or manifest inside a list, a missing manifest, a shard the manifest lacks,
            a shard named twice, or (without ``manifest``) a shard outside the first shard's directory, whose
            manifest was read.
    """
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec  # a pathlib.Path was iterated as a list
    if not isinstance(spec, str):
        spec = [os.fspath(s) for s in spec]
        folders = [s for s in spec if not is_remote(s) and (s.endswith(".json") or Path(s).is_dir())]
        if folders:
            raise ValueError(
                f"{folders[0]} is a dataset directory or manifest, but a list names shard files of one dataset; give "
                f"the dataset directory (or its {MANIFEST_NAME}) alone, not in a list (datasets cannot be combined)"
            )
    if isinstance(spec, str) and not is_remote(spec):
        path = Path(str(spec).removeprefix("file://"))
        if path.is_dir() or path.suffix == ".json":
            mpath = path / MANIFEST_NAME if path.is_dir() else path
            if not mpath.exists():
                raise ValueError(f"no {MANIFEST_NAME} in {path}; prepare the dataset or give the manifest path")
            m = Manifest.load(mpath)
            return m, [str(mpath.parent / s.name) for s in m.shards], list(m.shards)
        if not path.exists() and "{" not in path.name and not path.name.endswith(".tar"):  # a mistyped directory
            raise ValueError(
                f"{path}: no such directory or file (give a prepared dataset directory, its {MANIFEST_NAME}, or "
                "shard .tar paths)"
            )
    urls = expand_urls(spec)
    if not urls:
        raise ValueError(f"data source {spec!r} names no shards")
    remote = [u for u in urls + ([manifest] if manifest else []) if is_remote(u)]
    if remote and not allow_remote:
        raise ValueError(f"{remote[0]!r} is a remote URL or pipe; set allow_remote=True to stream from it")
    if manifest is None:
        if urls[0].startswith("pipe:"):
            raise ValueError("pipe: shard URLs need the manifest's location: pass manifest=...")
        manifest = urls[0].rsplit("/", 1)[0] + "/" + MANIFEST_NAME if "/" in urls[0] else MANIFEST_NAME
        elsewhere = [u for u in urls if _folder(u) != _folder(urls[0])]
        if elsewhere:  # matched by name to the first directory's manifest: its counts and sha256 are another file's
            raise ValueError(
                f"shard {elsewhere[0]!r} is not in the directory of the first shard, whose {MANIFEST_NAME} was read: "
                "list the shards of one dataset, or pass manifest=... for shards stored apart"
            )
    m = Manifest.load(manifest, allow_remote)
    by_name = {s.name: s for s in m.shards}
    infos = []
    for u in urls:
        words = u.split()  # "pipe:aws s3 cp s3://b/shard-000000.tar -": the shard is the last word naming a .tar
        name = next((w for w in reversed(words) if w.endswith(".tar")), words[-1]).rsplit("/", 1)[-1]
        if name not in by_name:
            raise ValueError(f"shard {u!r} is not listed in manifest {manifest} (it lists {sorted(by_name)[:5]}...)")
        infos.append(by_name[name])
    named = Counter(info.name for info in infos)
    twice = next((name for name, n in named.items() if n > 1), None)
    if twice is not None:  # (a pattern and a path, or two spellings of one directory)
        where = [u for u, info in zip(urls, infos, strict=True) if info.name == twice]
        raise ValueError(
            f"shard {twice} is named {named[twice]} times ({', '.join(where)}): its samples would be read "
            f"{named[twice]} times an epoch; name each shard once"
        )
    return m, urls, infos


def _folder(url: str) -> str:
    """The directory of a shard URL (a local one resolved, so ``./ds`` and ``ds`` are one)."""
    if is_remote(url):
        return url.rsplit("/", 1)[0]
    return str(Path(url.removeprefix("file://")).parent.resolve())


def _check_same_tokenizers(manifests: dict[str, Manifest]) -> None:
    """Raise ValueError when splits record different text-tokenizer or VQGAN hashes (equal sizes are not enough:
    the same ids would mean other words or codes, and the validation loss nothing)."""
    for section, key in (("text_tokenizer", "sha256"), ("image_tokenizer", "checkpoint_sha256")):
        seen = {split: getattr(m, section).get(key) for split, m in manifests.items()}
        known = {v for v in seen.values() if v}
        if len(known) > 1 and not (section == "image_tokenizer" and _same_vqgan_weights(manifests)):
            raise ValueError(f"the splits were tokenized with different tokenizers ({section}.{key}): {seen}")


def _same_vqgan_weights(manifests: dict[str, Manifest]) -> bool:
    """Whether every split records the same VQGAN weights hash (``image_tokenizer.weights_sha256``): one VQGAN saved
    as two files (a taming checkpoint and its ``save_pretrained`` copy) gives the same codes."""
    seen = [m.image_tokenizer.get("weights_sha256") for m in manifests.values()]
    return all(seen) and len(set(seen)) == 1


class CM3LeonDataModule(L.LightningDataModule):
    """Streaming CM3Leon data: retrieval-augmented, CM3-masked, static-shape batches from prepared shards.

    Args:
        train_data: training source (directory, manifest path, or shard paths/URL patterns).
        val_data: validation source.
        test_data: test source.
        manifest: the manifest of ``train_data`` when it is a list of shards whose directory lacks one.
        seq_len: tokens per row (paper: 4096). An example that does not fit drops retrieved documents, then
            cuts its caption from the end (the first cut warns; see ``cut_captions``); a slot without room for the
            query's image and one caption token is refused.
        batch_size: rows per batch and rank.
        pack: examples packed per row (each fitted to ``seq_len // pack`` tokens), for small-image settings.
        num_workers: DataLoader workers per rank.
        max_retrieved: at most this many retrieved documents per example (paper section 2.1: three).
        no_retrieval_share: share of examples without retrieved documents.
        image_first_prob: probability that an example's documents put the image first (default: caption first).
        infill: apply CM3 masking (paper section 2.2).
        infill_kwargs: keyword arguments of ``cm3_infill`` (``rate``, ``whole_segment_prob``).
        mode: ``exact`` (each sample once per epoch across ranks) or ``resampled`` (shards drawn with replacement).
        shuffle: shuffle training shards per epoch and samples within windows of ``shuffle_shards`` shards.
        shuffle_shards: shards read into memory and shuffled together.
        seed: base seed of every random choice (shard order, retrieved documents, masks).
        verify_sha256: check each shard against the manifest's sha256 before reading it.
        allow_remote: allow fsspec URLs and ``pipe:`` commands.
        max_skip_share: stop when a rank skips more than this share of an epoch's samples (bad data).
        pad_to_multiple: the model's vocabulary is padded to a multiple of this.
        pin_memory: DataLoader ``pin_memory``.
        cut_captions: whether a query caption that does not fit is cut from its end (``true``) or its sample skipped
            and counted as ``too_long`` (``false``). Default (null): cut, except the texts of instruction-tuning
            documents (keys ``sft-...`` from ``cm3leon prepare --source sft``), which end with the answer.

    To change the per-sample pipeline, subclass :class:`~cm3leon_lightning.data.stream.ShardStream` (e.g. its
    ``iter_worker``, which knows the ``epoch``) and name it in :attr:`stream_class`, or override
    :meth:`build_stream`; exact resume works as long as the stream stays a pure function of its position.

    The training position follows the trainer's consumed batches, so each new Trainer's ``fit`` starts the data where
    that trainer's counters start: at epoch 0, batch 0 (the batches of a fresh data module), or at its checkpoint's
    position with ``ckpt_path``, or at the position given to :meth:`load_state_dict` after the last fit. Fitting
    again with the same Trainer goes on where it stopped.
    """

    stream_class: type[ShardStream] = ShardStream
    """The class of every split's stream (:meth:`build_stream`)."""

    def __init__(
        self,
        train_data: str | list[str] | None = None,
        val_data: str | list[str] | None = None,
        test_data: str | list[str] | None = None,
        manifest: str | None = None,
        seq_len: int = 4096,
        batch_size: int = 8,
        pack: int = 1,
        num_workers: int = 2,
        max_retrieved: int = 3,
        no_retrieval_share: float = 0.1,
        image_first_prob: float = 0.0,
        infill: bool = True,
        infill_kwargs: dict[str, Any] | None = None,
        mode: Literal["exact", "resampled"] = "exact",
        shuffle: bool = True,
        shuffle_shards: int = 4,
        seed: int = 0,
        verify_sha256: bool = True,
        allow_remote: bool = False,
        max_skip_share: float = 0.01,
        pad_to_multiple: int = 128,
        pin_memory: bool = False,
        cut_captions: bool | None = None,
    ) -> None:
        super().__init__()
        checks = {
            "seq_len": seq_len >= 1,
            "batch_size": batch_size >= 1,
            "pack": pack >= 1,
            "num_workers": num_workers >= 0,
            "max_retrieved": max_retrieved >= 0,
            "no_retrieval_share": 0.0 <= no_retrieval_share <= 1.0,
            "image_first_prob": 0.0 <= image_first_prob <= 1.0,
            "max_skip_share": 0.0 <= max_skip_share <= 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid {bad}: sizes must be >= 1 (num_workers, max_retrieved >= 0), shares in [0, 1]")
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
        self.save_hyperparameters()
        self.sources: dict[str, tuple[Manifest, list[str], list[ShardInfo]]] = {}
        for split, spec in (("train", train_data), ("val", val_data), ("test", test_data)):
            if spec is not None:
                try:
                    self.sources[split] = resolve_source(spec, manifest if split == "train" else None, allow_remote)
                except ValueError as e:  # name the argument: train, val and test sources are often alike
                    raise ValueError(f"{split}_data: {e}") from e
        if not self.sources:
            raise ValueError("give at least one of train_data, val_data, test_data")
        vocabs = {split: m.vocab(pad_to_multiple) for split, (m, _, _) in self.sources.items()}
        first = next(iter(vocabs.values()))
        if any(v != first for v in vocabs.values()):
            raise ValueError(f"the splits were tokenized with different vocabularies: {vocabs}")
        _check_same_tokenizers({split: m for split, (m, _, _) in self.sources.items()})
        self.vocab: MultimodalVocab = first
        self.cfg = PipelineConfig(
            vocab=first,
            seed=seed,
            max_retrieved=max_retrieved,
            no_retrieval_share=no_retrieval_share,
            image_first_prob=image_first_prob,
            infill=infill,
            infill_kwargs=dict(infill_kwargs or {}),
            slot_len=seq_len // pack,
            cut_captions=cut_captions,
        )
        need = document_length(0, first.image_tokens) + 1
        if self.cfg.budget < need:
            raise ValueError(
                f"seq_len // pack = {seq_len // pack} leaves {self.cfg.budget} tokens after the masking reserve "
                f"({self.cfg.mask_overhead}); one image document needs {need}"
            )
        if self.cfg.budget < need + 2:  # <break> and one caption token: else every caption is cut away
            raise ValueError(
                f"seq_len // pack = {seq_len // pack} leaves {self.cfg.budget} tokens after the masking reserve "
                f"({self.cfg.mask_overhead}): the query's image ({first.image_tokens} tokens, <eos> and the final "
                f"<eos>: {need}) leaves no room for a caption token ({need + 2} with <break>), so every caption would "
                "be cut away; raise seq_len or lower pack"
            )
        if max_retrieved > 0 and self.cfg.budget < 2 * need - 1:  # the query and one more image document, one <eos>
            rank_zero_warn(
                f"seq_len // pack = {seq_len // pack} leaves {self.cfg.budget} tokens after the masking reserve: no "
                f"retrieved document (at least {need - 1} tokens each) fits beside the query, so every example is "
                "trained without retrieval; raise seq_len, lower pack, or set max_retrieved: 0 to say so"
            )
        self._train_loader: ResumableLoader | None = None
        self._loader_trainer: L.Trainer | None = None  # the trainer whose counters the training loader follows
        self._pending_state: dict[str, Any] | None = None
        self._fit_end_state: dict[str, Any] | None = None  # the position when the last fit ended

    @property
    def vocab_size(self) -> int:
        """The model's embedding size for this data (``vocab.padded_size``)."""
        return self.vocab.padded_size

    @property
    def manifest(self) -> Manifest:
        """The training manifest (else the validation or test one)."""
        return next(iter(self.sources.values()))[0]

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def build_stream(self, split: str, training: bool) -> ShardStream:
        """A :attr:`stream_class` over ``split``'s shards for this rank: shuffled, resampled (per ``mode``) and with
        the resume metadata when ``training``; exact, in order and without it otherwise. Override to adjust it."""
        if split not in self.sources:
            raise ValueError(f"no {split}_data was given to CM3LeonDataModule (--data.init_args.{split}_data DIR)")
        _, urls, infos = self.sources[split]
        hp = self.hparams
        rank, world = self._rank()
        return self.stream_class(
            urls,
            infos,
            self.cfg,
            batch_size=hp.batch_size,
            seq_len=hp.seq_len,
            pack=hp.pack,
            mode=hp.mode if training else "exact",
            shuffle=hp.shuffle and training,
            shuffle_shards=hp.shuffle_shards,
            rank=rank,
            world_size=world,
            num_workers=hp.num_workers,
            verify_sha256=hp.verify_sha256,
            allow_remote=hp.allow_remote,
            with_meta=training,
        )

    def setup(self, stage: str) -> None:
        """Check that the training shards can be split over ranks x workers (a clear error, never a hang); a new
        trainer's fit gets a new training loader (its counters start at 0, the old loader's position is another's).
        ``validate`` and ``test`` without their split are refused here, before a checkpoint is loaded."""
        split = {"validate": "val", "test": "test"}.get(str(getattr(stage, "value", stage)))
        if split is not None and split not in self.sources:
            raise ValueError(
                f"{stage} needs {split}_data, but none was given to CM3LeonDataModule "
                f"(--data.init_args.{split}_data DIR)"
            )
        if stage == "fit" and "train" in self.sources:
            if self._train_loader is not None and self._loader_trainer is not self.trainer:
                self._train_loader = None
            rank, world = self._rank()
            slots = world * max(1, self.hparams.num_workers)
            shards = len(self.sources["train"][2])
            if shards < slots:
                raise ValueError(
                    f"train_data has {shards} shards for {world} ranks x {max(1, self.hparams.num_workers)} workers "
                    f"= {slots} readers (each reads whole shards); lower num_workers (--data.init_args.num_workers) "
                    f"or re-prepare into at least {slots} shards (cm3leon prepare --samples-per-shard, now "
                    f"{self._samples_per_shard()})"
                )

    def _samples_per_shard(self) -> int:
        """The largest training shard's sample count (what ``--samples-per-shard`` was when it was prepared)."""
        return max((info.count for info in self.sources["train"][2]), default=0)

    def _progress(self) -> tuple[int, int, int | float] | None:
        """The trainer's epoch, training batches consumed since the run began and batches per epoch (the loader has
        handed out more): :func:`~cm3leon_lightning.data.sampling.trainer_progress`."""
        return trainer_progress(self.trainer)

    def train_dataloader(self) -> ResumableLoader:
        """The resumable training loader (the same object across epochs, so it keeps its position)."""
        if self._train_loader is None:
            self._train_loader = ResumableLoader(
                self.build_stream("train", True),
                pin_memory=self.hparams.pin_memory,
                max_skip_share=self.hparams.max_skip_share,
                progress=self._progress,
            )
            self._loader_trainer = self.trainer
            if self._pending_state is not None:
                self._train_loader.load_state_dict(self._pending_state)
        self._pending_state = None
        return self._train_loader

    def _eval_loader(self, split: str) -> DataLoader:
        stream = self.build_stream(split, False)
        return DataLoader(stream, batch_size=None, num_workers=stream.num_workers, pin_memory=self.hparams.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        """Finite, exact, deterministic validation batches (none without ``val_data``: validation is skipped)."""
        return self._eval_loader("val") if "val" in self.sources else []

    def test_dataloader(self) -> DataLoader:
        """Finite, exact, deterministic test batches."""
        return self._eval_loader("test")

    @property
    def data_counts(self) -> dict[str, int]:
        """This rank's counts for the consumed training batches: ``skipped_<reason>``, ``dropped_retrieved``,
        ``examples``... (:class:`DataCountsLogger` logs them summed over ranks)."""
        if self._train_loader is None:
            return dict((self._pending_state or {}).get("counts", {}))
        return self._train_loader.data_counts()

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped training samples by reason (logged as ``data/skipped_<reason>``)."""
        return {k.removeprefix("skipped_"): v for k, v in self.data_counts.items() if k.startswith("skipped_")}

    def teardown(self, stage: str) -> None:
        """At the end of ``fit``, keep its position: :meth:`state_dict` reports it until a state is loaded or the
        next fit runs (after ``fit`` then ``validate``, ``trainer.save_checkpoint`` saved the loader's own count, not
        the trainer's). Under DDP every rank takes part (:meth:`state_dict` is a collective)."""
        if stage == "fit" and self._train_loader is not None:
            self._fit_end_state = self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position and counts (Lightning saves it in every checkpoint); under DDP every rank's
        (a collective: :meth:`ResumableLoader.state_dict`), as every rank resumes from rank zero's checkpoint."""
        if self._fit_end_state is not None and self._pending_state is None and self._progress() is None:
            return dict(self._fit_end_state)
        if self._train_loader is None:
            return dict(self._pending_state or {})
        return self._train_loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position (before or after the loader exists; kept for a new trainer's loader)."""
        if not state_dict:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        self._pending_state = dict(state_dict)


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` summed over every rank under ``torch.distributed`` (a collective: every rank calls it); as is on
    one process."""
    world = _distributed_world_size()
    if world == 1:
        return dict(counts)
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, dict(counts))
    total: Counter = Counter()
    for part in parts:  # update, not +: Counter addition drops the zero counts that one process logs
        total.update(part)
    return dict(total)


class DataCountsLogger(L.Callback):
    """Log the data module's counts (cumulative over the run, summed over ranks) every ``every_n_steps`` optimisation
    steps: ``data/examples``, ``data/skipped_<reason>``, ``data/dropped_retrieved``...

    Every rank counts its own batches (:attr:`CM3LeonDataModule.data_counts`); under ``torch.distributed`` they are
    gathered at those steps (a collective on every rank), so a sample skipped on any rank is logged, not only rank
    zero's. The counts go straight to the trainer's loggers (global rank zero) at those steps, not through
    ``LightningModule.log``: a value logged there only at some steps is written again, stale, at the steps between
    (what ``every_n_steps > 1`` did before). :attr:`last` holds the latest counts written.

    Args:
        every_n_steps: log every this many optimisation steps.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        counts = getattr(trainer.datamodule, "data_counts", None) if trainer.datamodule is not None else None
        if counts is None or trainer.global_step % self.every_n_steps:  # the same on every rank
            return
        counts = sum_over_ranks(counts)
        if not counts:
            return
        self.last = {f"data/{name}": float(value) for name, value in counts.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)
