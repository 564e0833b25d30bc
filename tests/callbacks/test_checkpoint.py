"""``callbacks.LastStepCheckpoint``: a fit that ends between two saves keeps its last steps in ``last.ckpt``."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from cm3leon_lightning.callbacks import LastStepCheckpoint
from cm3leon_lightning.data.sampling import ResumableDataLoader, ResumableTrainData

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


class _Data(ResumableTrainData, L.LightningDataModule):
    """64 fixed random vectors in batches of 2, shuffled per epoch, resumable mid-epoch (as the project's data
    modules are: Lightning alone restarts a plain DataLoader's epoch from its first batch); one validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self._init_resume()
        self.vectors = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> ResumableDataLoader:
        return self.resumable_loader(self.vectors, batch_size=2, seed=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.vectors[:2], batch_size=2)


class _Resumable(BoringModel):
    """AdamW (state to restore) with a learning rate halved every epoch; val_loss |step - 6|: lowest at step 6."""

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.log("val_loss", float(abs(self.global_step - 6)))


class _Saves(LastStepCheckpoint):
    """Records every file saved, as (step, name)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.saves: list[tuple[int, str]] = []

    def _save_checkpoint(self, trainer, filepath):  # noqa: ANN001, ANN202
        self.saves.append((trainer.global_step, Path(filepath).name))
        return super()._save_checkpoint(trainer, filepath)


class _StopAt(L.Callback):
    """Sets ``should_stop`` after a step's batch, as ``max_time``'s Timer does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args: object) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _run(tmp_path: Path, checkpoint: LightningModelCheckpoint | None, *callbacks: L.Callback,
         ckpt_path: Path | None = None, **trainer: object) -> L.Trainer:  # fmt: skip
    """A quiet CPU fit of :class:`_Resumable` on :class:`_Data` (one validation batch unless ``trainer`` says, no
    sanity check), from ``ckpt_path`` if given."""
    L.seed_everything(0, verbose=False)
    t = L.Trainer(
        default_root_dir=tmp_path, callbacks=[*callbacks, *([checkpoint] if checkpoint else [])], logger=False,
        enable_checkpointing=checkpoint is not None, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", num_sanity_val_steps=0, **{"limit_val_batches": 1, **trainer},
    )  # fmt: skip
    with warnings.catch_warnings():  # a resume without the first fit's EarlyStopping or _StopAt
        warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint need to be provided")
        t.fit(_Resumable(), datamodule=_Data(), ckpt_path=ckpt_path)
    return t


def _state(trainer: L.Trainer) -> dict:
    """What a resume must restore: weights, optimizer, learning-rate schedule, step and epoch."""
    return {
        "weights": trainer.lightning_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "step": trainer.global_step,
        "epoch": trainer.current_epoch,
    }  # fmt: skip


def _assert_same(a: object, b: object, where: str = "") -> None:
    """``a`` and ``b`` equal exactly (tensors bitwise), recursively through dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_resumes_exactly(tmp_path: Path, last: Path, stop: int, **trainer: object) -> None:
    """``last`` holds step ``stop``; a fit resumed from it ends as the uninterrupted fit (``trainer``) does."""
    assert _step(last) == stop
    straight = _state(_run(tmp_path / "straight", None, **trainer))
    resumed = _state(_run(tmp_path / "resumed", None, ckpt_path=last, **trainer))
    assert resumed["step"] == straight["step"] > stop
    _assert_same(resumed, straight)


@pytest.mark.parametrize("val", [0, 1], ids=["no-val", "val-each-epoch"])
def test_a_fit_ending_at_max_epochs_saves_its_final_step_once_and_resumes_exactly(tmp_path, val):
    """max_epochs 2 of 3 batches with every_n_train_steps 4: Lightning saved step 4 and never step 6, the fit's last
    (found in review: only max_steps ends were saved); it is saved once, at the epoch's end, and a resume from it to
    max_epochs 4 ends as the uninterrupted fit does (weights, AdamW state, halved learning rate, step 12)."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4, save_top_k=-1)
    _run(tmp_path, checkpoint, max_epochs=2, limit_train_batches=3, limit_val_batches=val)
    assert checkpoint.saves == [(4, "epoch=1-step=4.ckpt"), (4, "last.ckpt"), (6, "epoch=1-step=6.ckpt"),
                                (6, "last.ckpt")]  # fmt: skip
    _assert_resumes_exactly(tmp_path, tmp_path / "ckpt" / "last.ckpt", 6, max_epochs=4, limit_train_batches=3,
                            limit_val_batches=val)  # fmt: skip


def test_a_last_epoch_not_validated_is_saved_too(tmp_path):
    """Validation every 2 epochs, 3 epochs: Lightning saves its epoch checkpoints after validation and so never saved
    epoch 3 (step 9); it is saved at that epoch's end, once, ranked by the last val_loss logged."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True, save_top_k=-1,
                        filename="{step}-{val_loss:.0f}")  # fmt: skip
    _run(tmp_path, checkpoint, max_epochs=3, limit_train_batches=3, check_val_every_n_epoch=2)
    assert checkpoint.saves == [(6, "step=6-val_loss=0.ckpt"), (6, "last.ckpt"), (9, "step=9-val_loss=0.ckpt"),
                                (9, "last.ckpt")]  # fmt: skip


@pytest.mark.parametrize(("every", "saves"), [
    (3, [(3, "epoch=0-step=3.ckpt"), (3, "last.ckpt"), (6, "epoch=0-step=6.ckpt"), (6, "last.ckpt"),
         (8, "epoch=0-step=8.ckpt"), (8, "last.ckpt")]),
    (4, [(4, "epoch=0-step=4.ckpt"), (4, "last.ckpt"), (8, "epoch=0-step=8.ckpt"), (8, "last.ckpt")]),
])  # fmt: skip
def test_an_early_stopped_fit_saves_its_final_step_once_and_resumes_exactly(tmp_path, every, saves):
    """EarlyStopping (patience 0) stops at step 8's validation (val_loss 2 after 0 at step 6), mid-epoch: with
    every_n_train_steps 3 Lightning's last.ckpt stayed at step 6 (found in review); step 8 is saved after that
    validation, as a mid-epoch step (a resume trains the epoch's remaining batches, to max_steps 14, exactly as the
    uninterrupted fit), and once when its step save was due anyway (every 4)."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=every, save_top_k=-1)
    stop = EarlyStopping("val_loss", patience=0)
    _run(tmp_path, checkpoint, stop, max_steps=14, limit_train_batches=10, val_check_interval=2)
    assert stop.stopped_epoch == 0 and checkpoint.saves == saves
    _assert_resumes_exactly(tmp_path, tmp_path / "ckpt" / "last.ckpt", 8, max_steps=14, limit_train_batches=10,
                            val_check_interval=2)  # fmt: skip


@pytest.mark.parametrize("val", [0, 1], ids=["no-val", "val-then"])
def test_a_fit_stopped_by_should_stop_mid_epoch_saves_its_final_step_and_resumes_exactly(tmp_path, val):
    """should_stop set after step 5's batch (as max_time's Timer sets it), mid-epoch, every_n_train_steps 4: last.ckpt
    stayed at step 4; step 5 is saved (after the validation Lightning runs on a stop request, when there is one) as a
    mid-epoch step, from which a resume trains exactly the rest of the uninterrupted fit."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4, save_top_k=0)
    _run(tmp_path, checkpoint, _StopAt(5), max_steps=12, limit_train_batches=8, limit_val_batches=val)
    assert checkpoint.saves == [(4, "last.ckpt"), (5, "last.ckpt")]
    _assert_resumes_exactly(tmp_path, tmp_path / "ckpt" / "last.ckpt", 5, max_steps=12, limit_train_batches=8,
                            limit_val_batches=val)  # fmt: skip


def test_a_final_step_never_validated_is_saved_after_its_batch(tmp_path):
    """monitor val_loss, validation every 2 epochs of 4 batches, max_steps 6 (mid-epoch 1, never validated): the
    deferred save never came, Lightning wrote last.ckpt only at the end of fit, as a finished epoch, and a resume
    from it diverged from the uninterrupted fit (found in review); it is saved after step 6's batch (no score:
    last.ckpt only) and resumes exactly."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True, save_top_k=-1)
    _run(tmp_path, checkpoint, max_steps=6, limit_train_batches=4, check_val_every_n_epoch=2)
    assert checkpoint.saves == [(6, "last.ckpt")]
    _assert_resumes_exactly(tmp_path, tmp_path / "ckpt" / "last.ckpt", 6, max_steps=14, limit_train_batches=4,
                            check_val_every_n_epoch=2)  # fmt: skip


def test_a_final_step_with_no_score_and_no_save_last_is_not_saved_with_a_warning(tmp_path):
    """Without save_last an unscored final step has no place to go (top-k ranks by the monitored metric): it was
    dropped silently; the warning names the step, the metric and the way to keep it."""
    checkpoint = _Saves(dirpath=tmp_path / "ckpt", monitor="val_loss")
    with pytest.warns(UserWarning) as caught:
        _run(tmp_path, checkpoint, max_steps=6, limit_train_batches=4, check_val_every_n_epoch=2)
    message = ("LastStepCheckpoint(monitor='val_loss'): the fit's final step 6 is not saved: no validation logged "
               "'val_loss' to rank it, and save_last is off (save_last=True keeps it as last.ckpt)")  # fmt: skip
    assert [str(w.message) for w in caught if "LastStepCheckpoint" in str(w.message)] == [message]
    assert checkpoint.saves == [] and not (tmp_path / "ckpt").exists()
