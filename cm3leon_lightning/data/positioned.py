"""Training positions of loaders that cannot skip batches by index: WebDataset image shards, exact or resampled.

A map-style dataset resumes through its sampler (``data/sampling.py``). A shard pipeline has no sampler: its order
is seeded by the epoch (and, resampled, the batch it starts at), so the main process decides each pass's
``(epoch, batch)`` and hands it to the pipeline's copies in the workers through shared memory
(:class:`PositionedLoader`). In ``fit`` that position is the trainer's, shifted by a position loaded before the
fit (:class:`FitPosition`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.data.sampling import trainer_position


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
        the saved state: the trainer does not know that its loader yields fewer batches than an epoch's. (Its
        position stays past the end: a checkpoint there, resumed, has the loader yield nothing until the trainer's
        epoch ends.)"""
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

    def __call__(self, trainer: L.Trainer | None) -> tuple[int, int] | None:
        """The position after the trainer's consumed batches, shifted; None outside ``fit``."""
        position = trainer_position(trainer)
        if position is None:
            return None
        (epoch, batch), (epochs, batches) = position, self.shift
        return epoch + epochs, batch + (batches if epoch == self.first else 0)

    def state(self, position: tuple[int, int]) -> dict[str, Any]:
        """``{"epoch", "batch"}`` of ``position`` (the next epoch's start after its epoch's last batch), with
        ``"shift"`` when there is one (``[epochs, batches]``, and :attr:`first` when the batches are not the trainer's
        epoch 0's)."""
        epoch, batch = position
        if self.epoch_batches is not None and batch >= self.epoch_batches:
            epoch, batch = epoch + 1, 0
        state: dict[str, Any] = {"epoch": int(epoch), "batch": int(batch)}
        if self.shift != (0, 0):
            state["shift"] = [*self.shift, self.first] if self.shift[1] and self.first else list(self.shift)
        return state


class PositionedLoader(DataLoader):
    """A DataLoader whose every pass starts where the main process says: at ``position()`` in ``fit``, else at
    :attr:`next_pass` (each pass then the next epoch, from its start).

    The pass's ``(epoch, batch)`` goes into :attr:`passes`, a shared-memory tensor that the dataset (and its copies in
    the persistent workers) read at the start of their pass: copies counting their own passes ran one epoch ahead
    when Lightning started a reloaded loader twice (``reload_dataloaders_every_n_epochs``). Hand :attr:`passes` to
    the dataset before the first pass.

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
        self.passes = torch.tensor(self.next_pass, dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[Any]:
        """Start a pass at the trainer's position (in ``fit``) or at :attr:`next_pass`."""
        if (position := self.position()) is not None:
            self.next_pass = position
        self.passes.copy_(torch.tensor(self.next_pass))
        self.next_pass = (self.next_pass[0] + 1, 0)
        return super().__iter__()
