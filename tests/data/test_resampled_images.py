"""ImageDataModule(mode="resampled"): shards of any sizes give every rank the same number of batches per epoch,
seeded by (seed, epoch, rank, worker), and a resumed run reads its epoch's remaining batches."""

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
from support.ddp_scripts import run_ddp_script

from cm3leon_lightning.data.images import ImageDataModule
from cm3leon_lightning.data.resampled_images import ResampledImageShards, drawn_samples, worker_share


def write_shards(folder: Path, sizes: list[int], size: int = 8) -> None:
    """Shards ``s-<i>.tar`` of ``sizes`` png images; pixel (0, 0)'s red value numbers the image (0, 1, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for s, count in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{s}.tar")) as sink:
            for _ in range(count):
                img = np.zeros((size, size, 3), np.uint8)
                img[0, 0, 0], img[0, -1, 1] = n, 255  # the green marker shows flips
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                sink.write({"__key__": f"i{n:04d}", "png": buf.getvalue()})
                n += 1


class RankTrainer:
    """What the data module reads from a trainer outside ``fit`` on ``rank`` of ``world``."""

    state = type("State", (), {"fn": None})()

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def ids(batches: list[torch.Tensor]) -> list[list[int]]:
    """The image numbers of each batch."""
    return [b[:, 0, 0, 0].tolist() for b in batches]


def data(train: Path, rank: int = 0, world: int = 1, **kwargs) -> ImageDataModule:  # noqa: ANN003
    dm = ImageDataModule(train=str(train), image_size=8, batch_size=2, mode="resampled", shuffle_buffer=4, **kwargs)
    dm.trainer = RankTrainer(rank, world)
    return dm


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_reads_the_same_number_of_seeded_batches_from_uneven_shards(tmp_path: Path, workers: int) -> None:
    """img2dataset-like shards of 8, 3 and 0 images: exact reading deals them whole (rank 0 would read 4 batches,
    rank 1 two: DDP hangs); resampled, each rank reads ceil(11 / (2 ranks x 2)) = 3 batches in every epoch."""
    write_shards(tmp_path / "sh", [8, 3, 0])
    epochs = {}
    for rank in range(2):
        loader = data(tmp_path / "sh", rank, 2, num_workers=workers).train_dataloader()
        assert len(loader) == 3
        epochs[rank] = [ids(list(loader)) for _ in range(3)]
        assert [len(e) for e in epochs[rank]] == [3, 3, 3]
        assert all(len(b) == 2 for e in epochs[rank] for b in e)
        assert len({str(e) for e in epochs[rank]}) == 3  # each epoch its own draw
        again = data(tmp_path / "sh", rank, 2, num_workers=workers).train_dataloader()
        assert [ids(list(again)) for _ in range(3)] == epochs[rank]  # seeded
    assert epochs[0] != epochs[1]
    seen = {i for rank in epochs.values() for e in rank for b in e for i in b}
    assert seen <= set(range(11)) and len(seen) > 5
    other_seed = data(tmp_path / "sh", 0, 2, num_workers=workers, seed=1).train_dataloader()
    assert ids(list(other_seed)) != epochs[0][0]


def test_epoch_batches_sets_the_epoch_and_workers_share_it(tmp_path: Path) -> None:
    write_shards(tmp_path / "sh", [5])
    for workers in (0, 3):
        loader = data(tmp_path / "sh", epoch_batches=7, num_workers=workers).train_dataloader()
        assert len(loader) == 7 and len(list(loader)) == 7
    assert [worker_share(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert [worker_share(2, w, 3) for w in range(3)] == [1, 1, 0]


def test_flips_are_drawn_from_the_seeded_stream(tmp_path: Path) -> None:
    write_shards(tmp_path / "sh", [6])
    flips = []
    for _ in range(2):
        batches = list(data(tmp_path / "sh", hflip=True, epoch_batches=8).train_dataloader())
        flips.append([int(x[1, 0, 0] == 255) for b in batches for x in b])  # the marker moved to the left
    assert flips[0] == flips[1] and 0 < sum(flips[0]) < 16


def test_a_restored_mid_epoch_position_reads_the_epochs_remaining_batches_drawn_afresh(tmp_path: Path) -> None:
    write_shards(tmp_path / "sh", [8, 3])
    full = data(tmp_path / "sh").train_dataloader()  # one rank: ceil(11 images / 2) = 6 batches per epoch
    assert len(full) == 6
    epochs = [ids(list(full)) for _ in range(3)]
    resumed = data(tmp_path / "sh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact shards warn that they restart the epoch; resampled ones do not
        resumed.load_state_dict({"epoch": 1, "batch": 4})
    loader = resumed.train_dataloader()
    first, second = ids(list(loader)), ids(list(loader))
    assert len(first) == 2 and first != epochs[1][4:]  # the remaining 2 batches, new draws
    assert second == epochs[2]  # the next epoch as in the uninterrupted run
    assert resumed.state_dict() == {"epoch": 1, "batch": 4}  # outside fit: the restored position


class Count(L.LightningModule):
    """One weight; records each training batch's image numbers per epoch (``per_epoch``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.per_epoch: dict[int, list[list[int]]] = {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.per_epoch.setdefault(self.current_epoch, []).append(batch[:, 0, 0, 0].tolist())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_fit_resumed_mid_epoch_finishes_the_epoch_with_its_remaining_batches(tmp_path: Path) -> None:
    write_shards(tmp_path / "sh", [8, 3])  # 6 batches of 2 per epoch

    def fit(max_steps: int, ckpt_path: str | None = None) -> Count:
        model = Count()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=1, save_top_k=-1)],
        )  # fmt: skip
        dm = ImageDataModule(train=str(tmp_path / "sh"), image_size=8, batch_size=2, mode="resampled")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    whole = fit(12)
    assert {e: len(b) for e, b in whole.per_epoch.items()} == {0: 6, 1: 6}
    saved = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)["ImageDataModule"]
    assert saved == {"epoch": 0, "batch": 4}
    tail = fit(12, str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert {e: len(b) for e, b in tail.per_epoch.items()} == {0: 2, 1: 6}  # the epoch's 2 remaining, then a whole
    assert tail.per_epoch[1] == whole.per_epoch[1]


@pytest.mark.parametrize(("workers", "limit"), [(0, 4), (2, 0.7)])
def test_a_position_loaded_into_a_new_trainer_ends_the_epoch_at_limit_train_batches(
    tmp_path: Path, workers: int, limit: int | float
) -> None:
    """Under ``limit_train_batches`` (4 of 6 batches, or 0.7 x 6 -> 4), a mid-epoch position loaded into a new
    Trainer (``dm.load_state_dict``, no ``ckpt_path``) read 4 batches in that epoch, not the 3 left: the new
    trainer counts from 0 and Lightning starts the pass before it counts the epoch's batches. It now reads exactly
    what the run resumed with ``ckpt_path`` reads, and the next epoch as the uninterrupted run."""
    write_shards(tmp_path / "sh", [8, 3])  # 6 batches of 2 per epoch

    def fit(state: dict | None = None, ckpt_path: str | None = None, ckpt_dir: Path | None = None) -> Count:
        model = Count()
        callbacks = [ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=1, save_top_k=-1)] if ckpt_dir else []
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=2, limit_train_batches=limit, logger=False, callbacks=callbacks,
            enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )  # fmt: skip
        dm = ImageDataModule(train=str(tmp_path / "sh"), image_size=8, batch_size=2, mode="resampled",
                             num_workers=workers)  # fmt: skip
        if state is not None:
            dm.load_state_dict(state)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    whole = fit(ckpt_dir=tmp_path / "ckpt")
    assert {e: len(b) for e, b in whole.per_epoch.items()} == {0: 4, 1: 4}
    saved = torch.load(tmp_path / "ckpt" / "step=1.ckpt", weights_only=True)["ImageDataModule"]
    assert saved == {"epoch": 0, "batch": 1}
    resumed = fit(ckpt_path=str(tmp_path / "ckpt" / "step=1.ckpt"))
    loaded = fit(state=saved)
    assert {e: len(b) for e, b in loaded.per_epoch.items()} == {0: 3, 1: 4}
    assert loaded.per_epoch == resumed.per_epoch  # the same batches, epoch 0's remaining 3 drawn afresh
    assert loaded.per_epoch[1] == whole.per_epoch[1]


def test_bad_settings_are_refused_naming_the_argument(tmp_path: Path) -> None:
    write_shards(tmp_path / "sh", [2])
    write_shards(tmp_path / "hollow", [0, 0])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"mode='resampled' draws WebDataset shards, but train=.*folder"):
        ImageDataModule(train=str(tmp_path / "folder"), mode="resampled")
    with pytest.raises(ValueError, match="mode must be 'exact' or 'resampled', got 'resample'"):
        ImageDataModule(train=str(tmp_path / "sh"), mode="resample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"epoch_batches \(got 3\) .* for mode='resampled' only"):
        ImageDataModule(train=str(tmp_path / "sh"), epoch_batches=3)
    with pytest.raises(ValueError, match=r"epoch_batches \(got 0\) must be >= 1"):
        ImageDataModule(train=str(tmp_path / "sh"), mode="resampled", epoch_batches=0)
    remote = ImageDataModule(train="https://example.com/s-{0..3}.tar", mode="resampled")
    with pytest.raises(ValueError, match=r"epoch_batches: cannot count .*https://example.com/s-0.tar.*pass epoch_b"):
        remote.train_dataloader()
    with pytest.raises(ValueError, match=r"the training shards \(.*hollow/s-0.tar\.\.\.\) hold no samples"):
        data(tmp_path / "hollow").train_dataloader()
    with pytest.raises(ValueError, match=r"all 2 shards were drawn and held no sample \(the last: .*hollow/s-"):
        list(data(tmp_path / "hollow", epoch_batches=1).train_dataloader())
    with pytest.raises(ValueError, match="needs at least one shard URL"):
        ResampledImageShards([], 8, 2, 1)
    with pytest.raises(ValueError, match=r"ResampledImageShards: seed and rank must be >= 0, got seed=-1, rank=0"):
        ResampledImageShards([str(tmp_path / "sh" / "s-0.tar")], 8, 2, 1, seed=-1)
    assert next(drawn_samples([str(tmp_path / "sh" / "s-0.tar")], np.random.default_rng(0)))["__key__"] == "i0000"


def test_empty_shards_among_others_are_read_past_however_many(tmp_path: Path) -> None:
    """19 empty shards and one of 3 images: long runs of empty draws are normal, not a sign that all are empty (a
    limit of 2 x shards + 10 empty draws in a row raised for every seed)."""
    write_shards(tmp_path / "sh", [0] * 19 + [3])
    urls = sorted(str(p) for p in (tmp_path / "sh").glob("*.tar"))
    for seed in range(5):
        stream = drawn_samples(urls, np.random.default_rng(seed))
        keys = [next(stream)["__key__"] for _ in range(300)]
        assert sorted(set(keys)) == ["i0000", "i0001", "i0002"] and len(keys) == 300


def test_two_process_ddp_trains_on_uneven_shards_without_hanging(tmp_path: Path) -> None:
    """Real two-process DDP (gloo) on shards of 8 and 3 images, which exact mode refuses (ranks would read 4 and 2
    batches and hang): resampled, every rank trains 3 batches per epoch for two epochs and the fit finishes."""
    write_shards(tmp_path / "sh", [8, 3])
    result = run_ddp_script("ddp_resampled_images_run.py", tmp_path, timeout=300)
    assert result == {"rank0": [3, 3], "rank1": [3, 3], "differ": True}


@pytest.mark.parametrize("workers", [0, 2])
def test_reloaded_loaders_and_a_checkpoint_after_fit_keep_the_epochs_draws(tmp_path: Path, workers: int) -> None:
    """The next epoch's loader (``reload_dataloaders_every_n_epochs``) is built before Lightning clears the finished
    epoch's batch counts: it started at epoch + 1, so every epoch after the first read the next one's draw, and a
    checkpoint saved after ``fit`` recorded an epoch that was never trained (a resumed run skipped one). Lightning
    also starts a reloaded loader twice: workers counting their own passes ran one epoch ahead."""
    write_shards(tmp_path / "sh", [8, 3])  # 6 batches of 2 per epoch

    def fit(epochs: int, reload: int = 0) -> tuple[Count, ImageDataModule]:
        model = Count()
        dm = ImageDataModule(train=str(tmp_path / "sh"), image_size=8, batch_size=2, mode="resampled",
                             num_workers=workers)  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, reload_dataloaders_every_n_epochs=reload,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(model, datamodule=dm)
        return model, dm

    once, dm = fit(3)
    assert dm.state_dict() == {"epoch": 3, "batch": 0}  # after fit: the next epoch to train
    reloaded, _ = fit(3, reload=1)
    assert reloaded.per_epoch == once.per_epoch
    two, dm = fit(2)
    assert dm.state_dict() == {"epoch": 2, "batch": 0}
    assert two.per_epoch == {e: once.per_epoch[e] for e in (0, 1)}


def test_an_image_that_does_not_decode_is_named_with_its_shard(tmp_path: Path) -> None:
    """WebDataset raised a DecodingError with an empty message: nothing said which shard or image was broken."""
    write_shards(tmp_path / "sh", [2])
    with wds.TarWriter(str(tmp_path / "sh" / "s-1.tar")) as sink:
        sink.write({"__key__": "broken", "png": b"not an image"})
    loader = data(tmp_path / "sh", epoch_batches=4).train_dataloader()
    with pytest.raises(ValueError, match=r"cannot decode image 'broken' \(png\) in shard .*sh/s-1\.tar: Unidentified"):
        list(loader)


def test_a_shard_cut_exactly_between_two_members_is_refused_naming_it(tmp_path: Path) -> None:
    """Drawn, a tar cut at a member boundary was read as a shorter whole one without a word, and counted short for
    the default epoch length."""
    import tarfile

    write_shards(tmp_path / "sh", [3])
    shard = tmp_path / "sh" / "s-0.tar"
    with tarfile.open(shard) as tf:
        offset = tf.getmembers()[2].offset  # one png member per image: the first two images kept
    shard.write_bytes(shard.read_bytes()[:offset])
    with pytest.raises(ValueError, match=r"sh/s-0\.tar: not a readable tar \(no end-of-archive marker .*: cut off\)"):
        data(tmp_path / "sh").train_dataloader()
    stream = drawn_samples([str(shard)], np.random.default_rng(0))
    assert next(stream)["__key__"] == "i0000"  # not i0001: the last sample read may have lost members to the cut
    with pytest.raises(ValueError, match=r"shard .*sh/s-0\.tar: unreadable tar after sample 'i0001' \(.*cut off\)"):
        next(stream)
    with pytest.raises(ValueError, match=r"shard .*sh/s-0\.tar: unreadable tar after sample 'i0001' \(.*cut off\)"):
        list(data(tmp_path / "sh", epoch_batches=2).train_dataloader())
