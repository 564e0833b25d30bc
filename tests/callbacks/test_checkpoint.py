"""``callbacks.LastStepCheckpoint``: a fit that ends between two saves keeps its last steps in ``last.ckpt``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from cm3leon_lightning.callbacks import LastStepCheckpoint

ROOT = Path(__file__).resolve().parents[2]


def _fit(tmp_path: Path, checkpoint: LightningModelCheckpoint, max_steps: int, **trainer: object) -> None:
    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, **trainer,
    )  # fmt: skip
    t.fit(BoringModel())


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.parametrize("cls, saved", [(LastStepCheckpoint, 5), (LightningModelCheckpoint, 4)])
def test_last_ckpt_holds_the_final_step_of_a_fit_ending_between_saves(tmp_path, cls, saved):
    """Every 2 steps, 5 steps: Lightning's own last.ckpt stops at step 4 (found in review: the last steps of a fit
    were lost to export and resume)."""
    _fit(tmp_path, cls(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2), 5, limit_val_batches=0)
    assert _step(tmp_path / "ckpt" / "last.ckpt") == saved
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch=0-step={saved}.ckpt", "last.ckpt"]


def test_a_fit_whose_final_step_was_saved_saves_it_once(tmp_path):
    class Counting(LastStepCheckpoint):
        saves: list[int] = []

        def _save_last_checkpoint(self, trainer, monitor_candidates):  # noqa: ANN001, ANN202
            self.saves.append(trainer.global_step)
            return super()._save_last_checkpoint(trainer, monitor_candidates)

    _fit(tmp_path, Counting(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2), 4, limit_val_batches=0)
    assert Counting.saves == [2, 4] and _step(tmp_path / "ckpt" / "last.ckpt") == 4


def test_the_final_step_is_a_step_save_top_k_too(tmp_path):
    """Without save_last the final step is kept as a top-k checkpoint; and a save_last run keeps its top-k files (the
    first version saved only last.ckpt at the final step, which then counted as saved and skipped Lightning's)."""
    _fit(tmp_path / "a", LastStepCheckpoint(dirpath=tmp_path / "a" / "ckpt", every_n_train_steps=2, save_top_k=-1), 5,
         limit_val_batches=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt",
    ]  # fmt: skip
    _fit(tmp_path / "b", LastStepCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True), 3, limit_val_batches=0)
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert _step(tmp_path / "b" / "ckpt" / "last.ckpt") == 3


def test_the_configs_use_it():
    """Every shipped config that saves last.ckpt uses this class (a config with Lightning's would lose final steps)."""
    found = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for cb in (yaml.safe_load(path.read_text()) or {}).get("trainer", {}).get("callbacks") or []:
            if "Checkpoint" in cb.get("class_path", ""):
                assert cb["class_path"] == "cm3leon_lightning.callbacks.LastStepCheckpoint", path
                found += 1
    assert found >= 6
