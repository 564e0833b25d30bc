"""``LastStepCheckpoint``: Lightning's ``ModelCheckpoint`` that also saves the step a fit ends with.

Lightning saves ``last.ckpt`` only when a checkpoint is due (``every_n_train_steps``, a validation end, an epoch end)
and, at the end of fit, only if it never saved one: a fit that stops at ``max_steps`` between two saves (2500 steps
with ``every_n_train_steps: 2000``, or a ``max_steps`` inside a validation interval) left its last steps unsaved, so
``cm3leon export --ckpt last.ckpt`` and a resume both missed them. The final step is saved after its batch, where
Lightning writes its step checkpoints, not at the end of fit: by then Lightning has counted the epoch as finished, and
a resume from such a checkpoint would skip the rest of the epoch's data.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class LastStepCheckpoint(_LightningModelCheckpoint):
    """``lightning.pytorch.callbacks.ModelCheckpoint`` (same arguments) that also saves the batch reaching
    ``max_steps``, as a step save (top-k, and ``last.ckpt`` with ``save_last``); the configs under ``configs/`` use
    it (another name than Lightning's, so ``--trainer.callbacks ModelCheckpoint`` still names one class)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Lightning's step saves, with the step that reaches ``max_steps`` due as if ``every_n_train_steps`` were
        (top-k and ``last.ckpt``, or both deferred to validation's end when the monitored metric is not logged yet)."""
        final = 0 < trainer.max_steps <= trainer.global_step
        every = self._every_n_train_steps
        if final:
            self._every_n_train_steps = 1  # (read by Lightning's hook only)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._every_n_train_steps = every
