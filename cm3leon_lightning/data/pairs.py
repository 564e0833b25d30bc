"""Image-caption pairs for training a CLIP retriever (``ClipModule``) on your own data.

Generic on purpose: the pairs come from in-memory images and captions, from a folder of images with caption sidecar
files (``cat.jpg`` + ``cat.txt``), or from a generator: a built-in one of single coloured shapes with 12 distinct
captions (tests), or the demo's synthetic shapes dataset (:mod:`cm3leon_lightning.data.shapes`).
A batch is ``{"image": uint8 (B, 3, S, S), "caption": list[str]}``; CLIP-specific tokenisation and normalisation
happen in the module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.data.cleaning import BadInput, clean_caption, to_rgb
from cm3leon_lightning.data.sampling import ResumableTrainData
from cm3leon_lightning.data.stages import check_seed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
}
SHAPE_KINDS = ("square", "circle", "triangle")


def make_shape_pairs(n: int, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Generate ``n`` images of one coloured shape at a random place and size, captioned ``"a {color} {shape}"``.

    There are ``len(SHAPE_COLORS) * len(SHAPE_KINDS)`` = 12 distinct captions (classes).

    Args:
        n: number of pairs.
        image_size: square image side in pixels (>= 16).
        seed: generator seed (an integer >= 0); the same seed gives the same pairs.

    Returns:
        ``(n, image_size, image_size, 3)`` uint8 images and ``n`` captions.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    check_seed(seed, "the split and the generators")
    rng = np.random.default_rng(seed)
    colors = list(SHAPE_COLORS)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    captions = []
    for i in range(n):
        color, kind = colors[rng.integers(len(colors))], SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
        r = rng.uniform(0.2, 0.35) * image_size  # half-size of the shape
        cy, cx = rng.uniform(r, image_size - r, size=2)
        if kind == "square":
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        elif kind == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        else:  # upward triangle: below the apex, inside the two slanted edges
            mask = (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        img = rng.integers(225, 256, size=(image_size, image_size, 3)).astype(np.uint8)  # light noisy background
        img[mask] = SHAPE_COLORS[color]
        images[i] = img
        captions.append(f"a {color} {kind}")
    return images, captions


def read_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """List ``root``'s images that have a UTF-8 caption sidecar ``<stem>.txt`` (images without one are skipped).

    Captions follow ``cm3leon prepare``'s rule (:func:`~cm3leon_lightning.data.cleaning.clean_caption`, not truncated:
    control characters become spaces, whitespace runs one space, ends stripped), so the CLIP trains on the text it
    later embeds for retrieval. A sidecar with no text left (only whitespace) is no caption: its image is skipped
    too. A leading BOM is dropped.

    Returns:
        Image paths (sorted) and their captions (cleaned, never empty).

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no captioned image.
        ValueError: a sidecar is not valid UTF-8 (naming the file and the byte offset).
    """
    src = Path(root)
    if not src.is_dir():
        raise FileNotFoundError(f"data_dir {src} is not a directory")
    paths, captions = [], []
    for p in sorted(src.rglob("*")):
        side = p.with_suffix(".txt")
        if p.suffix.lower() in IMAGE_SUFFIXES and side.is_file():
            try:
                raw = side.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ValueError(f"caption sidecar {side} is not UTF-8 (byte {e.start}: {e.reason})") from e
            try:
                caption, _ = clean_caption(raw, max(1, len(raw)))
            except BadInput:
                continue  # blank: no caption
            paths.append(p)
            captions.append(caption)
    if not paths:
        raise FileNotFoundError(f"data_dir {src} has no image with a caption sidecar (<name>.txt)")
    return paths, captions


def to_square_uint8(image: Any, size: int) -> torch.Tensor:
    """An image (PIL, path, ``(H, W[, 3|4])`` array or ``(3, H, W)`` tensor) -> ``(3, size, size)`` uint8.

    Resized on the shortest side (bicubic, antialiased) and center-cropped. A uint8 image holds values in
    ``[0, 255]``; any other dtype is read as ``[0, 1]`` and scaled by 255, whether or not it needs resizing (values
    outside ``[0, 1]``, e.g. an int64 or float array of ``[0, 255]`` values, raise ValueError). Files and
    PIL images convert to RGB as ``cm3leon prepare`` converts them (:func:`cm3leon_lightning.data.cleaning.to_rgb`:
    transparent pixels white, 16-bit grey scaled to 8 bits), so the retriever trains on the pixels it later embeds.
    A file that does not decode (truncated, not an image) raises ValueError naming it.
    """
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as im:
                image = np.asarray(to_rgb(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image {image}: {type(e).__name__}: {e}") from e
    elif isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):  # a (3, H, W) array was read as H x W x 3 garbage
            raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        image = torch.from_numpy(np.array(image[:, :, :3])).permute(2, 0, 1)  # copy: PIL arrays are read-only
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    if (h, w) == (size, size) and image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint8 and image.numel():  # [0, 255] values would be scaled to a white picture, silently
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"a {image.dtype} image has values in [{lo:.4g}, {hi:.4g}]; images other than uint8 must be in [0, 1] "
                "(divide [0, 255] values by 255, or pass uint8)"
            )
    x = image.float()[None] if image.dtype == torch.uint8 else image.float()[None] * 255.0
    if (h, w) == (size, size):
        return x[0].round().clamp(0, 255).to(torch.uint8)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)


class ImageCaptionPairs(Dataset):
    """A map-style dataset of ``{"image": uint8 (3, S, S), "caption": str}``.

    Args:
        images: N images: an ``(N, H, W, 3)`` uint8 array, an ``(N, 3, H, W)`` tensor, or a sequence of PIL images,
            arrays or file paths (loaded lazily).
        captions: N captions.
        image_size: side ``S`` every image is resized and center-cropped to.
    """

    def __init__(self, images: Sequence[Any] | np.ndarray | torch.Tensor, captions: Sequence[str], image_size: int):
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.images, self.captions, self.image_size = images, list(captions), image_size

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": to_square_uint8(self.images[i], self.image_size), "caption": self.captions[i]}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images to ``(B, 3, S, S)`` uint8 and keep captions as a list."""
    return {"image": torch.stack([x["image"] for x in items]), "caption": [x["caption"] for x in items]}


class ImageCaptionDataModule(ResumableTrainData, L.LightningDataModule):
    """Image-caption pairs for CLIP training, split into train and validation.

    Exactly one source: ``data_dir`` (images with ``.txt`` sidecars), ``images`` + ``captions`` (in memory, from
    Python), or ``synthetic`` > 0 generated pairs.

    Args:
        data_dir: folder of images with caption sidecar files.
        images: in-memory images (see :class:`ImageCaptionPairs`).
        captions: in-memory captions.
        synthetic: number of generated pairs.
        synthetic_source: ``"simple"``: one coloured shape, 12 distinct captions (:func:`make_shape_pairs`);
            ``"shapes"``: the demo's dataset, one or two shapes with templated captions
            (:func:`cm3leon_lightning.data.shapes.generate_pairs`, train split).
        image_size: side every image is resized to (the CLIP model resizes again if its input differs).
        batch_size: pairs per batch. CLIP's contrastive loss wants large batches; the last partial one is dropped.
        val_fraction: fraction of pairs held out for validation, in ``[0, 1)``.
        num_workers: DataLoader workers.
        seed: seed of the train/validation split, the synthetic generator and the training order (an integer >= 0).

    The training order is :func:`~cm3leon_lightning.data.sampling.epoch_order`: a permutation per epoch seeded by
    ``(seed, epoch)``, whatever the global RNG or the number of workers; with several ranks each trains on its
    disjoint share (as from a DistributedSampler, also with ``use_distributed_sampler=False``). :meth:`state_dict`,
    which Lightning stores in every checkpoint, records the epoch and the batches consumed in it, so
    ``trainer.fit(..., ckpt_path=...)`` continues with the next batch of the same order (a mid-epoch checkpoint
    needs the same data, batch size, seed and number of ranks; the number of workers may change).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        images: Sequence[Any] | None = None,
        captions: Sequence[str] | None = None,
        synthetic: int = 0,
        synthetic_source: str = "simple",
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sources = (data_dir is not None) + (images is not None or captions is not None) + (synthetic > 0)
        if sources != 1:
            raise ValueError("give exactly one of data_dir, images+captions, or synthetic > 0")
        if synthetic_source not in ("simple", "shapes"):
            raise ValueError(f"synthetic_source must be 'simple' or 'shapes', got {synthetic_source!r}")
        if (images is None) != (captions is None):
            raise ValueError("images and captions must be given together")
        if isinstance(captions, str):  # its characters would be the captions
            raise ValueError(f"captions must be a sequence of str, got a single str {captions[:40]!r}")
        if images is not None and len(images) != len(captions):  # setup would pair the first ones, or fail unnamed
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        bad = next((i for i, c in enumerate(captions or ()) if not isinstance(c, str)), None)
        if bad is not None:  # the CLIP tokenizer failed at the first step: "object of type 'float' has no len()"
            c = captions[bad]
            raise ValueError(f"captions[{bad}] has type {type(c).__name__} ({c!r:.40}), not str")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_seed(seed, "the split and the generators")
        self.data_dir, self.images, self.captions, self.synthetic = data_dir, images, captions, synthetic
        self.synthetic_source = synthetic_source
        self.image_size, self.batch_size, self.val_fraction = image_size, batch_size, val_fraction
        self.num_workers, self.seed = num_workers, seed
        self.train_set: ImageCaptionPairs | None = None
        self.val_set: ImageCaptionPairs | None = None
        self._init_resume()

    def setup(self, stage: str | None = None) -> None:
        """Load or generate the pairs and split them (seeded).

        Raises:
            ValueError: the validation share (``round(val_fraction * N)``) would leave no training pair.
        """
        if self.train_set is not None:
            return
        if self.data_dir is not None:
            images, captions = read_image_folder(self.data_dir)
        elif self.synthetic > 0 and self.synthetic_source == "shapes":
            from cm3leon_lightning.data.shapes import generate_pairs

            pairs = list(generate_pairs(self.synthetic, "train", self.image_size, self.seed))
            images, captions = np.stack([p.image for p in pairs]), [p.caption for p in pairs]
        elif self.synthetic > 0:
            images, captions = make_shape_pairs(self.synthetic, self.image_size, self.seed)
        else:
            images, captions = self.images, list(self.captions)
        order = np.random.default_rng(self.seed).permutation(len(captions))
        n_val = int(round(self.val_fraction * len(captions)))
        if n_val >= len(captions):  # fit would train on nothing, with only Lightning's zero-length warning
            raise ValueError(
                f"val_fraction={self.val_fraction} of {len(captions)} pair(s) holds out {n_val}, leaving none to train "
                "on: lower val_fraction or add pairs"
            )
        splits = {"val": order[:n_val], "train": order[n_val:]}
        subsets = {}
        for name, idx in splits.items():
            imgs = images[idx] if isinstance(images, np.ndarray | torch.Tensor) else [images[i] for i in idx]
            subsets[name] = ImageCaptionPairs(imgs, [captions[i] for i in idx], self.image_size)
        self.train_set, self.val_set = subsets["train"], subsets["val"]

    def train_dataloader(self) -> DataLoader:
        """Training batches in the seeded, resumable order of
        :class:`~cm3leon_lightning.data.sampling.ResumableSampler` (this rank's share; the last partial batch dropped
        when there is more than one batch)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        drop_last = -(-len(self.train_set) // world) > self.batch_size  # more than one batch in this rank's share
        return self.resumable_loader(
            self.train_set, self.batch_size, self.seed, drop_last=drop_last, num_workers=self.num_workers,
            collate_fn=collate_pairs, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
        )
