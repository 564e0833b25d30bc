"""Seeded, resumable training order for map-style datasets (the CLIP and VQGAN data modules).

:func:`epoch_order` deals each epoch's permutation, seeded by ``(seed, epoch)``, over ranks as a DistributedSampler
does; :class:`ResumableSampler` records the epoch and the batches consumed (counted by the trainer,
:func:`trainer_progress`, as the loader runs ahead of training) and skips them after a resume;
:class:`ResumableDataLoader` hands that position to Lightning. The shard pipeline of ``CM3LeonDataModule`` has its own
(``data/stream.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cm3leon_lightning.data.stages import check_seed
from cm3leon_lightning.data.stream import fingerprint_changes


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> np.ndarray:
    """Rank ``rank``'s sample indices for ``epoch``, as :class:`~torch.utils.data.DistributedSampler` deals them.

    The epoch's order is a permutation of ``range(n)`` seeded by ``(seed, epoch)`` (``range(n)`` itself without
    ``shuffle``), padded by repeating its start to a multiple of ``world_size``; rank ``r`` takes positions
    ``r, r + world_size, ...``, so the ranks' shares are disjoint (but for the padding) and cover every sample.
    """
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    total = -(-n // world_size) * world_size
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world_size]


def trainer_position(trainer: L.Trainer | None) -> tuple[int, int] | None:
    """The fitting trainer's ``(epoch, training batches consumed in it)``, ``(epoch + 1, 0)`` once the epoch's
    batches are all consumed (``limit_train_batches`` counted, or the loader ran out); None outside ``fit``.

    A checkpoint records it: the loader has fetched batches ahead, which are not consumed yet. Between epochs (an
    epoch finished and the next not begun: ``reload_dataloaders_every_n_epochs`` builds the next loader there, and
    ``trainer.save_checkpoint`` after ``fit`` saves there) it is ``(epoch, 0)``: the batch counts are still the
    finished epoch's, which read as the current one's gave one epoch too many.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.ready == epochs.completed:  # between epochs: ``current_epoch`` already counts the finished one
        return trainer.current_epoch, 0
    progress = trainer.fit_loop.epoch_loop.batch_progress
    epoch, batch = trainer.current_epoch, progress.current.processed
    done = batch >= trainer.num_training_batches or (progress.is_last_batch and batch == progress.current.ready)
    return (epoch + 1, 0) if done else (epoch, batch)


def trainer_progress(trainer: L.Trainer | None) -> tuple[int, int, int | float] | None:
    """The fitting trainer's ``(epoch, training batches consumed since the run began, batches per epoch)``; None
    outside ``fit``.

    The count goes on across a resume (the trainer restores it) and does not depend on how Lightning numbers the
    epochs: restarted from a checkpoint saved at an epoch's end (``on_train_epoch_end``, or validation there) under
    ``max_steps``, Lightning runs one more batch in the finished epoch (when there is no validation) and then passes
    ``set_epoch`` an epoch one ahead of ``trainer.current_epoch`` for the rest of the run.
    """
    if getattr(getattr(trainer, "state", None), "fn", None) != TrainerFn.FITTING:
        return None
    consumed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
    return trainer.current_epoch, consumed, trainer.num_training_batches


class ResumableSampler(DistributedSampler):
    """A seeded, rank-split training order that resumes mid-epoch to the exact batch.

    Epoch ``e`` is :func:`epoch_order` ``(len(dataset), seed, e, rank, world_size)``, so the order depends on the
    seed and the epoch only (not on the global RNG nor the number of workers), and each rank gets its disjoint
    share as from a DistributedSampler (being one, Lightning does not replace it with its own). Outside ``fit``,
    ``set_epoch`` chooses the epoch; without it, each complete pass moves to the next one. Inside ``fit``
    (``progress`` gives counts) the batches the trainer consumed decide: each pass goes on where they leave off,
    moving to the next epoch once an epoch's batches (``limit_train_batches`` counted) are consumed, or when the
    trainer's epoch is ahead; a pass stops after the epoch's last counted batch. :meth:`state_dict` records the
    epoch and the batches consumed in it; after :meth:`load_state_dict` the next pass skips those batches.

    Args:
        dataset: the map-style dataset (only its length is used).
        batch_size: samples per batch of the loader.
        seed: seed of every epoch's order.
        rank: this process's global rank.
        world_size: number of ranks.
        shuffle: permute every epoch (else each epoch is in index order).
        drop_last: whether the loader drops this rank's last partial batch (for the number of batches).
        progress: returns ``(trainer epoch, batches consumed since the run began, batches per epoch)``
            (:func:`trainer_progress`) or None (outside ``fit``); asked by every pass and by :meth:`state_dict`, as the
            sampler runs ahead of the training.
        with_epoch: yield ``(epoch, index)`` pairs rather than indices, for datasets whose items depend on the epoch.

    Raises:
        ValueError: a ``seed`` that is not an integer >= 0, or ``batch_size`` < 1.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        progress: Callable[[], tuple[int, int, int | float] | None] | None = None,
        with_epoch: bool = False,
    ) -> None:
        check_seed(seed, "each epoch's order")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.drop_last_batch = batch_size, drop_last
        self.progress, self.with_epoch = progress, with_epoch
        self.start = 0  # batches of this epoch already consumed: the next pass skips them
        self._finished = False  # a pass over this epoch ran to its end
        self._base: int | None = None  # the trainer's consumed batches when this pass began (None: none began)

    @property
    def num_batches(self) -> int:
        """This rank's batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (rest > 0 and not self.drop_last_batch)

    def _progress(self) -> tuple[int, int, int | float] | None:
        return self.progress() if self.progress is not None else None

    def _position(self, progress: tuple[int, int, int | float]) -> tuple[int, int]:
        """``(epoch, batch)`` after the batches consumed since this pass began (all of them: the next epoch's start;
        the trainer's epoch when it is ahead, as after an epoch it ended early)."""
        label, consumed, per_epoch = progress
        epoch, batch = self.epoch, self.start + (consumed - self._base if self._base is not None else 0)
        if batch >= min(self.num_batches, per_epoch):
            epoch, batch = epoch + 1, 0
        return (label, 0) if label > epoch else (epoch, batch)

    def set_epoch(self, epoch: int) -> None:
        """Outside ``fit``, make ``epoch`` the next pass's; it starts from the restored position when that is in
        ``epoch``. Inside ``fit`` nothing: Lightning's number runs one ahead after some restarts
        (:func:`trainer_progress`), so the consumed batches decide."""
        if self._progress() is not None:
            return
        if epoch != self.epoch or self._finished:
            self.start = 0
        self.epoch, self._finished = epoch, False

    def __iter__(self) -> Iterator[Any]:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
        if world is not None and world != self.num_replicas:  # built before the trainer was attached: every rank
            # would read everything (without torch.distributed, a share can be read for inspection)
            raise RuntimeError(
                f"this training sampler was built for {self.num_replicas} rank(s) but {world} processes run: build the "
                "training loader inside fit (trainer.fit(model, datamodule=dm)), not before the trainer is attached"
            )
        stop = None
        if (progress := self._progress()) is not None:  # go on where the consumed batches leave off
            self.epoch, self.start = self._position(progress)
            self._base, self._finished = progress[1], False
            stop = int(min(self.num_batches, progress[2])) * self.batch_size  # limit_train_batches
        elif self._finished:
            self.set_epoch(self.epoch + 1)
        indices = epoch_order(len(self.dataset), self.seed, self.epoch, self.rank, self.num_replicas, self.shuffle)
        for i in indices[self.start * self.batch_size : stop].tolist():
            yield (self.epoch, i) if self.with_epoch else i
        self._finished = True

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved mid-epoch position to mean the same batches."""
        return {
            "samples": len(self.dataset),
            "world_size": self.num_replicas,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batch", "fingerprint"}``: the position after the consumed batches (``progress()``; without
        it, where the next pass starts). A complete epoch is saved as the start of the next one."""
        if (progress := self._progress()) is not None:
            epoch, batch = self._position(progress)
        elif self._finished:
            epoch, batch = self.epoch + 1, 0
        else:
            epoch, batch = self.epoch, self.start
        if batch >= self.num_batches:
            epoch, batch = epoch + 1, 0
        return {"epoch": int(epoch), "batch": int(batch), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a mid-epoch position needs the same samples, ranks, batch size, seed
        and shuffle (the number of workers may differ).

        Raises:
            ValueError: a mid-epoch position saved with other settings (both are named).
        """
        if state.get("batch", 0) and state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "cannot resume mid-epoch: the saved training position was made with other settings "
                f"({fingerprint_changes(state.get('fingerprint'), self.fingerprint())}); resume with the same ones, "
                "or from a checkpoint at an epoch's end"
            )
        self.epoch, self.start, self._finished = int(state["epoch"]), int(state["batch"]), False
        self._base = None


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position is its :class:`ResumableSampler`'s, so Lightning sees it as resumable (it saves
    it in a checkpoint's loop state and restores it, besides the data module's own ``state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        """The sampler's :meth:`ResumableSampler.state_dict`; ``{}`` when Lightning replaced the sampler
        (``overfit_batches`` reads a fixed sequence)."""
        return self.sampler.state_dict() if isinstance(self.sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The sampler's :meth:`ResumableSampler.load_state_dict` (nothing for another sampler, or an empty state)."""
        if state and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state)


class ResumableTrainData:
    """Mixin for a LightningDataModule whose training loader is a :class:`ResumableDataLoader`: it builds the
    sampler for this rank, applies a position loaded before the loader existed, and saves the position as the data
    module's ``state_dict`` (Lightning stores it in every checkpoint). Call :meth:`_init_resume` in ``__init__``."""

    def _init_resume(self) -> None:
        self._train_sampler: ResumableSampler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._fit_end_state: dict[str, Any] | None = None  # the position when the last fit ended

    def teardown(self, stage: str) -> None:
        """At the end of ``fit``, keep its position: :meth:`state_dict` reports it until a state is loaded or the
        next fit runs (a ``validate`` after ``fit`` then ``trainer.save_checkpoint`` saved the epoch it began in,
        or nothing for shards, as the trainer had left ``fit``)."""
        if stage == "fit":
            self._fit_end_state = self.state_dict()
        super().teardown(stage)  # type: ignore[misc]

    def _after_fit(self) -> dict[str, Any] | None:
        """The last fit's final position, when no state was loaded since and no fit is running."""
        if self._pending_state is not None or self._progress() is not None:
            return None
        return self._fit_end_state

    def _progress(self) -> tuple[int, int, int | float] | None:
        return trainer_progress(self.trainer)  # type: ignore[attr-defined]

    def resumable_loader(
        self, dataset: Dataset, batch_size: int, seed: int, drop_last: bool = False, with_epoch: bool = False,
        **loader_kwargs: Any,
    ) -> ResumableDataLoader:  # fmt: skip
        """A :class:`ResumableDataLoader` over ``dataset`` for this rank, at the restored position if any."""
        trainer = self.trainer  # type: ignore[attr-defined]
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableSampler(
            dataset, batch_size, seed, rank, world, drop_last=drop_last, progress=self._progress, with_epoch=with_epoch
        )
        if self._pending_state is not None:
            sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_sampler = sampler
        return ResumableDataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs
        )

    def state_dict(self) -> dict[str, Any]:
        """The training position ``{"epoch", "batch", "fingerprint"}`` (Lightning saves it in every checkpoint)."""
        if (ended := self._after_fit()) is not None:
            return dict(ended)
        if self._train_sampler is None:
            return dict(self._pending_state or {})
        return self._train_sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position (before or after the training loader exists; kept for the next training
        loader too, which a new trainer's ``fit`` builds)."""
        if not state_dict:
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(state_dict)
        self._pending_state = dict(state_dict)
