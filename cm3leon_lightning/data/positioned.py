"""Training positions of loaders that cannot skip batches by index: WebDataset image shards, exact or resampled.

A map-style dataset resumes through its sampler (``data/sampling.py``). A shard pipeline has no sampler: its order
is seeded by the epoch (and, resampled, the batch it starts at), so the main process decides each pass's
``(epoch, batch)`` and hands it to the pipeline's copies in the workers through shared memory
(:class:`PositionedLoader`). In ``fit`` that position is the trainer's, shifted by a position loaded before the
fit (:class:`FitPosition`), and carries the batch the epoch stops at (:class:`Position`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.data.sampling import trainer_position


def trained_batches(batches: int, limit: int | float) -> int:
    """Batches of an epoch of ``batches`` that a trainer with ``limit_train_batches=limit`` trains (an int: at most
    that many; a float: that share, rounded down), as Lightning counts them."""
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


class Position(tuple):
    """A training position ``(epoch, batch)`` (a pair) that knows the batch its epoch stops at in ``fit``:
    :attr:`stop` (``limit_train_batches`` counted), None when unknown.

    A loader starting a pass at ``batch`` yields ``stop - batch`` batches, not its whole epoch's remainder: a new
    Trainer whose fit starts at a loaded mid-epoch position counts its batches from 0, so under
    ``limit_train_batches`` it read ``stop`` batches, ending the epoch ``batch`` batches later than an uninterrupted
    run (a Trainer resumed with ``ckpt_path`` restores its count and stops in time). Lightning starts a pass before it
    counts the epoch's batches (``trainer.num_training_batches``), so the stop comes from ``limit_train_batches``.
    """

    stop: int | None

    def __new__(cls, epoch: int, batch: int, stop: int | None = None) -> Position:
        position = super().__new__(cls, (int(epoch), int(batch)))
        position.stop = stop
        return position


class FitPosition:
    """The training position ``(epoch, batch)`` of a shard loader in ``fit``: the trainer's (:func:`trainer_position`)
    plus a shift.

    A position loaded into the data module before a fit (``dm.load_state_dict``: before a new Trainer's fit, or
    between two fits of the same Trainer) is where that fit's data starts, so every later position is the trainer's
    plus the difference (its batch only within the trainer's epoch where the fit began, :attr:`first`). The shift is
    saved with the position (``"shift"``), so a checkpoint of the shifted run, resumed by a Trainer that restores its
    own counts (``ckpt_path``), reads the same data. Fitting again with the same Trainer keeps the shift; a new
    Trainer without a loaded position has none.
    """

    def __init__(self) -> None:
        self.shift: tuple[int, int] = (0, 0)
        self.first = 0  # the trainer epoch whose batches the shift's batch count moves
        self.epoch_batches: int | None = None
        self._trainer: L.Trainer | None = None

    def begin(
        self, trainer: L.Trainer, loaded: dict[str, Any] | None, whole_epochs: bool = False,
        epoch_batches: int | None = None,
    ) -> None:  # fmt: skip
        """At a training loader's build in ``fit``: take the shift from ``loaded`` (a state loaded since the last
        build, or None). A fit that restored a checkpoint (``ckpt_path``) keeps the checkpoint's shift, as the trainer
        restored its counts; any other fit starts at ``loaded``'s position (its epoch only with ``whole_epochs``:
        loaders that restart an epoch from its start). ``epoch_batches``, when known, ends the shifted first epoch in
        the saved state (the trainer does not know that its loader yields fewer batches than an epoch's) and sets
        each position's ``stop`` (:class:`Position`)."""
        self.epoch_batches = epoch_batches
        if loaded and getattr(trainer, "ckpt_path", None) is not None:
            shift = [int(v) for v in loaded.get("shift", (0, 0))]
            self.shift, self.first = (shift[0], shift[1]), shift[2] if len(shift) > 2 else 0
        elif loaded:  # the trainer's position now (a new Trainer's (0, 0)) reads the loaded one
            epoch, batch = trainer_position(trainer) or (0, 0)
            start = 0 if whole_epochs else int(loaded.get("batch", 0))
            self.shift, self.first = (int(loaded.get("epoch", 0)) - epoch, start - batch), epoch
        elif trainer is not self._trainer:
            self.shift, self.first = (0, 0), 0
        self._trainer = trainer

    def __call__(self, trainer: L.Trainer | None) -> Position | None:
        """The position after the trainer's consumed batches, shifted, with the batches the trainer trains of an
        epoch of :attr:`epoch_batches` as its ``stop`` (None when that is unknown); None outside ``fit``."""
        position = trainer_position(trainer)
        if position is None:
            return None
        (epoch, batch), (epochs, batches) = position, self.shift
        limit = getattr(trainer, "limit_train_batches", 1.0)
        stop = None if self.epoch_batches is None else trained_batches(self.epoch_batches, limit)
        return Position(epoch + epochs, batch + (batches if epoch == self.first else 0), stop)

    def state(self, position: tuple[int, int]) -> dict[str, Any]:
        """``{"epoch", "batch"}`` of ``position`` (the next epoch's start after its epoch's last batch, or its
        :attr:`Position.stop`), with
        ``"shift"`` when there is one (``[epochs, batches]``, and :attr:`first` when the batches are not the trainer's
        epoch 0's)."""
        epoch, batch = position
        ends = [n for n in (self.epoch_batches, getattr(position, "stop", None)) if n is not None]
        if ends and batch >= min(ends):  # limit_train_batches counted
            epoch, batch = epoch + 1, 0
        state: dict[str, Any] = {"epoch": int(epoch), "batch": int(batch)}
        if self.shift != (0, 0):
            state["shift"] = [*self.shift, self.first] if self.shift[1] and self.first else list(self.shift)
        return state


class PositionedLoader(DataLoader):
    """A DataLoader whose every pass starts where the main process says: at ``position()`` in ``fit``, else at
    :attr:`next_pass` (each pass then the next epoch, from its start).

    The pass's ``(epoch, batch, stop)`` goes into :attr:`passes`, a shared-memory tensor that the dataset (and its
    copies in the persistent workers) read at the start of their pass: copies counting their own passes ran one epoch
    ahead when Lightning started a reloaded loader twice (``reload_dataloaders_every_n_epochs``). ``stop`` is the
    batch the pass's epoch stops at (the :attr:`Position.stop` of ``position()``), -1 when the epoch runs to its end
    (outside ``fit``). Hand :attr:`passes` to the dataset before the first pass.

    Args:
        dataset: the iterable dataset.
        position: the training position in ``fit``, else None.
        start: the first pass's position outside ``fit``.
        **kwargs: DataLoader arguments.
    """

    def __init__(
        self,
        dataset: Dataset,
        position: Callable[[], tuple[int, int] | None],
        start: tuple[int, int] = (0, 0),
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.position, self.next_pass = position, (int(start[0]), int(start[1]))
        self.passes = torch.tensor([*self.next_pass, -1], dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[Any]:
        """Start a pass at the trainer's position (in ``fit``, up to its ``stop``) or at :attr:`next_pass`."""
        stop = None
        if (position := self.position()) is not None:
            self.next_pass, stop = (int(position[0]), int(position[1])), getattr(position, "stop", None)
        self.passes.copy_(torch.tensor([*self.next_pass, -1 if stop is None else stop]))
        self.next_pass = (self.next_pass[0] + 1, 0)
        return super().__iter__()
