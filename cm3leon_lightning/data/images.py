"""Images for training the VQGAN tokenizer: an image folder, jpg/png/webp WebDataset shards, or generated blocks.

Every image is resized so its shorter side is ``image_size`` (bicubic) and centre-cropped to a square, then given to
the model as a uint8 tensor ``(3, image_size, image_size)``; batches are ``(B, 3, S, S)`` uint8 (the VQGAN maps them
to ``[-1, 1]``). WebDataset stages are small module-level functions so worker processes can pickle them.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from cm3leon_lightning.data.cleaning import to_rgb
from cm3leon_lightning.data.image_shards import (  # noqa: F401 (re-exported: the names' old home)
    EpochShuffle,
    _is_shards,
    check_even_split,
    expand_shard_urls,
    shard_urls,
    tar_samples,
)
from cm3leon_lightning.data.positioned import FitPosition, PositionedLoader
from cm3leon_lightning.data.sampling import ResumableTrainData, trainer_position
from cm3leon_lightning.data.sources import WDS_IMAGE_MEMBERS

if TYPE_CHECKING:
    from cm3leon_lightning.data.resampled_images import ResampledLoader

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [255, 255, 255],
     [0, 0, 0]],
    dtype=np.uint8,
)  # fmt: skip


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Seeded images of coloured rectangles on a plain background, for tests and the demo.

    Args:
        n: number of images.
        size: side length in pixels (>= 4).
        seed: random seed (>= 0); the same arguments give the same images.

    Returns:
        uint8 array ``(n, size, size, 3)``.
    """
    if n < 0 or size < 4 or seed < 0:
        raise ValueError(f"synthetic_images needs n >= 0, size >= 4 and seed >= 0, got n={n}, size={size}, seed={seed}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = _PALETTE[rng.integers(len(_PALETTE))]
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(size // 4, size // 2 + 1, size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            out[i, y : y + h, x : x + w] = _PALETTE[rng.integers(len(_PALETTE))]
    return out


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then crop the centre ``size x size`` square (RGB, converted
    as ``cm3leon prepare`` converts images: transparent pixels white, 16-bit grey scaled)."""
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, size: int, hflip: bool = False) -> torch.Tensor:
    """A PIL image -> uint8 tensor ``(3, size, size)`` after :func:`resize_center_crop` (and a flip if asked)."""
    arr = np.array(resize_center_crop(image, size), dtype=np.uint8)  # (S, S, 3), writable copy
    if hflip:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


class ImageFolderDataset(Dataset):
    """Map-style dataset over an image folder (or in-memory uint8 arrays), yielding ``(3, S, S)`` uint8 tensors.

    Args:
        source: a folder of images, or a uint8 array ``(N, H, W, 3)``.
        image_size: output side length.
        hflip: flip horizontally with probability 1/2, seeded by ``(seed, epoch, index)`` when the item is asked for
            as ``dataset[(epoch, index)]`` (the training sampler's ``with_epoch``: a new draw every epoch), else by
            ``(seed, index)`` (the same every time).
        seed: seed for the flips.
    """

    def __init__(self, source: str | Path | np.ndarray, image_size: int, hflip: bool = False, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"ImageFolderDataset: seed must be >= 0, got {seed}")
        self.items = source if isinstance(source, np.ndarray) else list_images(source)
        self.image_size, self.hflip, self.seed = image_size, hflip, seed

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> torch.Tensor:
        """The ``index``-th image as a uint8 tensor ``(3, S, S)``; for ``(epoch, index)``, flipped as drawn for
        ``epoch``. A file that does not decode (truncated, not an image) raises ValueError naming it."""
        key = (self.seed, *index) if isinstance(index, tuple) else (self.seed, index)
        index = key[-1]
        item = self.items[index]
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        else:
            try:
                with Image.open(item) as f:
                    f.load()
                    image = to_rgb(f).copy()  # a copy: ``f`` itself when it is RGB already
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot decode image {item}: {type(e).__name__}: {e}") from e
        flip = self.hflip and bool(np.random.default_rng(key).integers(2))
        return to_tensor(image, self.image_size, flip)


def decode_image(key: str, data: bytes) -> Image.Image | None:
    """WebDataset decoder: a ``jpg``/``jpeg``/``png``/``webp`` member (those ``cm3leon prepare`` reads) as an RGB PIL
    image converted as ``cm3leon prepare`` converts images (webdataset's ``"pil"`` makes transparent pixels their
    hidden colour and clips 16-bit grey); None for other members."""
    if key.rsplit(".", 1)[-1].lower() not in WDS_IMAGE_MEMBERS:
        return None
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image).copy()


def pick_image(sample: dict) -> Image.Image:
    """WebDataset stage: the first ``jpg``/``jpeg``/``png``/``webp`` member of a sample (in that order, as
    ``cm3leon prepare`` picks it), decoded by :func:`decode_image` (unless decoded already).

    Raises:
        ValueError: the sample has no such member, or it does not decode (naming the sample's key, the member and
            the shard).
    """
    for key in WDS_IMAGE_MEMBERS:
        if key in sample:
            data = sample[key]
            if not isinstance(data, bytes):
                return data
            try:
                return decode_image(key, data)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise ValueError(
                    f"cannot decode image {sample.get('__key__')!r} ({key}) in shard {sample.get('__url__')}: "
                    f"{type(e).__name__}: {e}"
                ) from e
    raise ValueError(
        f"sample {sample.get('__key__')!r} from {sample.get('__url__')!r} has no {'/'.join(WDS_IMAGE_MEMBERS)} member"
    )


def image_shards(
    urls: str | list[str], image_size: int, shuffle: int = 0, hflip: bool = False, seed: int = 0, epoch: int = 0
) -> IterableDataset:
    """A WebDataset pipeline of ``(3, S, S)`` uint8 tensors from jpg/png/webp shards, split over nodes and workers.

    With ``shuffle`` (a sample buffer size), the shard order and the samples are shuffled by :class:`EpochShuffle`
    seeded by ``(seed, epoch)`` from ``epoch`` on; flips draw from the worker's torch RNG.
    """
    stages = [wds.SimpleShardList(urls)]
    if shuffle:
        stages.append(EpochShuffle(100, seed, epoch))  # shard order: the same in every worker and rank
    stages += [wds.split_by_node, wds.split_by_worker, tar_samples]  # a truncated shard fails, named
    if shuffle:
        stages.append(EpochShuffle(shuffle, seed, epoch))
    to_sample = functools.partial(_random_flip_tensor, size=image_size, hflip=hflip)
    stages += [wds.map(pick_image), wds.map(to_sample)]
    return wds.DataPipeline(*stages)


def _random_flip_tensor(image: Image.Image, size: int, hflip: bool) -> torch.Tensor:
    return to_tensor(image, size, hflip and bool(torch.randint(2, ()).item()))


class ImageDataModule(ResumableTrainData, L.LightningDataModule):
    """Images for VQGAN training.

    Args:
        train: an image folder, a folder of ``.tar`` WebDataset shards, or a shard URL pattern
            (``shards/train-{000000..000009}.tar``); None to use ``synthetic`` generated images.
        val: the same for validation (optional; without it and with ``synthetic`` images, ``synthetic_val`` are made).
        image_size: side of the square crops.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        hflip: random horizontal flips in training.
        synthetic: number of generated training images (:func:`synthetic_images`) when ``train`` is None.
        synthetic_val: number of generated validation images when ``val`` is None and ``synthetic`` > 0.
        seed: seed of the generated images, the flips and the training order.
        shuffle_buffer: sample shuffle buffer for shards (training only).
        allow_pipe: allow ``pipe:`` shard URLs (they run shell commands).
        mode: ``"exact"`` (each training image once per epoch) or ``"resampled"`` (training shards drawn with
            replacement, :class:`~cm3leon_lightning.data.resampled_images.ResampledImageShards`: shards only).
        epoch_batches: batches per rank and epoch in ``resampled`` mode; default: the local shards' images
            (counted from their tar headers) over ranks x ``batch_size``, rounded up. Required for remote shards.

    Folders and generated images train in the order of :class:`~cm3leon_lightning.data.sampling.ResumableSampler`: a
    permutation per epoch seeded by ``(seed, epoch)`` whatever the global RNG or the number of workers, each rank its
    disjoint share, flips drawn per ``(seed, epoch, image)``. :meth:`state_dict` (saved in every checkpoint) records
    the epoch and the batches consumed in it, so ``trainer.fit(..., ckpt_path=...)`` goes on with the next batch of
    the same order (mid-epoch: with the same images, batch size, seed and number of ranks).

    Shards do not resume mid-epoch: a resumed run reads the interrupted epoch again from its start (a warning says
    so), in that epoch's order. Their order is seeded by ``(seed, epoch)`` but also depends on the number of workers
    and ranks (each reads its own shards), and flips draw from the workers' torch RNG. Resume from end-of-epoch
    checkpoints, or use an image folder, where exactness matters. Under DDP, shards are dealt whole to ranks, so
    training shards must split evenly (a multiple of ranks x workers shards, equal numbers of images): other shards
    are refused (:func:`check_even_split`), as ranks would read different numbers of batches and hang. Validation
    shards need only give every rank one (non-empty) shard.

    ``mode="resampled"`` takes training shards of any number and sizes (img2dataset's): every worker draws shards
    with replacement, seeded by ``(seed, epoch, rank, worker)``, and every rank reads ``epoch_batches`` batches per
    epoch, so DDP never waits for a rank that ran out. An epoch then sees a random draw, not every image once; a run
    resumed mid-epoch reads the epoch's remaining batches, drawn afresh.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        image_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        hflip: bool = False,
        synthetic: int = 0,
        synthetic_val: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        allow_pipe: bool = False,
        mode: Literal["exact", "resampled"] = "exact",
        epoch_batches: int | None = None,
    ) -> None:
        super().__init__()
        if train is None and synthetic <= 0:
            raise ValueError("ImageDataModule needs train= (image folder or shards) or synthetic= (> 0 images)")
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
        if mode == "resampled" and (train is None or not _is_shards(train)):
            raise ValueError(
                f"mode='resampled' draws WebDataset shards, but train={train!r} is not shards (a .tar path or pattern, "
                "or a folder of .tar files); use mode='exact'"
            )
        if epoch_batches is not None and (mode != "resampled" or epoch_batches < 1):
            raise ValueError(f"epoch_batches (got {epoch_batches}) must be >= 1 and is for mode='resampled' only")
        if image_size < 4 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need image_size >= 4, batch_size >= 1, num_workers >= 0; got {image_size}, {batch_size}, "
                f"{num_workers}"
            )
        counts = {"seed": seed, "shuffle_buffer": shuffle_buffer, "synthetic": synthetic,
                  "synthetic_val": synthetic_val}  # fmt: skip
        for name, value in counts.items():  # a negative seed failed in numpy naming nothing; the others did nothing
            if value < 0:
                raise ValueError(f"ImageDataModule: {name} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._init_resume()
        self._fit_position = FitPosition()

    @property
    def shards(self) -> bool:
        """Whether the training images come from WebDataset shards (not resumable mid-epoch)."""
        return self.hparams.train is not None and _is_shards(self.hparams.train)

    def _dataset(self, spec: str, train: bool) -> Dataset:
        hp = self.hparams
        if _is_shards(spec):
            urls = shard_urls(spec, hp.allow_pipe)
            shuffle = hp.shuffle_buffer if train else 0
            return image_shards(urls, hp.image_size, shuffle, hp.hflip and train, hp.seed)
        return ImageFolderDataset(Path(spec), hp.image_size, hp.hflip and train, hp.seed)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (idempotent)."""
        hp = self.hparams
        if self.train_set is None and hp.mode == "exact":  # resampled: built per training loader
            if hp.train is not None:
                self.train_set = self._dataset(hp.train, train=True)
            else:
                self.train_set = ImageFolderDataset(synthetic_images(hp.synthetic, hp.image_size, hp.seed),
                                                    hp.image_size, hp.hflip, hp.seed)  # fmt: skip
        if self.val_set is None:
            if hp.val is not None:
                self.val_set = self._dataset(hp.val, train=False)
            elif hp.train is None and hp.synthetic_val > 0:
                arr = synthetic_images(hp.synthetic_val, hp.image_size, hp.seed + 1)
                self.val_set = ImageFolderDataset(arr, hp.image_size)

    def _check_shards(self, spec: str | None, what: str) -> None:
        """Under DDP, refuse shards that ranks would read in different numbers of batches (``train``) or that leave a
        rank without a batch (``val``): :func:`check_even_split`."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if spec is not None and world > 1 and _is_shards(spec):
            urls = shard_urls(spec, self.hparams.allow_pipe)
            check_even_split(urls, world, self.hparams.num_workers, what, training=what == "train")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        workers = {"num_workers": hp.num_workers, "persistent_workers": hp.num_workers > 0}
        if shuffle and not isinstance(dataset, IterableDataset):
            return self.resumable_loader(
                dataset, hp.batch_size, hp.seed, with_epoch=isinstance(dataset, ImageFolderDataset), **workers
            )  # flips per epoch
        if shuffle:  # shards: each pass's shuffles take the epoch the loader decides (whole epochs only)
            loader = PositionedLoader(dataset, self._shard_position, self._shard_start(True), batch_size=hp.batch_size,
                                      **workers)  # fmt: skip
            for stage in getattr(dataset, "pipeline", []):
                if isinstance(stage, EpochShuffle):
                    stage.passes = loader.passes
            return loader
        return DataLoader(dataset, batch_size=hp.batch_size, **workers)

    def _shard_position(self) -> tuple[int, int] | None:
        """The training position of a shard loader in ``fit`` (:class:`FitPosition`), else None."""
        return self._fit_position(self.trainer)

    def _shard_start(self, whole_epochs: bool, epoch_batches: int | None = None) -> tuple[int, int]:
        """Where a new shard loader starts: in ``fit``, the trainer's position shifted by a position loaded before
        it (which is then used up); outside, the loaded position."""
        loaded = self._pending_state
        if trainer_position(self.trainer) is not None:
            self._fit_position.begin(self.trainer, loaded, whole_epochs, epoch_batches)
            self._pending_state = None
            return self._shard_position()  # type: ignore[return-value]
        return int((loaded or {}).get("epoch", 0)), 0 if whole_epochs else int((loaded or {}).get("batch", 0))

    def _resampled_loader(self) -> ResampledLoader:
        """``mode="resampled"``: :class:`ResampledImageShards` for this rank, from the trainer's position (or the
        restored one outside ``fit``)."""
        from cm3leon_lightning.data.resampled_images import ResampledImageShards, ResampledLoader, default_epoch_batches

        hp, trainer = self.hparams, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        urls = expand_shard_urls(shard_urls(hp.train, hp.allow_pipe))
        batches = hp.epoch_batches or default_epoch_batches(urls, world, hp.batch_size)
        dataset = ResampledImageShards(
            urls, hp.image_size, hp.batch_size, batches, hp.shuffle_buffer, hp.hflip, hp.seed, rank
        )
        start = self._shard_start(False, batches)
        workers = {"num_workers": hp.num_workers, "persistent_workers": hp.num_workers > 0}
        return ResampledLoader(dataset, self._shard_position, start, **workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(B, 3, S, S)`` uint8 (resumable, but from shards in ``exact`` mode)."""
        if self.hparams.mode == "resampled":
            return self._resampled_loader()
        self.setup("fit")
        self._check_shards(self.hparams.train, "train")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches, or an empty list when there is no validation data."""
        self.setup("validate")
        self._check_shards(self.hparams.val, "val")
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """The training position ``{"epoch", "batch", ...}`` (Lightning saves it in every checkpoint)."""
        if self.shards and self._pending_state is None and (position := self._shard_position()) is not None:
            return self._fit_position.state(position)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position (before or after the training loader exists); from shards, only the
        epoch, with a warning when the position is mid-epoch."""
        if not state_dict:
            return
        if self.shards and self.hparams.mode == "exact" and state_dict.get("batch", 0):
            rank_zero_warn(
                f"ImageDataModule: the checkpoint stopped after batch {state_dict['batch']} of epoch "
                f"{state_dict['epoch']}, but shards (train={self.hparams.train!r}) cannot resume mid-epoch: the "
                "epoch's images are read again from its start. Use an end-of-epoch checkpoint or an image folder "
                "for an exact resume"
            )
        super().load_state_dict(state_dict)
