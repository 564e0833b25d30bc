"""``LastStepCheckpoint``: Lightning's ``ModelCheckpoint`` that also saves the step a fit ends with.

Lightning saves ``last.ckpt`` only when a checkpoint is due (``every_n_train_steps``, a validation end, an epoch end)
and, at the end of fit, only if it never saved one: a fit that stops between two saves (2500 steps with
``every_n_train_steps: 2000``, a ``max_steps`` inside a validation interval, a ``max_epochs``, ``max_time`` or early
stop between two due saves) left its last steps unsaved, so ``cm3leon export --ckpt last.ckpt`` and a resume both
missed them. The final step is saved where Lightning writes the save it stands for, not at the end of fit: after its
batch (``max_steps``, or ``should_stop`` set there by ``max_time``'s Timer or a callback), after the validation that
follows it (early stopping, or a final batch with a validation due), or at the epoch's end (``max_epochs``). At the
end of fit Lightning has counted the epoch as finished, and a resume from a checkpoint saved then would skip the rest
of the epoch's data.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def ends_after_batch(trainer: L.Trainer) -> bool:
    """Whether ``trainer``'s fit ends after the batch (or the validation) just run: ``max_steps`` reached, or
    ``should_stop`` set (``max_time``'s Timer, early stopping, a callback) once ``min_steps``/``min_epochs`` allow."""
    fit = trainer.fit_loop
    return _is_max_limit_reached(trainer.global_step, fit.max_steps) or (trainer.should_stop and fit._can_stop_early)


def ends_after_epoch(trainer: L.Trainer) -> bool:
    """Whether ``trainer``'s fit ends after the epoch whose ``on_train_epoch_end`` runs (Lightning has counted it as
    processed then): :func:`ends_after_batch`, or ``max_epochs`` reached."""
    fit = trainer.fit_loop
    return ends_after_batch(trainer) or _is_max_limit_reached(fit.epoch_progress.current.processed, fit.max_epochs)


class LastStepCheckpoint(_LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) that also saves the step a fit ends on
    (``max_steps``, ``max_epochs``, ``max_time``, early stopping), once, as a step save (top-k, and ``last.ckpt`` with
    ``save_last``): after its batch, or after the validation that follows it, with that validation's metrics, or at
    the last epoch's end. With ``monitor`` the final step joins the top-k only when the metric has been logged; a
    final step never validated is still saved as ``last.ckpt``. The configs under ``configs/`` use it (another name
    than Lightning's, so ``--trainer.callbacks ModelCheckpoint`` still names one class)."""

    @property
    def state_key(self) -> str:
        """Lightning's key, from the configured ``every_n_train_steps`` also while the final step is made due (a
        checkpoint saved then filed this callback's state under another key, which a resume did not load)."""
        every = getattr(self, "_configured_every", self._every_n_train_steps)
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_train_steps=every, every_n_epochs=self._every_n_epochs,
            train_time_interval=self._train_time_interval,
        )  # fmt: skip

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Lightning's step saves, with the batch the fit ends on due as if ``every_n_train_steps`` were 1 (top-k and
        ``last.ckpt``; ``last.ckpt`` alone while the monitored metric is not logged yet); when a validation follows
        that batch, the step is saved after it instead (its scores, not the last ones)."""
        if not ends_after_batch(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._defer_save_until_validation = True  # saved in on_validation_end, or in on_train_epoch_end
            return None
        self._configured_every, self._every_n_train_steps = self._every_n_train_steps, 1
        try:
            with warnings.catch_warnings():  # Lightning's advice to users of every_n_train_steps, set here by us
                warnings.filterwarnings("ignore", "Using ModelCheckpoint with manual optimization")
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._every_n_train_steps = self._configured_every
            del self._configured_every
        self._save_final_step(trainer)  # Lightning deferred it for a metric no validation will log: last.ckpt now
        return None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's validation-end save, and the final step's, with this validation's metrics: the step deferred
        by :meth:`on_train_batch_end`, or the one early stopping ended the fit on (at the epoch's last batch, where
        Lightning saves at the epoch's end, it is saved then, in :meth:`on_train_epoch_end`)."""
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or not ends_after_batch(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._should_save_on_train_epoch_end(trainer):
            return
        self._save_final_step(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's epoch-end save, and, at the fit's last epoch, the final step's if it is not saved yet."""
        super().on_train_epoch_end(trainer, pl_module)
        if ends_after_epoch(trainer):
            self._save_final_step(trainer)

    def _save_final_step(self, trainer: L.Trainer) -> None:
        """Save the current step (top-k when it has a score, and ``last.ckpt``) unless it is saved already; warn when
        it cannot be saved at all (no score, no ``save_last``)."""
        self._defer_save_until_validation = False
        if self._should_skip_saving_checkpoint(trainer):  # saved at this step already, or not fitting
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        elif not self.save_last and getattr(self, "_unsaved_final_step", None) != trainer.global_step:
            self._unsaved_final_step = trainer.global_step  # once, not again at the epoch's end
            rank_zero_warn(
                f"LastStepCheckpoint(monitor={self.monitor!r}): the fit's final step {trainer.global_step} is not "
                f"saved: no validation logged {self.monitor!r} to rank it, and save_last is off (save_last=True keeps "
                "it as last.ckpt)"
            )
        self._save_last_checkpoint(trainer, candidates)
