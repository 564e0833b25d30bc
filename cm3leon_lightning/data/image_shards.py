"""Image shard URLs: expanding patterns and folders, the epoch-seeded shuffle stage, and the DDP even-split check.

Split from :mod:`cm3leon_lightning.data.images` (which re-exports these names) so each file reads in one sitting.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds


def shard_urls(spec: str, allow_pipe: bool = False) -> str | list[str]:
    """Shard URLs from a directory of ``.tar`` files or a (brace-expandable) URL pattern.

    Raises:
        ValueError: a ``pipe:`` URL without ``allow_pipe``, or a directory without ``.tar`` files.
    """
    if spec.startswith("pipe:") and not allow_pipe:
        raise ValueError(f"refusing shard URL {spec!r}: 'pipe:' runs a shell command; pass allow_pipe=True to allow it")
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise ValueError(f"no .tar shards in {path}")
        return tars
    return spec


class EpochShuffle(wds.PipelineStage):
    """WebDataset stage: shuffle through a ``bufsize`` buffer, seeded by ``(seed, epoch)``.

    The epoch is the one in ``passes`` (a shared tensor ``(epoch, batch)`` that a
    :class:`~cm3leon_lightning.data.positioned.PositionedLoader` sets for each pass); without it, ``epoch`` is the
    next pass's and each pass counts one up. Every copy of the pipeline (one per worker and rank) uses the same epoch,
    so a shuffle before the node/worker split orders the shards identically everywhere and the split deals each shard
    to exactly one reader (an unseeded shuffle gave each its own order: some shards were read twice in an epoch,
    others never).
    """

    def __init__(self, bufsize: int, seed: int = 0, epoch: int = 0) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch
        self.passes: torch.Tensor | None = None

    def run(self, src: Any) -> Any:
        """Shuffle ``src`` for the current epoch."""
        if self.passes is not None:
            epoch = int(self.passes[0])
        else:
            epoch, self.epoch = self.epoch, self.epoch + 1
        state = np.random.SeedSequence((self.seed, epoch)).generate_state(2)
        rng = random.Random(int(state[0]) << 32 | int(state[1]))
        return wds.shuffle(self.bufsize, 100, rng=rng)(src)


def tar_samples(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """WebDataset stage, ``wds.tarfile_to_samples()`` with damage named: shard items ``{"url"}`` -> samples
    ``{"__key__", "__url__", <extension>: bytes}`` (members grouped as WebDataset groups them; compressed tars read).

    Raises:
        ValueError: naming the shard, when it is truncated or garbled, after its complete samples (a plain ValueError,
            which a DataLoader worker passes on as one). WebDataset read a tar cut exactly between two members as a
            whole, shorter one, without a word (:func:`~cm3leon_lightning.data.tars.iter_tar_samples`).
    """
    from cm3leon_lightning.data.samples import ShardFormatError
    from cm3leon_lightning.data.tars import decompressed, iter_tar_samples

    for item in src:
        url = item["url"]
        with wds.gopen(url) as raw:
            try:
                for key, members in iter_tar_samples(decompressed(raw), url):
                    yield {"__key__": key, "__url__": url, **members}
            except ShardFormatError as e:
                raise ValueError(str(e)) from e


def _is_shards(spec: str) -> bool:
    """Whether ``spec`` names WebDataset shards (a ``.tar`` path or pattern, or a folder of ``.tar`` files)."""
    path = Path(spec)
    return ".tar" in spec or (path.is_dir() and any(path.glob("*.tar")))


def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """The shard URLs of a pattern (braces, ``a.tar::b.tar``) as ``wds.SimpleShardList`` expands them."""
    from webdataset.shardlists import expand_urls

    return expand_urls(urls) if isinstance(urls, str) else list(urls)


def check_even_split(
    urls: str | list[str], world_size: int, num_workers: int, what: str, training: bool = True
) -> None:
    """Refuse shards that ``world_size`` ranks would read in different numbers of batches (``training``), or that
    would leave a rank without a batch (validation).

    WebDataset deals whole shards to ranks and then to workers, and each worker batches its own images: ranks get
    equal batches in every epoch only when the number of shards is a multiple of ranks x workers and every shard
    holds as many images (counted from the tar headers of local shards; remote ones are not counted). A rank with a
    batch more runs one more gradient all-reduce, for which the others never come: DDP hangs. Validation steps wait
    for no other rank, so uneven shards are fine there, but a rank with no batch at all skips the collectives the
    others wait in (the first forward's buffer broadcast, the epoch's synchronised logs).

    Raises:
        ValueError: naming ``what`` (``train`` or ``val``), the shards, and the counts that differ; a shard that is
            not a readable tar (named).
    """
    from cm3leon_lightning.data.shards import count_tar_samples, is_remote

    urls = expand_shard_urls(urls)
    remote = any(map(is_remote, urls))
    if not training:
        if len(urls) < world_size:
            raise ValueError(
                f"{what}: {len(urls)} shard(s) for {world_size} ranks: a rank would read no batch and DDP would hang "
                f"at the validation's end; use at least {world_size} shards, or validate from an image folder"
            )
        if remote:
            return
        counts = [count_tar_samples(u.removeprefix("file://")) for u in urls]
        empty = [r for r in range(world_size) if not sum(counts[r::world_size])]  # wds.split_by_node: urls[r::world]
        if empty:
            raise ValueError(
                f"{what}: rank {empty[0]} would read only empty shards ({urls[empty[0]]}...) and DDP would hang at "
                "the validation's end; remove the empty shards"
            )
        return
    readers = world_size * max(1, num_workers)
    fix = "use mode='resampled' (every rank draws the same number of batches), or train from an image folder"
    if len(urls) % readers:
        raise ValueError(
            f"{what}: {len(urls)} shards cannot be dealt evenly to {world_size} ranks x {max(1, num_workers)} "
            f"workers = {readers} readers, so ranks would read different numbers of batches and DDP would hang at the "
            f"epoch's end; use a multiple of {readers} shards holding equal numbers of images, change num_workers "
            "(--data.init_args.num_workers), "
            f"{fix}"
        )
    if remote:
        return  # remote: counting would download every shard
    counts = {u: count_tar_samples(u.removeprefix("file://")) for u in urls}
    if len(set(counts.values())) > 1:
        lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
        raise ValueError(
            f"{what}: the shards hold different numbers of images ({lo}: {counts[lo]}, {hi}: {counts[hi]}), so under "
            f"DDP ranks would read different numbers of batches and hang at the epoch's end; re-shard to equal "
            f"counts, {fix}"
        )
