"""Shard loaders' training positions (data/positioned.py): a position loaded between two fits of the same Trainer is
where the second fit's data starts, and checkpoints of that fit resume the same data."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from cm3leon_lightning.data.images import ImageDataModule


class Count(L.LightningModule):
    """One weight; records each training batch's image numbers (pixel (0, 0)'s red value)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[:, 0, 0, 0].tolist())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def write_shards(folder: Path) -> None:
    """4 shards of 4 images numbered 0..15."""
    folder.mkdir()
    for s in range(4):
        with wds.TarWriter(str(folder / f"s-{s}.tar")) as sink:
            for n in range(4 * s, 4 * s + 4):
                img = np.zeros((8, 8, 3), np.uint8)
                img[0, 0, 0] = n
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                sink.write({"__key__": f"i{n:02d}", "png": buf.getvalue()})


def trainer(max_epochs: int, ckpt_dir: Path | None = None) -> L.Trainer:
    callbacks = [ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=1, save_top_k=-1)] if ckpt_dir else []
    return L.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                     enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0)  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_position_loaded_between_two_fits_of_the_same_trainer_is_where_the_second_starts(
    tmp_path: Path, mode: str
) -> None:
    """The second fit of a Trainer that has trained took the loaded state's saved shift (none) instead of its
    position: it read on from the trainer's epoch, dropping the loaded position without a word (image folders honour
    it). Checkpoints of the second fit keep the trainer epoch whose batches the shift moves, so they resume too."""
    write_shards(tmp_path / "sh")

    def make() -> ImageDataModule:
        return ImageDataModule(train=str(tmp_path / "sh"), image_size=8, batch_size=4, shuffle_buffer=8, mode=mode)

    full = Count()
    trainer(5).fit(full, datamodule=make())  # data epochs 0..4 of 4 batches
    skip = 1 if mode == "resampled" else 0  # exact shards restart an epoch from its start
    model, dm, first = Count(), make(), trainer(1, tmp_path / "ckpt")
    first.fit(model, datamodule=dm)
    assert model.seen == full.seen[:4] and dm.state_dict() == {"epoch": 1, "batch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.load_state_dict({"epoch": 3, "batch": skip})
    first.fit_loop.max_epochs = 3
    first.fit(model, datamodule=dm)  # trainer epochs 1 and 2: data epochs 3 (from batch `skip`) and 4
    second = model.seen[4:]
    assert len(second) == 8 - skip
    if mode == "exact":
        assert second[:4] == full.seen[12:16]
    assert second[4 - skip :] == full.seen[16:20]
    shift = [2, 1, 1] if skip else [2, 0]  # data epoch - trainer epoch; batches moved in trainer epoch 1
    assert dm.state_dict() == {"epoch": 5, "batch": 0, "shift": shift}
    # a checkpoint of the second fit after its first batch (data epoch 3 after batch skip + 1), resumed
    saved = torch.load(tmp_path / "ckpt" / "step=5.ckpt", weights_only=True)["ImageDataModule"]
    assert saved == {"epoch": 3, "batch": skip + 1, "shift": shift}
    tail = Count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(3).fit(tail, datamodule=make(), ckpt_path=str(tmp_path / "ckpt" / "step=5.ckpt"))
    rest = 4 - (skip + 1) if mode == "resampled" else 4  # resampled: the epoch's remaining batches, drawn afresh
    assert len(tail.seen) == rest + 4
    if mode == "exact":
        assert tail.seen[:4] == full.seen[12:16]
    assert tail.seen[rest:] == full.seen[16:20]
