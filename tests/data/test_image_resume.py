"""ImageCaptionDataModule and ImageDataModule resume exactly through Lightning: fit k steps, checkpoint, resume; the
batches that follow equal an uninterrupted run's (images and captions, bitwise), with num_workers 0 and 2, from every
checkpoint Lightning writes in fit (mid-epoch, at the epoch's last batch, at its end, at validation's end). The order
is seeded by the data module's seed and the epoch only; shards say they cannot resume mid-epoch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image
from support.checkpoints import checkpointing_trainer
from torch.utils.data import DistributedSampler

from cm3leon_lightning.data.images import ImageDataModule, synthetic_images
from cm3leon_lightning.data.pairs import ImageCaptionDataModule, make_shape_pairs
from cm3leon_lightning.data.sampling import ResumableSampler, epoch_order


class Tiny(L.LightningModule):
    """One weight; the loss only has to depend on the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        return (self.w - images.float().mean() / 255) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(L.Callback):
    """The images (and captions) of every training step."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.captions: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images.append((batch["image"] if isinstance(batch, dict) else batch).clone())
        self.captions.append(list(batch["caption"]) if isinstance(batch, dict) else [])


def fit(make_dm, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None, global_seed: int = 0,
        limit: int | None = None, every_n_train_steps: int | None = 1):  # fmt: skip
    L.seed_everything(global_seed, verbose=False)
    dm, rec = make_dm(), Recorder()
    callbacks: list[L.Callback] = [rec]
    if ckpt_dir is not None:
        # every_n_train_steps None: at every epoch's end (on_train_epoch_end)
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every_n_train_steps, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=limit,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(), datamodule=dm, ckpt_path=ckpt_path)
    rec.warnings = [str(w.message) for w in caught]
    return rec, dm


def pairs_dm(workers: int, seed: int = 0) -> ImageCaptionDataModule:
    images, captions = make_shape_pairs(20, 16, seed=5)
    captions = [f"{c} {i}" for i, c in enumerate(captions)]  # unique: a repeated or missing pair shows
    return ImageCaptionDataModule(
        images=images, captions=captions, image_size=16, batch_size=4, val_fraction=0.0, num_workers=workers, seed=seed
    )


def images_dm(workers: int, seed: int = 0) -> ImageDataModule:
    return ImageDataModule(synthetic=18, image_size=8, batch_size=4, num_workers=workers, hflip=True, seed=seed)


def _check_resume(make_dm, tmp_path: Path, steps: int, stops: list[int], per_epoch: int) -> Recorder:
    full, _ = fit(make_dm, steps)
    fit(make_dm, max(stops), ckpt_dir=tmp_path / "ckpt")
    for stop in stops:
        epoch = (stop - 1) // per_epoch
        ckpt = tmp_path / "ckpt" / f"epoch={epoch}-step={stop}.ckpt"
        state = torch.load(ckpt, weights_only=True)[type(make_dm()).__qualname__]
        assert (state["epoch"], state["batch"]) == divmod(stop, per_epoch)
        # a different global seed on resume changes nothing: the order is the data module's
        tail, _ = fit(make_dm, steps, ckpt_path=str(ckpt), global_seed=123)
        assert len(tail.images) == steps - stop
        assert not [w for w in tail.warnings if "not resumable" in w]  # Lightning sees a resumable loader
        for got, want in zip(tail.images, full.images[stop:], strict=True):
            assert torch.equal(got, want)
        assert tail.captions == full.captions[stop:]
    return full


@pytest.mark.parametrize("workers", [0, 2])
def test_pairs_resume_mid_epoch_sees_the_same_batches(tmp_path: Path, workers: int) -> None:
    # 20 pairs, 4 per batch: 5 batches per epoch; resume within epoch 0, at its end, and within epoch 1
    full = _check_resume(lambda: pairs_dm(workers), tmp_path, 12, [3, 5, 7], 5)
    epochs = [sum(full.captions[e * 5 : e * 5 + 5], []) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 20  # each pair once per epoch
    assert epochs[0] != epochs[1]  # in another order
    order = epoch_order(20, 0, 0)
    pairs = pairs_dm(0)
    pairs.setup()
    assert epochs[0] == [pairs.train_set.captions[i] for i in order]  # the seeded order, not the global RNG's


@pytest.mark.parametrize("workers", [0, 2])
def test_images_resume_mid_epoch_sees_the_same_batches_and_flips(tmp_path: Path, workers: int) -> None:
    # 18 images, 4 per batch: 5 batches per epoch (the last one of 2 kept)
    full = _check_resume(lambda: images_dm(workers), tmp_path, 12, [3, 7], 5)
    assert [len(b) for b in full.images[:5]] == [4, 4, 4, 4, 2]
    src = torch.from_numpy(synthetic_images(18, 8, seed=0)).permute(0, 3, 1, 2)
    flips = []
    for e in range(2):
        got = torch.cat(full.images[e * 5 : e * 5 + 5])
        order = epoch_order(18, 0, e)
        flipped = [not torch.equal(g, src[i]) for g, i in zip(got, order, strict=True)]
        assert all(torch.equal(g, src[i].flip(-1) if f else src[i]) for g, i, f in zip(got, order, flipped))
        flips.append(dict(zip(order.tolist(), flipped, strict=True)))
    differ = [i for i in range(18) if flips[0][i] != flips[1][i] and not torch.equal(src[i], src[i].flip(-1))]
    assert differ  # flips are drawn anew each epoch, not fixed per image


class Validated(Tiny):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val", (batch["image"] if isinstance(batch, dict) else batch).float().mean())


def fit_all_checkpoints(make_dm, ckpt_dir: Path | None = None, ckpt_path: str | None = None,
                        val_check_interval: int | None = None) -> Recorder:  # fmt: skip
    """12 steps with validation, writing (with ``ckpt_dir``) every checkpoint Lightning can: after every batch
    (``-b``), at every epoch's end (``-e``, ``on_train_epoch_end``, ModelCheckpoint's default without validation) and
    at every validation's end (``-v``)."""
    L.seed_everything(0, verbose=False)
    rec = Recorder()
    trainer = checkpointing_trainer(rec, ckpt_dir, val_check_interval=val_check_interval)
    trainer.fit(Validated(), datamodule=make_dm(), ckpt_path=ckpt_path)
    return rec


def pairs_val_dm() -> ImageCaptionDataModule:
    images, captions = make_shape_pairs(24, 16, seed=5)
    captions = [f"{c} {i}" for i, c in enumerate(captions)]
    return ImageCaptionDataModule(images=images, captions=captions, image_size=16, batch_size=4, val_fraction=1 / 6)


def images_val_dm() -> ImageDataModule:
    return ImageDataModule(synthetic=18, synthetic_val=4, image_size=8, batch_size=4, hflip=True)


@pytest.mark.parametrize("val_check_interval", [None, 2], ids=["val-at-epoch-end", "val-every-2"])
@pytest.mark.parametrize("make_dm", [pairs_val_dm, images_val_dm], ids=["pairs", "images"])
def test_resume_from_any_checkpoint_sees_the_same_batches(make_dm, val_check_interval, tmp_path: Path) -> None:
    """Restarted from a checkpoint of an epoch's end under max_steps, Lightning trains one more batch in the finished
    epoch (without validation there) and then calls set_epoch one epoch ahead of ``current_epoch`` for the rest of the
    run (its progress counters stay off in the checkpoints it writes then): the loader read the next epoch's first
    batch, then started the epoch after it (samples repeated and skipped). 5 batches per epoch; the runs resumed from
    the end of epoch 0 write checkpoints too, and every one of them resumes exactly as well."""
    full = fit_all_checkpoints(make_dm, tmp_path / "full", val_check_interval=val_check_interval)
    assert len(full.images) == 12
    val_end = 5 if val_check_interval is None else 4  # validation at the epoch's end, or after its batches 2 and 4
    firsts = {"b": 5, "e": 5, "v": val_end}  # the last batch, the end, validation's end (of epoch 0)
    firsts = {kind: tmp_path / "full" / f"step={step}-{kind}.ckpt" for kind, step in firsts.items()}
    assert all(ckpt.is_file() for ckpt in firsts.values())
    state = torch.load(firsts["e"], weights_only=True)[type(make_dm()).__qualname__]
    assert (state["epoch"], state["batch"]) == (1, 0)
    checkpoints = sorted((tmp_path / "full").glob("*.ckpt"))
    for kind in "ev":  # the second generation: from the runs resumed at the end of epoch 0 and at validation's end
        fit_all_checkpoints(make_dm, tmp_path / kind, str(firsts[kind]), val_check_interval)
        checkpoints += sorted((tmp_path / kind).glob("*.ckpt"))
    for ckpt in checkpoints:
        step = torch.load(ckpt, weights_only=True)["global_step"]
        tail = fit_all_checkpoints(make_dm, ckpt_path=str(ckpt), val_check_interval=val_check_interval)
        assert len(tail.images) == 12 - step, ckpt
        assert all(torch.equal(got, want) for got, want in zip(tail.images, full.images[step:], strict=True)), ckpt
        assert tail.captions == full.captions[step:], ckpt


def test_resume_after_a_limited_epoch_starts_the_next_one(tmp_path: Path) -> None:
    """With limit_train_batches the epoch ends before the sampler's: the checkpoint must say "next epoch"."""
    make_dm = lambda: pairs_dm(2)  # noqa: E731
    full, _ = fit(make_dm, 7, limit=3)
    fit(make_dm, 3, ckpt_dir=tmp_path, limit=3)
    state = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=True)["ImageCaptionDataModule"]
    assert (state["epoch"], state["batch"]) == (1, 0)
    tail, _ = fit(make_dm, 7, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"), limit=3)
    assert tail.captions == full.captions[3:]
    # saved at the epoch's end, Lightning trains epoch 1's first batch in epoch 0: epoch 1 must stop after 2
    fit(make_dm, 3, ckpt_dir=tmp_path / "end", limit=3, every_n_train_steps=None)
    tail, _ = fit(make_dm, 7, ckpt_path=str(tmp_path / "end" / "epoch=0-step=3.ckpt"), limit=3)
    assert tail.captions == full.captions[3:]
    pairs = pairs_dm(0)
    pairs.setup()
    assert sum(full.captions[3:6], []) == [pairs.train_set.captions[i] for i in epoch_order(20, 0, 1)[:12]]


def test_same_seed_same_order_other_seed_other_order() -> None:
    def first_epoch(seed: int, global_seed: int) -> list[str]:
        torch.manual_seed(global_seed)
        dm = pairs_dm(0, seed)
        dm.setup()
        return sum((b["caption"] for b in dm.train_dataloader()), [])

    assert first_epoch(1, 0) == first_epoch(1, 99) != first_epoch(2, 0)
    sampler = ResumableSampler(list(range(10)), batch_size=3, seed=4)
    passes = [list(sampler) for _ in range(3)]  # without set_epoch, each complete pass is the next epoch
    assert passes == [epoch_order(10, 4, e).tolist() for e in range(3)] and passes[0] != passes[1]


def test_ranks_get_disjoint_shares_and_lightning_keeps_the_sampler() -> None:
    shares = [epoch_order(10, 3, 2, rank, 3).tolist() for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    assert sorted(sum(shares, [])) == sorted(list(range(10)) + epoch_order(10, 3, 2)[:2].tolist())  # 2 padded

    class FakeTrainer:
        global_rank, world_size, state = 1, 2, None

    dm = pairs_dm(0)
    dm.setup()
    dm.trainer = FakeTrainer()
    loader = dm.train_dataloader()
    assert list(loader.sampler) == epoch_order(20, 0, 0, 1, 2).tolist()
    # under DDP Lightning replaces samplers that are not DistributedSamplers (its wrapper would split again)
    assert isinstance(loader.sampler, DistributedSampler)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer._data_connector._prepare_dataloader(loader, True, RunningStage.TRAINING) is loader


def test_mid_epoch_resume_with_other_settings_is_refused() -> None:
    dm = pairs_dm(0)
    dm.setup()
    loader = dm.train_dataloader()
    state = {**loader.sampler.state_dict(), "batch": 2}
    other = ImageCaptionDataModule(synthetic=20, image_size=16, batch_size=5, val_fraction=0.0)
    other.setup()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 4 -> 5\); resume with the same ones"):
        other.train_dataloader()
    other.load_state_dict({**state, "batch": 0})  # an epoch boundary is fine
    assert other.train_dataloader().sampler.epoch == 0
    dm.load_state_dict({})  # a checkpoint from before resumable data: nothing to restore
    assert dm.state_dict()["batch"] == 0


def test_shards_warn_that_they_restart_the_epoch(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "s-0.tar")) as sink:
        for i, img in enumerate(synthetic_images(4, 8)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": f"k{i}", "png": buf.getvalue()})
    make_dm = lambda: ImageDataModule(train=str(tmp_path / "shards"), image_size=8, batch_size=2)  # noqa: E731
    fit(make_dm, 3, ckpt_dir=tmp_path / "ckpt")  # 2 batches per epoch
    states = [
        torch.load(tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt", weights_only=True)["ImageDataModule"]
        for step in (1, 2)
    ]
    assert states == [{"epoch": 0, "batch": 1}, {"epoch": 1, "batch": 0}]  # the loader's end is the epoch's
    tail, _ = fit(make_dm, 4, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert len(tail.images) == 2 and not [w for w in tail.warnings if "cannot resume" in w]
    dm = make_dm()
    with pytest.warns(UserWarning, match=r"after batch 1 of epoch 3, but shards .* cannot resume mid-epoch"):
        dm.load_state_dict({"epoch": 3, "batch": 1})
    loader = dm.train_dataloader()
    assert not hasattr(loader, "state_dict")  # Lightning warns too, rightly
    shuffles = [s for s in loader.dataset.pipeline if type(s).__name__ == "EpochShuffle"]
    assert loader.next_pass == (3, 0) and all(s.passes is loader.passes for s in shuffles)  # the interrupted epoch
    assert np.array_equal(np.sort(torch.cat(list(loader)).flatten()), np.sort(synthetic_images(4, 8).flatten()))


@pytest.mark.parametrize("make_dm", [pairs_dm, images_dm], ids=["pairs", "images"])
def test_overfit_batches_with_checkpoints_still_trains(make_dm, tmp_path: Path) -> None:
    """Lightning replaces the sampler with a SequentialSampler under overfit_batches; saving a checkpoint then asked
    it for a state_dict it does not have (AttributeError)."""
    trainer = L.Trainer(accelerator="cpu", max_steps=3, overfit_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Tiny(), datamodule=make_dm(0))
    assert trainer.global_step == 3 and list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_a_sampler_built_for_fewer_ranks_than_run_refuses_to_iterate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader built before the trainer was attached (rank 0 of 1) was kept as is under DDP (it is a
    DistributedSampler), so every rank trained on the whole data set."""
    sampler = ResumableSampler(list(range(8)), batch_size=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match=r"built for 1 rank\(s\) but 2 processes run"):
        next(iter(sampler))


def test_a_position_loaded_between_fits_is_where_the_next_fit_starts() -> None:
    """``dm.load_state_dict`` after a fit went into that fit's sampler, which the next trainer's fit replaced: the
    position was dropped without a word and the next fit started at epoch 0."""

    def run(dm: ImageDataModule, steps: int) -> list[torch.Tensor]:
        rec = Recorder()
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, callbacks=[rec], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
        trainer.fit(Tiny(), datamodule=dm)
        return rec.images

    def make() -> ImageDataModule:
        return ImageDataModule(synthetic=16, image_size=8, batch_size=4, seed=3)

    full = run(make(), 8)  # two epochs of 4 batches
    dm = make()
    run(dm, 2)
    dm.load_state_dict({**dm.state_dict(), "epoch": 1, "batch": 0})
    second = run(dm, 4)  # a new trainer: epoch 1 from its start, as loaded
    assert all(torch.equal(a, b) for a, b in zip(second, full[4:8], strict=True))


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_shards_start_a_new_trainers_fit_at_a_position_loaded_between_fits(tmp_path: Path, mode: str) -> None:
    """Shard loaders took their position from the trainer alone: a position loaded into the data module before a
    new Trainer's fit was dropped (the fit read epoch 0 again). It now shifts the new trainer's positions, and the
    shift is saved, so a checkpoint of that run, resumed by yet another Trainer, reads on from the same data."""
    (tmp_path / "shards").mkdir()
    images = synthetic_images(16, 8, seed=2)
    for s in range(4):
        with wds.TarWriter(str(tmp_path / "shards" / f"s-{s}.tar")) as sink:
            for i in range(4 * s, 4 * s + 4):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"k{i:02d}", "png": buf.getvalue()})

    def make(state: dict | None = None) -> ImageDataModule:
        dm = ImageDataModule(train=str(tmp_path / "shards"), image_size=8, batch_size=4, shuffle_buffer=8, mode=mode)
        if state is not None:
            dm.load_state_dict(state)
        return dm

    full, _ = fit(make, 12)  # epochs 0, 1 and 2, of 4 batches each
    skip = 2 if mode == "resampled" else 0  # exact shards restart an epoch from its start
    shifted, dm = fit(lambda: make({"epoch": 1, "batch": skip}), 8 - skip, ckpt_dir=tmp_path / "ckpt")
    assert len(shifted.images) == 8 - skip
    if mode == "exact":
        assert all(torch.equal(a, b) for a, b in zip(shifted.images[:4], full.images[4:8], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(shifted.images[4 - skip :], full.images[8:12], strict=True))
    assert dm.state_dict() == {"epoch": 3, "batch": 0, "shift": [1, skip]}
    (epoch_end,) = (tmp_path / "ckpt").glob(f"*-step={4 - skip}.ckpt")  # the end of data epoch 1
    assert torch.load(epoch_end, weights_only=True)["ImageDataModule"] == {"epoch": 2, "batch": 0, "shift": [1, skip]}
    tail, _ = fit(make, 8 - skip, ckpt_path=str(epoch_end))
    assert len(tail.images) == 4
    assert all(torch.equal(a, b) for a, b in zip(tail.images, full.images[8:12], strict=True))


@pytest.mark.parametrize("source", ["folder", "exact", "resampled"])
def test_validate_after_fit_keeps_the_fits_position(tmp_path: Path, source: str) -> None:
    """After ``fit`` then ``validate``, an image folder reported the epoch the fit's last pass began (its sampler,
    left before its end, had not counted it finished) and shards reported nothing: ``trainer.save_checkpoint`` then
    saved a position behind the fit's, or none (a resume read from epoch 0)."""
    if source == "folder":
        make = lambda: ImageDataModule(synthetic=16, synthetic_val=4, image_size=8, batch_size=4)  # noqa: E731
    else:
        (tmp_path / "shards").mkdir()
        for s, block in enumerate(np.split(synthetic_images(16, 8), 4)):
            with wds.TarWriter(str(tmp_path / "shards" / f"s-{s}.tar")) as sink:
                for i, img in enumerate(block):
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    sink.write({"__key__": f"k{s}{i}", "png": buf.getvalue()})
        shards = str(tmp_path / "shards")
        make = lambda: ImageDataModule(train=shards, val=shards, image_size=8, batch_size=4, mode=source)  # noqa: E731

    class Validated(Tiny):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    dm, model = make(), Validated()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    after = dm.state_dict()
    assert (after["epoch"], after["batch"]) == (2, 0)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert dm.state_dict() == after
    trainer.save_checkpoint(tmp_path / "validated.ckpt")
    assert torch.load(tmp_path / "validated.ckpt", weights_only=True)["ImageDataModule"] == after
    dm.load_state_dict({**after, "epoch": 5})  # a loaded state goes first
    assert dm.state_dict()["epoch"] == 5
