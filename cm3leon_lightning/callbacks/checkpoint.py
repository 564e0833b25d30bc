"""``LastStepCheckpoint``: Lightning's ``ModelCheckpoint`` that also saves the step a fit ends with.

Lightning saves ``last.ckpt`` only when a checkpoint is due (``every_n_train_steps``, a validation end, an epoch end)
and, at the end of fit, only if it never saved one: a fit that stops at ``max_steps`` between two saves (2500 steps
with ``every_n_train_steps: 2000``, or a ``max_steps`` inside a validation interval) left its last steps unsaved, so
``cm3leon export --ckpt last.ckpt`` and a resume both missed them. The final step is saved after its batch, where
Lightning writes its step checkpoints, not at the end of fit: by then Lightning has counted the epoch as finished, and
a resume from such a checkpoint would skip the rest of the epoch's data.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class LastStepCheckpoint(_LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) that also saves the batch reaching
    ``max_steps``, as a step save (top-k, and ``last.ckpt`` with ``save_last``), or after the validation that follows
    it, with that validation's metrics; the configs under ``configs/`` use it (another name than Lightning's, so
    ``--trainer.callbacks ModelCheckpoint`` still names one class)."""

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
        """Lightning's step saves, with the step that reaches ``max_steps`` due as if ``every_n_train_steps`` were 1
        (top-k and ``last.ckpt``, or both deferred to validation's end when the monitored metric is not logged yet);
        when a validation follows that batch, the step is saved after it instead (its scores, not the last ones)."""
        if not 0 < trainer.max_steps <= trainer.global_step:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loop = trainer.fit_loop.epoch_loop
        if loop._should_check_val_fx(trainer.fit_loop._data_fetcher) and (
            loop.batch_progress.is_last_batch or not self._should_save_on_train_epoch_end(trainer)
        ):
            self._defer_save_until_validation = True  # saved in on_validation_end, or in on_train_epoch_end below
            return None
        self._configured_every, self._every_n_train_steps = self._every_n_train_steps, 1
        try:
            with warnings.catch_warnings():  # Lightning's advice to users of every_n_train_steps, set here by us
                warnings.filterwarnings("ignore", "Using ModelCheckpoint with manual optimization")
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._every_n_train_steps = self._configured_every
            del self._configured_every
        return None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's epoch-end save, and the final step's save deferred to after the validation before it."""
        final = 0 < trainer.max_steps <= trainer.global_step
        if not (final and self._defer_save_until_validation and self._should_save_on_train_epoch_end(trainer)):
            return super().on_train_epoch_end(trainer, pl_module)
        self._defer_save_until_validation = False
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return None
