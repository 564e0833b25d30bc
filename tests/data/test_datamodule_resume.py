"""Exact mid-epoch resume through Lightning: fit k steps, checkpoint, resume; the following batches' keys and
losses equal those of an uninterrupted run (CPU, bitwise), with num_workers 0 and 2."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cm3leon_lightning.data import CM3LeonDataModule, DataCountsLogger
from cm3leon_lightning.modules.cm3leon import CM3LeonModule


class Recorder(L.Callback):
    """Keys and loss of every training step."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[list[str]], float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((batch["keys"], outputs["loss"].item()))


def fit(root: Path, workers: int, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None):
    torch.manual_seed(0)
    dm = CM3LeonDataModule(train_data=str(root), seq_len=64, batch_size=2, num_workers=workers)
    model = CM3LeonModule(
        preset="tiny", vocab=dm.vocab.to_dict(), max_seq_len=64, lr=1e-3, warmup_steps=2, decay_steps=100
    )
    rec = Recorder()
    callbacks = [rec, DataCountsLogger()]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=5, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return rec.steps, dm, trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_the_same_batches_and_losses(tiny_dataset: Path, tmp_path: Path, workers: int) -> None:
    # 22 samples, 2 per batch: 11 batches per epoch; stop at step 5 (mid-epoch 0), go on to step 14 (epoch 1).
    full, full_dm, _ = fit(tiny_dataset, workers, 14)
    head, _, _ = fit(tiny_dataset, workers, 5, ckpt_dir=tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    state = torch.load(ckpt, weights_only=True)["CM3LeonDataModule"]
    assert (state["epoch"], state["batch"]) == (0, 5)
    tail, dm, trainer = fit(tiny_dataset, workers, 14, ckpt_path=str(ckpt))
    assert [k for k, _ in head + tail] == [k for k, _ in full]
    assert [loss for _, loss in head + tail] == [loss for _, loss in full]  # bitwise
    assert dm.data_counts == full_dm.data_counts and dm.data_counts["examples"] == 22 + 6
    logged = next(c for c in trainer.callbacks if isinstance(c, DataCountsLogger)).last
    assert logged["data/examples"] == 28.0
