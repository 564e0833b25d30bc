"""Resampled image shards: every rank reads the same number of batches from shards of any sizes (DDP-safe).

WebDataset's exact reading deals whole shards to ranks, so ranks read as many batches as their shards hold and DDP
hangs when those differ (img2dataset writes shards of unequal sizes). Here each worker draws shards with
replacement from its own generator, seeded by ``(seed, epoch, rank, worker)``, and stops after its share of a fixed
number of batches per rank and epoch (webdataset's ``ResampledShards`` + ``with_epoch`` recipe, made deterministic
and resumable). An epoch is a number of batches, not one pass over every image.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from cm3leon_lightning.data.image_shards import tar_samples
from cm3leon_lightning.data.images import pick_image, to_tensor
from cm3leon_lightning.data.positioned import PositionedLoader
from cm3leon_lightning.data.shards import count_tar_samples, is_remote

RESAMPLE_TAG = 0x1A6E  # seed-sequence tag of the image shard draws (distinct from other seeded streams)


def drawn_samples(urls: list[str], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples of shards drawn from ``urls`` with replacement by ``rng``, forever.

    Raises:
        ValueError: a truncated or garbled shard (:func:`~cm3leon_lightning.data.image_shards.tar_samples`, named);
            when every shard of ``urls`` was drawn, and held no sample, since the last sample (naming the
            last one): the stream would never fill a batch. Some empty shards among others are read past, however
            many (a run of empty draws is no sign that all are empty).
    """
    empty: set[str] = set()  # the shards drawn empty since the last sample
    distinct = len(set(urls))
    while True:
        url = urls[int(rng.integers(len(urls)))]
        found = False
        for sample in tar_samples([{"url": url}]):  # a truncated shard fails, named
            found = True
            yield sample
        if found:
            empty.clear()
            continue
        empty.add(url)
        if len(empty) == distinct:
            raise ValueError(f"all {distinct} shards were drawn and held no sample (the last: {url}); are they empty?")


def image_batches(
    samples: Iterator[dict[str, Any]], image_size: int, batch_size: int, hflip: bool, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """``(batch_size, 3, S, S)`` uint8 batches of the images in ``samples``; flips drawn from ``rng``. An image
    that does not decode raises ValueError naming its key and shard (:func:`pick_image`)."""
    batch: list[torch.Tensor] = []
    for sample in samples:
        flip = hflip and bool(rng.integers(2))
        batch.append(to_tensor(pick_image(sample), image_size, flip))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []


def worker_share(batches: int, worker: int, workers: int) -> int:
    """Batches of ``batches`` that worker ``worker`` of ``workers`` yields (the first ones take one more)."""
    return batches // workers + (worker < batches % workers)


class ResampledImageShards(IterableDataset):
    """Training batches drawn from image shards with replacement: exactly ``batches`` per rank and epoch.

    A DataLoader reads it with ``batch_size=None`` (it yields whole batches); its length is the epoch's batches. Each
    pass is one epoch and counts ``epoch`` up. The first pass starts after ``start`` batches (a resumed run): it
    yields the epoch's remaining batches, drawn afresh (the draws are seeded by ``start`` too, so they are not the
    interrupted run's first batches again). Draws, sample shuffle and flips of worker ``w`` on ``rank`` come from
    ``np.random.default_rng([seed, epoch, rank, w, RESAMPLE_TAG, start])``: the same settings read the same batches.
    Read by a :class:`ResampledLoader` in ``fit``, a pass ends at the batches the trainer trains per epoch
    (``limit_train_batches``, ``stop``): one starting at ``start`` yields ``stop - start``, as the uninterrupted run.

    Args:
        urls: the shard URLs (local paths, ``file://``, ``http(s)://``... as WebDataset opens them).
        image_size: side of the square crops.
        batch_size: images per batch.
        batches: batches per rank and epoch.
        shuffle: sample shuffle buffer (0: none).
        hflip: random horizontal flips.
        seed: seed of the draws.
        rank: this process's global rank.
    """

    def __init__(
        self, urls: list[str], image_size: int, batch_size: int, batches: int, shuffle: int = 0, hflip: bool = False,
        seed: int = 0, rank: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if not urls:
            raise ValueError("ResampledImageShards needs at least one shard URL")
        if batches < 1 or batch_size < 1:
            raise ValueError(f"batches and batch_size must be >= 1, got {batches} and {batch_size}")
        if seed < 0 or rank < 0:
            raise ValueError(f"ResampledImageShards: seed and rank must be >= 0, got seed={seed}, rank={rank}")
        self.urls, self.image_size, self.batch_size, self.batches = list(urls), image_size, batch_size, batches
        self.shuffle, self.hflip, self.seed, self.rank = shuffle, hflip, seed, rank
        self.epoch, self.start = 0, 0
        self.passes: torch.Tensor | None = None  # set by ResampledLoader: each pass's (epoch, start, stop), shared

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = self.batches
        if self.passes is not None:  # the loader's position for this pass (workers' copies do not count passes)
            epoch, start, limit = self.passes.tolist()
            stop = stop if limit < 0 else min(stop, limit)  # the trainer's batches per epoch (limit_train_batches)
        else:
            epoch, start = self.epoch, self.start
            self.epoch, self.start = epoch + 1, 0  # the next pass: the next epoch, whole
        start = min(start, self.batches)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, RESAMPLE_TAG, start])
        samples = drawn_samples(self.urls, rng)
        if self.shuffle:
            shuffle_rng = random.Random(int(rng.integers(2**63)))
            samples = wds.shuffle(self.shuffle, min(100, self.shuffle), rng=shuffle_rng)(samples)
        stream = image_batches(samples, self.image_size, self.batch_size, self.hflip, rng)
        for _ in range(worker_share(max(0, stop - start), worker, workers)):
            yield next(stream)


def default_epoch_batches(urls: list[str], world_size: int, batch_size: int) -> int:
    """Batches per rank in an epoch as long as one pass over the shards: their images (counted from the tar headers)
    over ``world_size`` x ``batch_size``, rounded up.

    Raises:
        ValueError: a remote shard (counting would download it: pass ``epoch_batches``), unreadable shards (named),
            or shards without any image.
    """
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise ValueError(
            f"epoch_batches: cannot count the images of remote shards ({remote[0]}...) without downloading them; "
            "pass epoch_batches (batches per rank and epoch)"
        )
    total = sum(count_tar_samples(u.removeprefix("file://")) for u in urls)
    if total == 0:
        raise ValueError(f"the training shards ({urls[0]}...) hold no samples")
    return -(-total // (world_size * batch_size))


class ResampledLoader(PositionedLoader):
    """A :class:`~cm3leon_lightning.data.positioned.PositionedLoader` of :class:`ResampledImageShards` that Lightning
    sees as resumable: its state is the training position ``{"epoch", "batch"}`` (``position()``), and loading one
    makes the next pass start there."""

    def __init__(
        self,
        dataset: ResampledImageShards,
        position: Callable[[], tuple[int, int] | None],
        start: tuple[int, int] = (0, 0),
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, position, start, batch_size=None, **kwargs)
        dataset.passes = self.passes

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batch"}`` after the consumed batches; ``{}`` outside ``fit``."""
        position = self.position()
        return {} if position is None else {"epoch": position[0], "batch": position[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next pass at ``state``'s position (nothing for an empty state)."""
        if state:
            self.next_pass = (int(state["epoch"]), int(state["batch"]))
