"""Every checkpoint Lightning can write during ``fit``, for the resume tests of the data modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def every_checkpoint(ckpt_dir: Path) -> list[ModelCheckpoint]:
    """Checkpoints after every batch (``{step}-b``), at every epoch's end (``{step}-e``, ``on_train_epoch_end``,
    ModelCheckpoint's default without validation) and at every validation's end (``{step}-v``; the module logs
    ``val``)."""
    return [
        ModelCheckpoint(ckpt_dir, "{step}-b", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(ckpt_dir, "{step}-e", save_top_k=-1, save_on_train_epoch_end=True),
        ModelCheckpoint(ckpt_dir, "{step}-v", monitor="val", save_top_k=-1, save_on_train_epoch_end=False),
    ]


def checkpointing_trainer(
    recorder: L.Callback, ckpt_dir: Path | None, max_steps: int = 12, **overrides: Any
) -> L.Trainer:
    """A quiet CPU trainer for ``max_steps`` steps with one validation batch, ``recorder`` and (with ``ckpt_dir``)
    :func:`every_checkpoint`; ``overrides`` are further ``Trainer`` arguments (``val_check_interval``, ...)."""
    callbacks = [recorder, *(every_checkpoint(ckpt_dir) if ckpt_dir is not None else [])]
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, **overrides,
    )  # fmt: skip
