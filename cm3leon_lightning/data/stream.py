"""The per-rank shard stream (an IterableDataset run by each DataLoader worker) and the resumable loader around it.

:class:`ShardStream` turns the plan of :mod:`cm3leon_lightning.data.plan` into batches: it reads windows of shard
pieces, permutes each window, runs the per-sample stages of :mod:`cm3leon_lightning.data.stages` and yields a fixed
number of static-shape batches per worker. Each batch carries ``_meta``: its index in the rank's epoch, the logical
worker, the worker's position after it (``(window, offset)``) and the counts gathered while building it (skipped
samples by reason, dropped retrieved documents, truncated caption tokens).

:class:`ResumableLoader` (main process) builds a fresh DataLoader each epoch from its saved position, strips
``_meta`` from the batches and keeps it, so that :meth:`ResumableLoader.state_dict` can say, for the first ``n``
batches of an epoch, where every worker stands and what was counted: a resumed run starts every worker exactly
there, and its DataLoader's round-robin continues with the worker that owns batch ``n``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cm3leon_lightning.data import plan as planning
from cm3leon_lightning.data.shards import ShardFormatError, ShardInfo, iter_tar_samples, open_bytes
from cm3leon_lightning.data.stages import Example, PipelineConfig, build_example, collate, decode, document_length

log = logging.getLogger(__name__)


def read_piece(
    url: str, info: ShardInfo, piece: planning.Piece, verify_sha256: bool, allow_remote: bool
) -> tuple[list[tuple[str, dict[str, bytes]]], Counter]:
    """The raw samples ``[start, stop)`` of one shard, and the count of samples lost to shard-level problems."""
    lost: Counter = Counter()
    try:
        data = open_bytes(url, allow_remote)
    except OSError as e:
        log.warning("skipping shard %s: cannot read it (%s)", url, e)
        lost["skipped_corrupt_shard"] += piece.size
        return [], lost
    if verify_sha256 and info.sha256:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            log.warning("skipping shard %s: sha256 %s differs from the manifest's %s", url, digest, info.sha256)
            lost["skipped_sha256_mismatch"] += piece.size
            return [], lost
    items: list[tuple[str, dict[str, bytes]]] = []
    held = 0  # samples of the shard read so far
    try:
        for i, item in enumerate(iter_tar_samples(io.BytesIO(data), url)):
            held = i + 1
            if i >= piece.stop:
                if piece.stop == info.count:  # the plan never reads past the manifest's count
                    log.warning(
                        "shard %s holds more samples than the manifest's count %d: the rest are never read (fix the "
                        "count in manifest.json or re-prepare the dataset)", url, info.count
                    )  # fmt: skip
                break
            if i >= piece.start:
                items.append(item)
    except ShardFormatError as e:
        log.warning("%s; skipping the rest of the shard", e)
    else:
        if len(items) < piece.size:  # a whole tar that ends early: the manifest's count is wrong
            log.warning(
                "skipping %d samples of shard %s: it holds %d samples, the manifest counts %d",
                piece.size - len(items), url, held, info.count,
            )  # fmt: skip
    if len(items) < piece.size:  # truncated, garbled or short: the rest of the piece is lost
        lost["skipped_corrupt_shard"] += piece.size - len(items)
    return items, lost


def fingerprint_changes(saved: Any, have: dict[str, Any]) -> str:
    """The settings a saved mid-epoch position's ``fingerprint`` differs in from this run's, as ``key: saved ->
    now`` (for the refusal of a resume that would read other batches)."""
    if not isinstance(saved, dict):
        return f"the checkpoint records no settings ({saved!r})"
    keys = [k for k in sorted(set(saved) | set(have)) if saved.get(k) != have.get(k)]
    return ", ".join(f"{k}: {saved.get(k)!r} -> {have.get(k)!r}" for k in keys)


def cut_caption_message(stream: ShardStream, key: str, cut: int) -> str:
    """The warning for a training sample ``key`` whose caption lost ``cut`` tokens to fit the stream's slot."""
    cfg, image = stream.cfg, stream.cfg.vocab.image_tokens
    room = cfg.budget - document_length(0, image) - 2  # <break> and the final <eos> beside the image document
    return (
        f"seq_len // pack = {stream.seq_len // stream.pack} leaves {cfg.budget} tokens after the masking reserve "
        f"({cfg.mask_overhead}), but sample {key!r} needs {image + room + cut + 3 + cfg.mask_overhead} (its "
        f"{room + cut} caption tokens, {image} image tokens, <eos>, <break>, the final <eos> and the reserve): its "
        f"caption was cut to its first {room} tokens. Every caption longer than {room} tokens is cut from its end "
        "(after all retrieved documents were dropped; images are never cut), counted as data/truncated_tokens; "
        "raise seq_len or lower pack to train whole captions"
    )


class ShardStream(IterableDataset):
    """One rank's batches for one epoch, split over DataLoader workers (see :mod:`cm3leon_lightning.data.plan`).

    Args:
        urls: shard locations, aligned with ``infos``.
        infos: the manifest entries of those shards (counts and sha256).
        cfg: per-sample pipeline settings.
        batch_size: rows per batch.
        seq_len: tokens per row.
        pack: examples per row.
        mode: ``"exact"`` (every sample once per epoch) or ``"resampled"`` (shards drawn with replacement).
        shuffle: permute shards per epoch and samples within each window.
        shuffle_shards: pieces per window (the in-memory shuffle unit).
        rank: this process's global rank.
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (0: the main process reads).
        verify_sha256: check each shard's sha256 against the manifest before using it.
        allow_remote: allow fsspec URLs and ``pipe:`` commands.
        with_meta: attach ``_meta`` to batches (the resumable loader needs it).
    """

    def __init__(
        self,
        urls: Sequence[str],
        infos: Sequence[ShardInfo],
        cfg: PipelineConfig,
        batch_size: int,
        seq_len: int,
        pack: int = 1,
        mode: str = "exact",
        shuffle: bool = True,
        shuffle_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        verify_sha256: bool = True,
        allow_remote: bool = False,
        with_meta: bool = True,
    ) -> None:
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        self.urls, self.infos, self.cfg = list(urls), list(infos), cfg
        self.batch_size, self.seq_len, self.pack, self.mode = batch_size, seq_len, pack, mode
        self.shuffle, self.shuffle_shards = shuffle, shuffle_shards
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.verify_sha256, self.allow_remote, self.with_meta = verify_sha256, allow_remote, with_meta
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed
        self.cursors: dict[int, tuple[int, int]] = {}  # logical worker -> (window, offset) after those batches

    @property
    def counts(self) -> list[int]:
        """Samples per shard."""
        return [s.count for s in self.infos]

    @property
    def num_workers_eff(self) -> int:
        """Worker slots K (the main process counts as one)."""
        return max(1, self.num_workers)

    def plan(self, epoch: int | None = None) -> list[planning.WorkerPlan]:
        """This rank's worker plans for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        e = self.batch_size * self.pack
        if self.mode == "exact":
            full = planning.exact_plan(
                self.counts, self.world_size, self.num_workers, e, self.cfg.seed, epoch, self.shuffle
            )
        else:
            full = planning.resampled_plan(self.counts, self.world_size, self.num_workers, e)
        return full[self.rank]

    def __len__(self) -> int:
        return sum(w.num_batches for w in self.plan())

    @property
    def num_samples(self) -> int:
        """Samples this rank is planned to read in an epoch (resampled mode: batches times examples per batch)."""
        if self.mode == "exact":
            return sum(w.num_samples for w in self.plan())
        return len(self) * self.batch_size * self.pack

    def at(self, epoch: int, start_batch: int = 0, cursors: dict[int, tuple[int, int]] | None = None) -> ShardStream:
        """A copy positioned at batch ``start_batch`` of ``epoch``."""
        other = copy.copy(self)
        other.epoch, other.start_batch, other.cursors = epoch, start_batch, dict(cursors or {})
        return other

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader always starts its round-robin at worker 0; batch `start_batch` belongs to logical worker
        # start_batch % K, so physical worker w plays logical worker (w + start_batch) % K.
        yield from self.iter_worker((physical + self.start_batch) % self.num_workers_eff)

    # ------------------------------------------------------------------------------------------ one worker
    def _pieces(self, worker: int, wplan: planning.WorkerPlan) -> Iterator[planning.Piece]:
        if self.mode == "exact":
            return iter(wplan.pieces)
        return planning.resampled_pieces(self.counts, self.cfg.seed, self.epoch, self.rank, worker)

    def _slots(
        self, worker: int, wplan: planning.WorkerPlan, cursor: tuple[int, int]
    ) -> Iterator[tuple[tuple[int, int], Any]]:
        """``((window, offset_after), slot)``: slot is a Counter (a window header) or ``(shard url, raw sample)``."""
        for w, group in enumerate(planning.windows(self._pieces(worker, wplan), self.shuffle_shards)):
            if w < cursor[0]:
                continue
            items: list[tuple[str, tuple[str, dict[str, bytes]]]] = []
            lost: Counter = Counter()
            for piece in group:
                url = self.urls[piece.shard]
                got, bad = read_piece(url, self.infos[piece.shard], piece, self.verify_sha256, self.allow_remote)
                items += [(url, item) for item in got]  # the shard travels with the sample, for error messages
                lost += bad
            perm = planning.window_permutation(
                len(items), self.cfg.seed, self.epoch, self.rank, worker, w, self.shuffle
            )
            slots = [lost] + [items[i] for i in perm]
            start = cursor[1] if w == cursor[0] else 0
            for offset in range(start, len(slots)):
                yield (w, offset + 1), slots[offset]

    def make_example(self, url: str, item: tuple[str, dict[str, bytes]]) -> Example | None:
        """One raw sample ``(key, members)`` of shard ``url`` -> its training example: decoded, its retrieved documents
        fitted and CM3-masked (:func:`build_example`). Override to transform or filter: None leaves the sample out,
        counted as ``filtered`` (not a skip, so ``max_skip_share`` ignores it). Keep it a pure function of the sample
        and ``self.epoch``, so a resumed stream gives the same examples.

        Raises:
            ShardFormatError: the sample is malformed (it is skipped and counted by reason).
        """
        return build_example(decode(item, self.cfg.vocab), self.cfg, self.epoch)

    def iter_worker(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches of logical worker ``worker`` from the stream's position (callable without processes)."""
        k = self.num_workers_eff
        wplan = self.plan()[worker]
        done = len(range(worker, self.start_batch, k))  # this worker's batches already consumed
        cursor = self.cursors.get(worker, (0, 0))
        per_batch = self.batch_size * self.pack
        slots = self._slots(worker, wplan, cursor)
        # Resampled mode draws shards forever: when none can be read it would never fill a batch (nor reach the skip
        # limit, which is checked per batch), so many unreadable draws in a row end the run.
        limit, unreadable_in_a_row = max(64, 8 * len(self.infos)), 0
        for j in range(done, wplan.num_batches):
            examples: list[Example] = []
            counts: Counter = Counter()
            while len(examples) < per_batch:
                nxt = next(slots, None)
                if nxt is None:
                    break  # the worker's samples ran out: the rest of its batches are padding rows
                cursor, slot = nxt
                if isinstance(slot, Counter):
                    counts += slot
                    unreadable_in_a_row += 1
                    if unreadable_in_a_row >= limit:
                        raise RuntimeError(
                            f"{unreadable_in_a_row} shards in a row could not be read (of {len(self.infos)}); see the "
                            "'skipping shard' warnings: is the storage reachable?"
                        )
                    continue
                unreadable_in_a_row = 0
                url, item = slot
                try:
                    example = self.make_example(url, item)
                except ShardFormatError as e:
                    log.warning("skipping a sample of shard %s: %s", url, e)
                    counts[f"skipped_{e.reason}"] += 1
                    continue
                if example is None:
                    counts["filtered"] += 1
                else:
                    examples.append(example)
            counts["examples"] += len(examples)
            counts["dropped_retrieved"] += sum(ex.dropped_retrieved for ex in examples)
            counts["truncated_tokens"] += sum(ex.truncated_tokens for ex in examples)
            batch = collate(examples, self.batch_size, self.seq_len, self.pack, self.cfg.vocab.pad_id)
            if self.with_meta:
                batch["_meta"] = {"index": worker + j * k, "worker": worker, "cursor": cursor, "counts": dict(counts)}
                cut = next((ex for ex in examples if ex.truncated_tokens), None)
                if cut is not None:  # the first example whose caption was cut, for the loader's warning
                    batch["_meta"]["cut"] = [cut.key, cut.truncated_tokens]
            yield batch


class ResumableLoader:
    """An iterable of one rank's training batches whose position can be saved and restored mid-epoch.

    Each ``iter()`` is one epoch: it builds a DataLoader over ``stream`` positioned at the saved state (fresh
    workers, so they receive it), and moves to the next epoch once exhausted. ``len()`` is the epoch's batch count
    from the manifest, so progress bars and schedulers know it.

    Args:
        stream: the rank's :class:`ShardStream`.
        pin_memory: DataLoader ``pin_memory``.
        max_skip_share: stop with an error when this rank skips more than this share of its epoch's samples.
        progress: returns the trainer's ``(epoch, batches consumed since the run began, batches per epoch)``
            (:func:`~cm3leon_lightning.data.sampling.trainer_progress`; ``None`` outside ``fit``: count the batches
            handed out). Lightning fetches one batch ahead, so handed-out is one too many in a checkpoint.

    Inside ``fit`` the batches the trainer consumed decide where each ``iter()`` starts, not Lightning's epoch
    numbers (which run one ahead after a restart from an epoch's end under ``max_steps``, when Lightning also trains
    one more batch in the finished epoch): it goes on where they leave off, moving to the next epoch once the epoch's
    batches (``limit_train_batches`` counted) are consumed, or when the trainer's epoch is ahead; it stops after the
    epoch's last counted batch.

    Under ``torch.distributed`` Lightning writes global rank zero's checkpoint only, and every rank resumes from it,
    while each rank's workers stand at their own positions: :meth:`state_dict` therefore gathers every rank's
    cursors and counts under ``"ranks"`` (a collective: every rank calls it, as Lightning's checkpointing does), and
    :meth:`load_state_dict` takes this rank's.
    """

    def __init__(
        self,
        stream: ShardStream,
        pin_memory: bool = False,
        max_skip_share: float = 0.01,
        progress: Callable[[], tuple[int, int, int | float] | None] | None = None,
    ) -> None:
        self.stream = stream
        self.pin_memory = pin_memory
        self.max_skip_share = max_skip_share
        self.progress = progress
        self._warned_cut = False  # a training caption was cut to fit seq_len, and this loader said so
        self._restore({"epoch": 0, "batch": 0})

    def __len__(self) -> int:
        return len(self.stream)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""
        s = self.stream
        return {
            "world_size": s.world_size,
            "num_workers": s.num_workers_eff,
            "batch_size": s.batch_size,
            "pack": s.pack,
            "mode": s.mode,
            "seed": s.cfg.seed,
            "shuffle": s.shuffle,  # a saved position means another sample under another order
            "shuffle_shards": s.shuffle_shards,
            "shards": hashlib.sha256("".join(i.sha256 or i.name for i in s.infos).encode()).hexdigest()[:16],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        world = _distributed_world_size()
        if world > 1 and world != self.stream.world_size:  # built before the trainer was attached: every rank would
            # read the same batches (rank 0 of 1)
            raise RuntimeError(
                f"this training loader was built for {self.stream.world_size} rank(s) but {world} processes run: "
                "build it inside fit (trainer.fit(model, datamodule=dm)), not before the trainer is attached"
            )
        stop, progress = len(self), self._progress()
        if progress is not None:  # go on where the trainer's consumed batches leave off
            self._restore(self._local_state())
            self._base, stop = progress[1], int(min(stop, progress[2]))  # limit_train_batches
        elif self._done or self._handed_out >= len(self):  # the previous epoch ran out: start the next one
            self._restore(self._local_state(len(self)))
        elif self._handed_out > self.start:  # an abandoned iteration: continue after the consumed batches
            self._restore(self._local_state())
        stream = self.stream.at(self.epoch, self.start, self.cursors)
        loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers, pin_memory=self.pin_memory)
        limit = self.max_skip_share * max(1, stream.num_samples)
        seen = Counter(self.epoch_counts)  # counts of the batches handed out, for the skip limit
        for batch in loader:
            meta = batch.pop("_meta")
            if "cut" in meta and not self._warned_cut:
                self._warned_cut = True
                warnings.warn(cut_caption_message(stream, *meta["cut"]), stacklevel=2)
            self._pending.append(meta)
            self._handed_out += 1
            seen.update(meta["counts"])
            skipped = {k: v for k, v in seen.items() if k.startswith("skipped_")}
            if sum(skipped.values()) > limit:
                raise RuntimeError(
                    f"rank {stream.rank} skipped {sum(skipped.values())} of its {stream.num_samples} samples in "
                    f"epoch {self.epoch} ({skipped}), more than max_skip_share={self.max_skip_share}; fix or "
                    "re-prepare the shards (skipped_too_long: raise seq_len or lower pack), or raise max_skip_share"
                )
            yield batch
            if self._handed_out >= stop:  # the epoch's last counted batch
                break
        self._done = True

    def _progress(self) -> tuple[int, int, int | float] | None:
        return self.progress() if self.progress is not None else None

    def _consumed(self, progress: tuple[int, int, int | float]) -> int:
        """Batches of this loader's epoch consumed after the trainer's ``progress``: those before this pass began and
        those consumed since; ``len(self)`` once the epoch's counted batches are all consumed or the trainer's epoch
        is ahead (as after an epoch it ended early)."""
        label, consumed, per_epoch = progress
        n = self.start + (consumed - self._base if self._base is not None else 0)
        return len(self) if label > self.epoch or n >= min(len(self), per_epoch) else n

    def _commit(self, processed: int | None) -> int:
        """Fold the handed-out batches with index < n into the saved position; returns n."""
        if processed is None and (progress := self._progress()) is not None:
            processed = self._consumed(progress)
        n = self._handed_out if processed is None else int(processed)
        while self._pending and self._pending[0]["index"] < n:
            m = self._pending.popleft()
            self.counts.update(m["counts"])
            self.epoch_counts.update(m["counts"])
            self.cursors[m["worker"]] = tuple(m["cursor"])
        return n

    def data_counts(self, processed: int | None = None) -> dict[str, int]:
        """Counts over all epochs for the consumed batches: ``skipped_<reason>``, ``dropped_retrieved``..."""
        self._commit(processed)
        return dict(self.counts)

    def _local_state(self, processed: int | None = None) -> dict[str, Any]:
        """This rank's position after ``processed`` batches of the current epoch (default: as ``progress()`` says)."""
        n = self._commit(processed)
        state = {"epoch": self.epoch, "batch": n, "counts": dict(self.counts), "fingerprint": self.fingerprint()}
        if n >= len(self):  # epoch complete: the next one starts from scratch
            return {**state, "epoch": self.epoch + 1, "batch": 0, "cursors": {}, "epoch_counts": {}}
        cursors = {str(k): list(v) for k, v in self.cursors.items()}
        return {**state, "cursors": cursors, "epoch_counts": dict(self.epoch_counts)}

    def state_dict(self, processed: int | None = None) -> dict[str, Any]:
        """The position after ``processed`` batches of the current epoch (default: as ``progress()`` says); under
        ``torch.distributed`` (a collective) also every rank's ``cursors`` and counts, in ``"ranks"``."""
        state = self._local_state(processed)
        world = _distributed_world_size()
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, {k: state[k] for k in _PER_RANK})
            state["ranks"] = parts
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a mid-epoch position needs the same ranks, workers, batch and seed; on
        several ranks, a state holding every rank's position).

        A mid-epoch position saved on several ranks without ``"ranks"`` (by a version before every rank's was saved)
        holds rank zero's worker positions only: every rank resumes from them, as those versions did, with a warning
        (until the epoch ends, ranks other than zero may repeat or skip samples).

        Raises:
            ValueError: a mid-epoch position saved with other settings.
        """
        mid_epoch = bool(state.get("batch", 0))
        if mid_epoch and state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "cannot resume mid-epoch: the saved data position was made with other settings "
                f"({fingerprint_changes(state.get('fingerprint'), self.fingerprint())}); resume with the same ones, "
                "or from a checkpoint at an epoch's end"
            )
        ranks = state.get("ranks")
        if ranks is not None and len(ranks) == self.stream.world_size:
            state = {**state, **ranks[self.stream.rank]}
        elif mid_epoch and self.stream.world_size > 1:
            warnings.warn(
                f"resuming mid-epoch on {self.stream.world_size} ranks from a data position that holds rank zero's "
                "worker positions only (saved before every rank's was): every rank resumes from them, so until this "
                "epoch ends ranks other than zero may repeat or skip samples; checkpoints of this version resume "
                "exactly",
                stacklevel=2,
            )
        self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.start = int(state["epoch"]), int(state["batch"])
        self.cursors = {int(k): (int(v[0]), int(v[1])) for k, v in state.get("cursors", {}).items()}
        self.counts = Counter(state.get("counts", {}))
        self.epoch_counts = Counter(state.get("epoch_counts", {}))
        self._pending: deque[dict[str, Any]] = deque()
        self._handed_out = self.start
        self._done = False
        self._base: int | None = None  # the trainer's consumed batches when this pass began (None: none began)


_PER_RANK = ("counts", "cursors", "epoch_counts")  # what differs between ranks in a saved position


def _distributed_world_size() -> int:
    """``torch.distributed``'s world size, 1 when it is not initialised."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
