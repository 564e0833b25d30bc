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


def test_a_resume_restores_the_state_of_a_callback_that_saved_the_final_step(tmp_path):
    """The final save made the step due by setting every_n_train_steps to 1, and the checkpoint filed this callback's
    state under that key: a resume did not restore it (best_k_models, last_model_path) and warned of a missing
    callback (found in review)."""
    checkpoint = LastStepCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    _fit(tmp_path, checkpoint, 5, limit_val_batches=0)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    assert list(saved) == [checkpoint.state_key] and "'every_n_train_steps': 2" in checkpoint.state_key


class _Scored(BoringModel):
    """val_loss from the step validated (7 * step % 11: 6 at step 4, 1 at step 8)."""

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.log("val_loss", float(self.global_step * 7 % 11))


@pytest.mark.parametrize("val", [dict(val_check_interval=4, limit_train_batches=20), dict(limit_train_batches=4)])
def test_a_final_step_followed_by_validation_is_ranked_by_that_validation(tmp_path, val):
    """max_steps 8 with validation after step 8 (every 4 steps, or at each 4-batch epoch's end): the final step was
    saved before that validation, ranked by step 4's val_loss, and the validation's own save was skipped (found in
    review: top-k kept step 8 as 6.0, not 1.0, as Lightning's ModelCheckpoint does)."""
    checkpoint = LastStepCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True,
                                    filename="{step}-{val_loss:.0f}")  # fmt: skip
    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=tmp_path, max_steps=8, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=1, **val,
    )  # fmt: skip
    t.fit(_Scored())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "last.ckpt", "step=4-val_loss=6.ckpt", "step=8-val_loss=1.ckpt",
    ]  # fmt: skip
    assert Path(checkpoint.best_model_path).name == "step=8-val_loss=1.ckpt" and _step(tmp_path / "ckpt/last.ckpt") == 8


def test_a_manual_optimization_fit_gets_no_every_n_train_steps_advice(tmp_path, recwarn):
    """The final step is made due as if every_n_train_steps were 1: with manual optimization (the VQGAN module)
    Lightning then advised about an every_n_train_steps the user never set (found in review)."""

    class Manual(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.layer(batch).sum())
            opt.step()

    L.seed_everything(0)
    t = L.Trainer(
        default_root_dir=tmp_path, max_steps=3, callbacks=[LastStepCheckpoint(dirpath=tmp_path / "c", save_last=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )  # fmt: skip
    t.fit(Manual())
    assert _step(tmp_path / "c" / "last.ckpt") == 3
    assert not [w for w in recwarn if "manual optimization" in str(w.message)]
