"""WebDataset tars as a source of raw image-caption pairs for ``cm3leon prepare`` (``--source wds``).

Split from :mod:`cm3leon_lightning.data.sources` (which re-exports these names and describes every source).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cm3leon_lightning.data.shards import ShardFormatError, iter_tar_samples
from cm3leon_lightning.data.sources import (
    WDS_CAPTION_MEMBERS,
    WDS_IMAGE_MEMBERS,
    PairSource,
    RawPair,
    document_key,
    stat_fingerprint,
)
from cm3leon_lightning.data.tars import decompressed

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""The names a directory's WebDataset tars end in: plain, gzip, bzip2 or xz (told apart by content when read)."""


def list_tars(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Local tar paths from a directory (its files ending in one of :data:`TAR_SUFFIXES`, sorted), a brace pattern,
    or a list of paths."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_dir():
            tars = sorted(p for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and p.is_file())
            if not tars:
                raise ValueError(f"no {' / '.join(TAR_SUFFIXES)} shards in {path}")
            return tars
        from braceexpand import braceexpand

        spec = list(braceexpand(str(spec)))
    tars = [Path(s) for s in spec]
    missing = [str(t) for t in tars if not t.is_file()]
    if missing:
        raise FileNotFoundError(f"WebDataset shard(s) not found: {missing[:3]}")
    return tars


@contextmanager
def open_tar(path: Path) -> Iterator[BinaryIO]:
    """A local tar for reading (a context), decompressed when it is a gzip, bzip2 or xz stream, as WebDataset reads
    them (:func:`~cm3leon_lightning.data.tars.decompressed`, which the VQGAN's image shards use too)."""
    with open(path, "rb") as raw:
        yield decompressed(raw)


class WebDatasetSource(PairSource):
    """Local WebDataset tars (plain, gzip, bzip2 or xz) with an image member (``jpg``/``jpeg``/``png``/``webp``) and
    a ``txt`` caption.

    The number of samples per tar is counted once (a pass that reads the tars without decoding images) unless
    ``counts`` gives it. A tar that is truncated or garbled contributes the samples before the damage, is listed in
    :attr:`damaged` and named in a warning; one where a sample's members are not next to each other (read as
    separate documents, as WebDataset reads them) is listed in :attr:`scattered` and named in a warning.

    Args:
        urls: a directory of ``.tar`` files, a brace pattern (``data/shard-{000..009}.tar``) or a list of paths.
        counts: samples per tar, in order (from an earlier count).
    """

    kind = "wds"

    def __init__(self, urls: str | Path | Sequence[str | Path], counts: Sequence[int] | None = None) -> None:
        self.tars = list_tars(urls)
        self.damaged: list[str] = []
        self.scattered: list[str] = []  # tars where one key's members are not next to each other
        if counts is not None and len(counts) != len(self.tars):
            raise ValueError(f"counts has {len(counts)} entries for {len(self.tars)} tars")
        self.counts = [int(c) for c in counts] if counts is not None else [self._count(t) for t in self.tars]
        if self.damaged:  # a truncated download would otherwise lose its tail without a word
            n = dict(zip(map(str, self.tars), self.counts))
            warnings.warn(
                f"{len(self.damaged)} WebDataset tar(s) are truncated or damaged; only the samples before the damage "
                f"are read: {', '.join(f'{t} ({n[t]} read)' for t in self.damaged[:5])}"
                f"{' ...' if len(self.damaged) > 5 else ''}",
                stacklevel=2,
            )
        if self.scattered:  # "tar cf x.tar *.jpg *.txt": every image and every caption a document of its own, skipped
            warnings.warn(
                f"{len(self.scattered)} WebDataset tar(s) hold samples whose members are not next to each other, so "
                "(as WebDataset groups consecutive members) their images and captions are read as separate "
                f"documents and skipped: {', '.join(self.scattered[:5])}{' ...' if len(self.scattered) > 5 else ''}; "
                "write each sample's members together (e.g. tar --sort=name)",
                stacklevel=2,
            )
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def _samples(self, tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        with open_tar(tar) as f:
            try:
                yield from iter_tar_samples(f, str(tar))
            except ShardFormatError:
                if str(tar) not in self.damaged:
                    self.damaged.append(str(tar))

    def _count(self, tar: Path) -> int:
        n, seen = 0, set()
        with open_tar(tar) as f:
            try:
                for key, _ in iter_tar_samples(f, str(tar)):
                    n += 1
                    if key in seen and str(tar) not in self.scattered:  # samples change key: seen before, apart
                        self.scattered.append(str(tar))
                    seen.add(key)
            except ShardFormatError:
                self.damaged.append(str(tar))
        return n

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "tars": [str(t) for t in self.tars], "counts": self.counts, "count": len(self),
                "fingerprint": self.fingerprint()}  # fmt: skip

    def fingerprint(self) -> str:
        """The sizes and modification times of the tars."""
        return stat_fingerprint((str(t), [t]) for t in self.tars)

    @staticmethod
    def _pair(key: str, members: dict[str, bytes], tar: Path) -> RawPair:
        image = next((members[m] for m in WDS_IMAGE_MEMBERS if m in members), None)
        caption = next((members[m] for m in WDS_CAPTION_MEMBERS if m in members), None)
        return RawPair(document_key(key), caption, image, {"shard": tar.name, "key": key})

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        start, stop = self._check_range(start, stop, len(self))
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for t in range(max(first, 0), len(self.tars)):
            if self.offsets[t] >= stop:
                break
            for j, (key, members) in enumerate(self._samples(self.tars[t])):
                i = int(self.offsets[t]) + j
                if i >= stop or j >= self.counts[t]:
                    break
                if i >= start:
                    yield self._pair(key, members, self.tars[t])
