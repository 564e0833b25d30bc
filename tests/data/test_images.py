"""ImageDataModule: folders, WebDataset shards and generated images become square uint8 batches."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cm3leon_lightning.data.images import (
    ImageDataModule,
    ImageFolderDataset,
    check_even_split,
    resize_center_crop,
    shard_urls,
    synthetic_images,
)
from cm3leon_lightning.data.shards import count_tar_samples


def _striped(width: int, height: int) -> np.ndarray:
    """Each column's red channel is its x index, so crops are recognisable."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    arr[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return arr


def test_synthetic_images_are_seeded() -> None:
    a = synthetic_images(5, 16, seed=1)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_images(5, 16, seed=1))
    assert not np.array_equal(a, synthetic_images(5, 16, seed=2))
    assert len({tuple(img.reshape(-1, 3)[0]) for img in synthetic_images(50, 16)}) > 3  # several colours
    with pytest.raises(ValueError, match="size >= 4"):
        synthetic_images(1, 2)


def test_a_negative_seed_is_refused_naming_the_argument(tmp_path: Path) -> None:
    """numpy refused a negative seed deep in setup() or a worker with its bare "expected non-negative integer"."""
    with pytest.raises(ValueError, match=r"ImageDataModule: seed must be >= 0, got -1"):
        ImageDataModule(synthetic=4, image_size=8, seed=-1)
    with pytest.raises(ValueError, match=r"ImageDataModule: shuffle_buffer must be >= 0, got -1"):
        ImageDataModule(synthetic=4, image_size=8, shuffle_buffer=-1)  # silently read the shards unshuffled
    with pytest.raises(ValueError, match=r"ImageDataModule: synthetic_val must be >= 0, got -2"):
        ImageDataModule(synthetic=4, image_size=8, synthetic_val=-2)  # silently validated on nothing
    with pytest.raises(ValueError, match=r"synthetic_images needs .* seed >= 0, got n=2, size=8, seed=-3"):
        synthetic_images(2, 8, seed=-3)
    Image.fromarray(_striped(8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"ImageFolderDataset: seed must be >= 0, got -2"):
        ImageFolderDataset(tmp_path, 8, hflip=True, seed=-2)
    assert ImageDataModule(synthetic=4, image_size=8, seed=0).hparams.seed == 0


def test_center_crop_is_exact_and_resize_keeps_aspect() -> None:
    wide = Image.fromarray(_striped(20, 10))
    out = np.asarray(resize_center_crop(wide, 10))
    assert out.shape == (10, 10, 3)
    assert out[0, :, 0].tolist() == list(range(5, 15))  # the middle 10 columns, no resampling
    tall = Image.fromarray(_striped(10, 30))
    assert np.asarray(resize_center_crop(tall, 10))[:, 0, 1].tolist() == list(range(10, 20))
    big = Image.fromarray(_striped(64, 32)).convert("L")
    assert np.asarray(resize_center_crop(big, 16)).shape == (16, 16, 3)  # resized 32x16, RGB


def test_image_folder_dataset(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.fromarray(_striped(12, 12)).save(tmp_path / "a.png")
    Image.fromarray(_striped(24, 12)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 12)
    assert len(ds) == 2
    first = ds[0]
    assert first.dtype == torch.uint8 and first.shape == (3, 12, 12)
    assert torch.equal(first, torch.from_numpy(_striped(12, 12)).permute(2, 0, 1))
    assert ds[1][0, 0].tolist() == list(range(6, 18))


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 8)


def _write_shard(path: Path, images: np.ndarray) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": f"img{i:04d}", "png": buf.getvalue(), "txt": "caption"})


def test_datamodule_reads_webdataset_shards(tmp_path: Path) -> None:
    imgs = synthetic_images(10, 8, seed=4)
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "train-000000.tar", imgs[:6])
    _write_shard(tmp_path / "shards" / "train-000001.tar", imgs[6:])
    dm = ImageDataModule(train=str(tmp_path / "shards"), val=str(tmp_path / "shards"), image_size=8, batch_size=4)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    got = torch.cat(batches)
    assert got.dtype == torch.uint8 and got.shape == (10, 3, 8, 8)
    assert torch.equal(got, torch.from_numpy(imgs).permute(0, 3, 1, 2))  # PNG is lossless; val keeps order
    train = torch.cat(list(dm.train_dataloader()))
    assert train.shape == (10, 3, 8, 8)
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    dm2 = ImageDataModule(train=pattern, image_size=8, batch_size=5)
    assert sum(b.shape[0] for b in dm2.train_dataloader()) == 10


def test_datamodule_synthetic_and_errors(tmp_path: Path) -> None:
    dm = ImageDataModule(synthetic=10, synthetic_val=3, image_size=16, batch_size=4)
    dm.setup("fit")
    assert [b.shape for b in dm.train_dataloader()] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    assert sum(b.shape[0] for b in dm.val_dataloader()) == 3
    assert ImageDataModule(synthetic=4, image_size=8).val_dataloader() == []
    with pytest.raises(ValueError, match="train= .* or synthetic="):
        ImageDataModule()
    with pytest.raises(ValueError, match="allow_pipe=True"):
        shard_urls("pipe:curl -s http://x/shard.tar")
    assert shard_urls("pipe:cat a.tar", allow_pipe=True) == "pipe:cat a.tar"
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        shard_urls(str(tmp_path / "d"))


def test_images_convert_to_rgb_as_prepare_converts_them(tmp_path: Path) -> None:
    """Folders and shards convert images as ``cm3leon prepare`` does (``data.cleaning.to_rgb``): a transparent pixel
    is white, not its hidden colour, and 16-bit grey is scaled, not clipped to white; so the VQGAN trains on the
    pixels it will later encode."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 10  # hidden colour (10, 0, 0) under full transparency
    rgba[:4, :, 3] = 255  # top half opaque
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 16-bit, max 63000
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "b.png")
    folder = ImageFolderDataset(tmp_path, 8)
    transparent, deep = folder[0], folder[1]
    assert transparent[:, :4].unique().tolist() == [0, 10] and transparent[:, 4:].unique().tolist() == [255]
    expected_grey = np.round(grey.astype(np.float64) / 257).astype(np.uint8)  # as viewers show it
    assert torch.equal(deep[0], torch.from_numpy(expected_grey)) and torch.equal(deep[0], deep[2])
    shard = tmp_path / "shards"
    shard.mkdir()
    with wds.TarWriter(str(shard / "s-0.tar")) as w:
        for key in ("a", "b"):
            w.write({"__key__": key, "png": (tmp_path / f"{key}.png").read_bytes()})
    data = ImageDataModule(train=str(shard), image_size=8, batch_size=2, num_workers=0, shuffle_buffer=0)
    batches = list(data.train_dataloader())
    assert torch.equal(batches[0][0], transparent) and torch.equal(batches[0][1], deep)


def test_16_bit_grey_is_scaled_as_viewers_show_it_not_stretched_to_its_maximum() -> None:
    """16-bit grey was divided by each image's own maximum: a uniform 40000 (a mid grey, 156 in a viewer) became
    white and a dark scan full-range; now v / 257 everywhere, and 32-bit "I" images holding 8-bit values keep them."""
    from cm3leon_lightning.data.cleaning import to_rgb

    flat = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    assert flat.mode == "I;16" and np.unique(np.asarray(to_rgb(flat))).tolist() == [156]
    dark = Image.fromarray(np.array([[0, 514], [1028, 2570]], np.uint16))
    assert np.asarray(to_rgb(dark))[..., 0].tolist() == [[0, 2], [4, 10]]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[7, 200]], np.int32), "I")))[..., 1].tolist() == [[7, 200]]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[257, 65535]], np.int32), "I")))[..., 2].tolist() == [[1, 255]]


def test_a_png_transparent_colour_is_white_in_rgb_grey_and_16_bit_grey(tmp_path: Path) -> None:
    """A PNG ``tRNS`` chunk (one transparent colour; optipng turns binary-alpha RGBA into RGB + tRNS) was ignored
    outside palette images: the transparent background kept its hidden colour (black here) in training, preparation
    and evaluation alike, and ``cm3leon prepare`` did not count the repair."""
    from cm3leon_lightning.data.cleaning import load_image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:6, 2:6] = (200, 0, 0)  # an opaque red square on a transparent black background
    grey = np.where(rgb[..., 0] > 0, 100, 0).astype(np.uint8)
    deep = np.where(rgb[..., 0] > 0, 25700, 0).astype(np.uint16)  # 100 as viewers show it (v / 257)
    deep[2, 2] = 65535
    for name, arr in (("a", rgb), ("b", grey), ("c", deep)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png", transparency=(0, 0, 0) if arr.ndim == 3 else 0)
    assert [Image.open(tmp_path / f"{n}.png").mode for n in "abc"] == ["RGB", "L", "I;16"]
    a, b, c = ImageFolderDataset(tmp_path, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    assert (a[:, ~inside] == 255).all() and a[:, inside].T.unique(dim=0).tolist() == [[200, 0, 0]]
    assert (b[:, ~inside] == 255).all() and (b[:, inside] == 100).all()
    assert (c[:, ~inside] == 255).all() and c[0, 2, 2] == 255 and c[0, 3, 3] == 100  # v / 257
    image, repairs = load_image(tmp_path / "a.png", min_size=8)
    assert repairs == ["repaired_image_mode"] and np.array_equal(np.asarray(image), a.permute(1, 2, 0).numpy())
    assert load_image(Image.fromarray(rgb), min_size=8)[1] == []  # plain RGB: nothing to repair


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_shards_are_read_once_per_epoch_by_several_workers(tmp_path: Path, workers: int) -> None:
    """Each worker shuffled the shard list with its own unseeded RNG before taking its share: with 2 workers some
    shards were read twice in an epoch and others never. The shard order is now seeded by (seed, epoch)."""
    imgs = np.zeros((16, 8, 8, 3), np.uint8)
    imgs[:, 0, 0, 0] = np.arange(16)  # pixel (0, 0) names the image
    for s in range(8):
        _write_shard(tmp_path / f"s-{s:02d}.tar", imgs[2 * s : 2 * s + 2])
    orders = []
    for seed in (0, 0, 1):
        dm = ImageDataModule(train=str(tmp_path), image_size=8, batch_size=2, num_workers=workers, seed=seed,
                             shuffle_buffer=4)  # fmt: skip
        loader = dm.train_dataloader()
        epochs = [torch.cat(list(loader))[:, 0, 0, 0].tolist() for _ in range(2)]  # persistent workers go on
        assert [sorted(e) for e in epochs] == [list(range(16))] * 2 and epochs[0] != epochs[1]
        orders.append(epochs)
    assert orders[0] == orders[1] != orders[2]  # seeded: the same seed, the same order


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_order_follows_the_epoch_when_loaders_are_rebuilt_every_epoch(tmp_path: Path, workers: int) -> None:
    """With reload_dataloaders_every_n_epochs each new loader first restarted the shuffles at the saved epoch (0):
    every epoch after the first read the same order. Then Lightning's two starts of a reloaded loader moved the
    shuffles' own pass count one on: epoch k read epoch k + 1's order. Every epoch now reads its own order, the
    same as without reloading."""
    import lightning as L

    imgs = np.zeros((16, 8, 8, 3), np.uint8)
    imgs[:, 0, 0, 0] = np.arange(16)
    for s in range(8):
        _write_shard(tmp_path / f"s-{s:02d}.tar", imgs[2 * s : 2 * s + 2])

    class Record(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[int]] = []

        def on_train_epoch_start(self) -> None:
            self.seen.append([])

        def training_step(self, batch, batch_idx):
            self.seen[-1].extend(batch[:, 0, 0, 0].tolist())
            return (self.w - batch.float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(reload: int) -> list[list[int]]:
        model = Record()
        dm = ImageDataModule(train=str(tmp_path), image_size=8, batch_size=4, shuffle_buffer=4, num_workers=workers)
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, reload_dataloaders_every_n_epochs=reload, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(model, datamodule=dm)
        assert dm.state_dict() == {"epoch": 3, "batch": 0}
        return model.seen

    reloaded = fit(1)
    assert [sorted(e) for e in reloaded] == [list(range(16))] * 3
    assert len({tuple(e) for e in reloaded}) == 3  # three epochs, three orders
    assert reloaded == fit(0)


def test_an_image_that_does_not_decode_is_named_with_its_file_or_shard(tmp_path: Path) -> None:
    """A truncated file raised ``OSError: image file is truncated`` and a broken shard member an empty
    ``DecodingError``: neither said which of thousands of images it was."""
    (tmp_path / "folder").mkdir()
    Image.fromarray(_striped(16, 16)).save(tmp_path / "folder" / "a.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "folder" / "b.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    folder = ImageFolderDataset(tmp_path / "folder", 8)
    assert folder[0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"cannot decode image .*folder/b\.jpg: OSError: image file is truncated"):
        folder[1]
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "s-0.tar")) as sink:
        sink.write({"__key__": "fine", "png": (tmp_path / "folder" / "a.png").read_bytes()})
        sink.write({"__key__": "cut", "jpg": (tmp_path / "folder" / "b.jpg").read_bytes()})
    dm = ImageDataModule(train=str(tmp_path / "shards"), image_size=8, batch_size=1, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"cannot decode image 'cut' \(jpg\) in shard .*shards/s-0\.tar: OSError"):
        list(dm.train_dataloader())


def test_webp_shards_that_prepare_reads_train_the_vqgan_too(tmp_path: Path) -> None:
    """``cm3leon prepare`` reads ``webp`` members (img2dataset's ``--encode_format webp``), but the VQGAN's data module
    refused the same shards: "sample 'k0' ... has no jpg/jpeg/png member"."""
    from cm3leon_lightning.data.resampled_images import ResampledImageShards
    from cm3leon_lightning.data.sources import WDS_IMAGE_MEMBERS

    imgs = synthetic_images(4, 8, seed=6)
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "s-0.tar")) as sink:
        for i, img in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="WEBP", lossless=True)
            sink.write({"__key__": f"k{i}", "webp": buf.getvalue(), "txt": "caption"})
    dm = ImageDataModule(train=str(tmp_path / "shards"), image_size=8, batch_size=2, shuffle_buffer=0)
    got = torch.cat(list(dm.train_dataloader()))
    assert torch.equal(got, torch.from_numpy(imgs).permute(0, 3, 1, 2))  # lossless: the exact pixels, in order
    resampled = ResampledImageShards([str(tmp_path / "shards" / "s-0.tar")], 8, 2, 1)
    assert next(iter(resampled)).shape == (2, 3, 8, 8)
    assert WDS_IMAGE_MEMBERS == ("jpg", "jpeg", "png", "webp")  # what both read, in the order they pick a member
    with wds.TarWriter(str(tmp_path / "shards" / "s-1.tar")) as sink:
        sink.write({"__key__": "gif", "gif": b"GIF89a", "txt": "caption"})
    bare = ImageDataModule(train=str(tmp_path / "shards" / "s-1.tar"), image_size=8, batch_size=1, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"sample 'gif' from .*s-1\.tar' has no jpg/jpeg/png/webp member"):
        list(bare.train_dataloader())


class TwoRankTrainer:
    """What the data module reads from a trainer on rank 0 of 2."""

    global_rank, world_size = 0, 2
    state = type("State", (), {"fn": None})()


def test_shards_that_ranks_would_read_in_unequal_batches_are_refused_under_ddp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WebDataset deals whole shards to ranks: with 5 shards of 4 images and batches of 4, rank 0 read 3 batches and
    rank 1 read 2, so rank 0's third backward waited for an all-reduce that never came (DDP hung)."""
    imgs = np.zeros((20, 8, 8, 3), np.uint8)
    imgs[:, 0, 0, 0] = np.arange(20)  # pixel (0, 0) names the image
    (tmp_path / "five").mkdir()
    for s in range(5):
        _write_shard(tmp_path / "five" / f"s-{s}.tar", imgs[4 * s : 4 * s + 4])
    (tmp_path / "uneven").mkdir()
    for s, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12), (12, 14)]):
        _write_shard(tmp_path / "uneven" / f"s-{s}.tar", imgs[lo:hi])
    (tmp_path / "even").mkdir()
    for s in range(4):
        _write_shard(tmp_path / "even" / f"s-{s}.tar", imgs[4 * s : 4 * s + 4])
    assert count_tar_samples(tmp_path / "uneven" / "s-3.tar") == 2  # one png and one txt member per image

    def dm(train: str, val: str | None = None, workers: int = 0) -> ImageDataModule:
        data = ImageDataModule(train=train, val=val, image_size=8, batch_size=4, num_workers=workers)
        data.trainer = TwoRankTrainer()
        return data

    with pytest.raises(ValueError, match=r"train: 5 shards cannot be dealt evenly to 2 ranks x 1 workers = 2 readers"):
        dm(str(tmp_path / "five")).train_dataloader()
    with pytest.raises(ValueError, match=r"train: 4 shards cannot be dealt evenly to 2 ranks x 3 workers = 6"):
        dm(str(tmp_path / "even"), workers=3).train_dataloader()
    with pytest.raises(ValueError, match=r"train: the shards hold different numbers of images \(.*s-3.tar: 2, .*: 4\)"):
        dm(str(tmp_path / "uneven")).train_dataloader()
    assert len(dm(str(tmp_path / "five")).val_dataloader()) == 0  # no val data: nothing to check
    batches, seen = [], []
    for rank in range(2):  # equal shards: every rank the same number of batches, every image once
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got = list(dm(str(tmp_path / "even") + "/s-{0..3}.tar", workers=2).train_dataloader())
        batches.append(len(got))
        seen += [int(x[0, 0, 0]) for b in got for x in b]
    assert batches == [2, 2] and sorted(seen) == list(range(16))


def test_validation_shards_need_only_one_non_empty_shard_per_rank_under_ddp(tmp_path: Path) -> None:
    """Uneven validation shards were refused like training ones, but validation steps wait for no other rank: two
    img2dataset-like shards of 8 and 3 images ran 4 and 2 batches per rank under two-process DDP and finished. A rank
    without any batch does hang (it skips the first forward's buffer broadcast and the epoch's synchronised logs)."""
    imgs = synthetic_images(11, 8, seed=3)
    for name, parts in (("uneven", [(0, 8), (8, 11)]), ("one", [(0, 8)]), ("hollow", [(0, 8), (8, 8), (8, 11)])):
        (tmp_path / name).mkdir()
        for s, (lo, hi) in enumerate(parts):
            _write_shard(tmp_path / name / f"v-{s}.tar", imgs[lo:hi])

    def dm(val: str) -> ImageDataModule:
        data = ImageDataModule(synthetic=8, val=val, image_size=8, batch_size=2)
        data.trainer = TwoRankTrainer()
        return data

    dm(str(tmp_path / "uneven")).val_dataloader()  # accepted
    with pytest.raises(ValueError, match=r"val: 1 shard\(s\) for 2 ranks: a rank would read no batch"):
        dm(str(tmp_path / "one")).val_dataloader()
    # ranks take shards 0, 2 and 1: rank 1's only shard is empty
    with pytest.raises(ValueError, match=r"val: rank 1 would read only empty shards \(.*v-1.tar\.\.\.\)"):
        dm(str(tmp_path / "hollow")).val_dataloader()


def test_the_ddp_shard_check_reads_shards_as_webdataset_does(tmp_path: Path) -> None:
    """Gzip-compressed shards, which WebDataset reads, failed the check with tarfile's bare 'invalid header', and
    ``a.tar::b.tar`` (WebDataset's list of patterns) was counted as one shard, so two equal shards were refused."""
    imgs = synthetic_images(8, 8, seed=5)
    for s in range(2):
        _write_shard(tmp_path / f"s-{s}.tar", imgs[4 * s : 4 * s + 4])
        with open(tmp_path / f"s-{s}.tar", "rb") as f, gzip.open(tmp_path / f"s-{s}.tar.gz", "wb") as g:
            g.write(f.read())
    assert count_tar_samples(tmp_path / "s-1.tar.gz") == 4
    check_even_split(str(tmp_path / "s-{0..1}.tar.gz"), 2, 0, "train")
    check_even_split(f"{tmp_path}/s-0.tar::{tmp_path}/s-1.tar", 2, 0, "train")
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"bad\.tar: not a readable tar"):
        check_even_split([str(tmp_path / "s-0.tar"), str(tmp_path / "bad.tar")], 2, 0, "train")


def _cut_before_member(path: Path, member: int, out: Path) -> None:
    """Copy ``path`` to ``out`` cut exactly before the header of member ``member`` (a tar block boundary)."""
    import tarfile

    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member].offset
    out.write_bytes(path.read_bytes()[:offset])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_cut_exactly_between_two_members_is_refused_naming_it(tmp_path: Path, workers: int) -> None:
    """tarfile (and so WebDataset) ends a tar cut at a member boundary without a word: the shard was read as a
    shorter whole one (2 of its 3 images), and the DDP check counted 2 images."""
    imgs = synthetic_images(3, 8, seed=6)
    _write_shard(tmp_path / "whole.tar", imgs)
    (tmp_path / "sh").mkdir()
    _cut_before_member(tmp_path / "whole.tar", 4, tmp_path / "sh" / "cut.tar")  # png + txt per image: 2 images kept
    dm = ImageDataModule(train=str(tmp_path / "sh"), val=str(tmp_path / "sh"), image_size=8, batch_size=1,
                         num_workers=workers)  # fmt: skip
    cut = r"shard .*sh/cut\.tar: unreadable tar after sample 'img0001' \(no end-of-archive marker at byte \d+: cut off"
    with pytest.raises(ValueError, match=cut):
        list(dm.train_dataloader())
    with pytest.raises(ValueError, match=cut):
        list(dm.val_dataloader())
    with pytest.raises(ValueError, match=r"sh/cut\.tar: not a readable tar \(no end-of-archive marker .*: cut off\)"):
        count_tar_samples(tmp_path / "sh" / "cut.tar")
    assert count_tar_samples(tmp_path / "whole.tar") == 3


def test_gzipped_shards_are_read_as_webdataset_reads_them(tmp_path: Path) -> None:
    """The checked tar reader decompresses a gzipped shard as WebDataset's tarfile "r|*" did; cut, it is named."""
    imgs = synthetic_images(3, 8, seed=7)
    _write_shard(tmp_path / "s.tar", imgs)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(data))
    dm = ImageDataModule(train=str(tmp_path / "s.tar"), val=str(tmp_path / "s.tar.gz"), image_size=8, batch_size=3)
    assert torch.equal(next(iter(dm.val_dataloader())), torch.from_numpy(imgs).permute(0, 3, 1, 2))
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(data)[:-100])
    dm = ImageDataModule(train=str(tmp_path / "s.tar"), val=str(tmp_path / "cut.tar.gz"), image_size=8, batch_size=3)
    with pytest.raises(ValueError, match=r"shard .*cut\.tar\.gz: unreadable tar"):
        list(dm.val_dataloader())
