"""Every checkpoint Lightning can write during ``fit``, for the resume tests of the data modules."""

from __future__ import annotations

from pathlib import Path

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
