"""Fitting one CM3LeonDataModule again with a new Trainer (fit, look, fit again without ``ckpt_path``): the new
trainer's counters start at 0, and so does the data, exactly as for a fresh data module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from conftest import write_dataset

from cm3leon_lightning.data import CM3LeonDataModule


class KeysRecorder(L.LightningModule):
    """One weight; records the sample keys of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[list[str]]] = []

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        self.keys.append(batch["keys"])
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm: CM3LeonDataModule, max_steps: int) -> list[list[list[str]]]:
    """The keys trained by a new Trainer's fit of ``max_steps`` steps (no checkpoint)."""
    model = KeysRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return model.keys


def test_a_new_trainer_starts_the_data_at_its_own_position(tmp_path: Path) -> None:
    """The second fit followed the new trainer's count (0) with the first fit's worker positions (folded in by a look
    at the position, as checkpoints and DataCountsLogger do): it trained epoch 0's last batch, then padding rows
    without keys (an IndexError in a training step that read them)."""
    write_dataset(tmp_path / "ds", 16, 4)  # 4 batches of 4 per epoch

    def make() -> CM3LeonDataModule:
        return CM3LeonDataModule(train_data=str(tmp_path / "ds"), seq_len=64, batch_size=4, num_workers=0,
                                 shuffle_shards=1)  # fmt: skip

    fresh = fit(make(), 10)
    assert sorted(k for keys in fresh[:4] for row in keys for k in row) == [f"doc-{i:04d}" for i in range(16)]
    dm = make()
    assert fit(dm, 3) == fresh[:3]
    dm.state_dict()  # look
    second = fit(dm, 6)  # a new trainer, no ckpt_path: epoch 0, batch 0
    assert second == fresh[:6]
    assert all(len(row) == 1 for keys in second for row in keys)  # no padding-only rows
    dm.load_state_dict({"epoch": 1, "batch": 0})  # a position given between fits is where the next one starts
    assert fit(dm, 6) == fresh[4:10]


def test_validate_after_fit_keeps_the_fits_position_for_a_checkpoint(tmp_path: Path) -> None:
    """After ``fit`` then ``validate``, the data module reported the loader's own count (it had fetched ahead), not
    the trainer's: ``trainer.save_checkpoint`` then saved another position than right after the fit, and a resume
    from it trained other batches."""
    write_dataset(tmp_path / "ds", 16, 4)  # 4 batches of 4 per epoch
    make = lambda: CM3LeonDataModule(train_data=str(tmp_path / "ds"), val_data=str(tmp_path / "ds"), seq_len=64,  # noqa: E731
                                     batch_size=4, num_workers=0, shuffle_shards=1)  # fmt: skip
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    dm, model = make(), KeysRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, limit_val_batches=1, **quiet)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.save_checkpoint(tmp_path / "validated.ckpt")
    states = [torch.load(tmp_path / f"{n}.ckpt", weights_only=True)["CM3LeonDataModule"] for n in ("fit", "validated")]
    assert states[0] == states[1] == dm.state_dict() and states[0]["epoch"] >= 1

    def resume(name: str) -> list[list[list[str]]]:
        resumed = KeysRecorder()
        L.Trainer(accelerator="cpu", max_steps=12, limit_val_batches=0, **quiet).fit(
            resumed, datamodule=make(), ckpt_path=str(tmp_path / f"{name}.ckpt")
        )
        return resumed.keys

    first = resume("fit")
    assert first and resume("validated") == first
