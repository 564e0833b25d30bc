"""Exact mid-epoch resume through Lightning: fit k steps, checkpoint, resume; the following batches' keys and
losses equal those of an uninterrupted run (CPU, bitwise), with num_workers 0 and 2, from every checkpoint Lightning
writes in fit (after every batch, at every epoch's end, at validation's end, and those of resumed runs)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint
from support.checkpoints import checkpointing_trainer

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


class Tiny(L.LightningModule):
    """One weight: fast fits whose loss depends on the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        return (self.w - batch["input_ids"].float().mean() / 100) ** 2

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val", batch["input_ids"].float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_all_checkpoints(root: Path, ckpt_dir: Path | None = None, ckpt_path: str | None = None, workers: int = 0,
                        val_check_interval: int | None = None, limit: int | None = None):  # fmt: skip
    """12 steps with validation (20 samples, 4 per batch: 5 batches per epoch), writing (with ``ckpt_dir``) every
    checkpoint Lightning can: after every batch (``-b``), at every epoch's end (``-e``, ``on_train_epoch_end``,
    ModelCheckpoint's default without validation) and at every validation's end (``-v``)."""
    L.seed_everything(0, verbose=False)
    dm = CM3LeonDataModule(train_data=str(root), val_data=str(root), seq_len=64, batch_size=4, num_workers=workers)
    rec = Recorder()
    trainer = checkpointing_trainer(rec, ckpt_dir, val_check_interval=val_check_interval, limit_train_batches=limit)
    trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt_path)
    return rec.steps, dm


@pytest.mark.parametrize(
    ("workers", "val_check_interval", "limit"),
    [(0, None, None), (0, 2, None), (0, None, 4), (2, None, None)],
    ids=["val-at-epoch-end", "val-every-2", "limit-4", "workers-2"],
)
def test_resume_from_any_checkpoint_sees_the_same_batches(
    tmp_path: Path, workers: int, val_check_interval: int | None, limit: int | None
) -> None:
    """Restarted from a checkpoint of an epoch's end under max_steps, Lightning trains one more batch in the finished
    epoch (without validation there) and numbers the later epochs one ahead: the loader followed ``current_epoch`` and
    the batches consumed in it, so it trained the next epoch's first batch twice and everything after shifted by one.
    The runs resumed from the end of epoch 0 write checkpoints too, and every one of them resumes exactly as well."""
    root = tmp_path / "ds"
    write_dataset(root, 20, 4)
    kw = dict(workers=workers, val_check_interval=val_check_interval, limit=limit)
    full, full_dm = fit_all_checkpoints(root, tmp_path / "full", **kw)
    per_epoch = limit or 5
    assert len(full) == 12 and len({k for keys, _ in full[:per_epoch] for row in keys for k in row}) == 4 * per_epoch
    val_end = per_epoch if val_check_interval is None else 4  # validation at the epoch's end, or after batch 4
    firsts = {"b": per_epoch, "e": per_epoch, "v": val_end}  # the last batch, the end, validation's end (of epoch 0)
    firsts = {kind: tmp_path / "full" / f"step={step}-{kind}.ckpt" for kind, step in firsts.items()}
    assert all(ckpt.is_file() for ckpt in firsts.values())
    state = torch.load(firsts["e"], weights_only=True)["CM3LeonDataModule"]
    assert (state["epoch"], state["batch"]) == (1, 0)
    checkpoints = sorted((tmp_path / "full").glob("*.ckpt"))
    for kind in "ev":  # the second generation: from the runs resumed at the end of epoch 0 and at validation's end
        fit_all_checkpoints(root, tmp_path / kind, str(firsts[kind]), **kw)
        checkpoints += sorted((tmp_path / kind).glob("*.ckpt"))
    assert len(checkpoints) > 30
    for ckpt in checkpoints:
        step = torch.load(ckpt, weights_only=True)["global_step"]
        tail, dm = fit_all_checkpoints(root, ckpt_path=str(ckpt), **kw)
        assert [keys for keys, _ in tail] == [keys for keys, _ in full[step:]], ckpt
        assert [loss for _, loss in tail] == [loss for _, loss in full[step:]], ckpt
        assert dm.data_counts == full_dm.data_counts, ckpt


@pytest.mark.parametrize(("stop", "val"), [(7, False), (10, True)], ids=["mid-epoch", "epoch-end-val"])
def test_a_fit_ending_between_saves_resumes_exactly_from_its_last_step(tmp_path: Path, stop: int, val: bool) -> None:
    """``LastStepCheckpoint`` saves the step ``max_steps`` ends on (7: mid-epoch 1, no save due) after its batch, as
    Lightning's step checkpoints are, not at the end of fit, when Lightning has counted the epoch as finished (a
    resume from there skipped the epoch's remaining batches): resuming it trains exactly the uninterrupted run's
    remaining batches. With validation after the final step (10: epoch 1's end) it is saved after that validation,
    at the epoch's end."""
    from cm3leon_lightning.callbacks import LastStepCheckpoint

    root = tmp_path / "ds"
    write_dataset(root, 20, 4)

    def run(max_steps: int, ckpt_path: str | None = None) -> list:
        L.seed_everything(0, verbose=False)
        dm = CM3LeonDataModule(train_data=str(root), val_data=str(root) if val else None, seq_len=64, batch_size=4)
        rec = Recorder()
        ckpt = LastStepCheckpoint(tmp_path / f"ckpt-{max_steps}-{ckpt_path is None}", save_last=True, save_top_k=0)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, callbacks=[rec, ckpt], logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=2 if val else 0, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt_path)
        return rec.steps

    full = run(14)
    head = run(stop)
    last = tmp_path / f"ckpt-{stop}-True" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop and head == full[:stop]
    assert run(14, str(last)) == full[stop:] and len(full) == 14
