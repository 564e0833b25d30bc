"""Reading local tars as WebDataset does: samples grouped from consecutive members, their keys from the headers
alone, and damage named (the block where tarfile stopped is checked after the fact).

Split from :mod:`cm3leon_lightning.data.shards`, which re-exports these names.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import lzma
import os
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from cm3leon_lightning.data.samples import ShardFormatError

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # (key, extension): webdataset's base_plus_ext
# magic bytes of the compressions tarfile's "r|*" (and so WebDataset) reads, and their readers
_COMPRESSIONS = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


class _RecentBytes:
    """A read-only stream that keeps the last chunks read from ``raw``, so the block where tarfile stopped can be
    checked after the fact (a ``"r|"`` stream cannot seek back). Chunks are kept as read, not copied."""

    KEEP = 1 << 16  # bytes kept at least: well beyond tarfile's read-ahead (one 10 KiB record)

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.pos = raw, 0
        self.chunks: collections.deque[bytes] = collections.deque()
        self.kept = 0

    def read(self, n: int = -1) -> bytes:
        """Read from ``raw``, remembering the bytes."""
        data = self.raw.read(n)
        self.pos += len(data)
        self.chunks.append(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0]) >= self.KEEP:
            self.kept -= len(self.chunks.popleft())
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The (up to) 512 bytes read from ``offset`` on; None when they are no longer kept."""
        start = self.kept - (self.pos - offset)
        if start < 0:
            return None
        return b"".join(self.chunks)[start : start + tarfile.BLOCKSIZE]


class _Prefixed:
    """A read-only stream: the bytes ``head`` (already read from ``raw``), then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all with ``n < 0``)."""
        if n is None or n < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + self.raw.read(n - len(data)) if len(data) < n else data


def decompressed(raw: BinaryIO) -> BinaryIO:
    """``raw`` decompressed when it starts as a gzip, bzip2 or xz stream (the tars WebDataset reads), else as is;
    for :func:`iter_tar_samples`, which reads plain tars. Reads from ``raw`` as a stream (no seeking)."""
    head = raw.read(6)
    stream = _Prefixed(head, raw)
    for magic, reader in _COMPRESSIONS:
        if head.startswith(magic):
            return reader(stream)  # type: ignore[return-value]
    return stream  # type: ignore[return-value]


def iter_tar_samples(stream: BinaryIO, name: str = "<stream>") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into ``(key, {extension: bytes})`` the way WebDataset does.

    Names split as in webdataset (its ``base_plus_ext``): the key is the member's path up to the first dot of its
    file name, folders included (``cats/000.jpg`` and ``dogs/000.jpg`` are two samples, ``cats/000`` and
    ``dogs/000``), and the extension is the rest, in lower case (``000.JPG`` -> ``jpg``). Consecutive members with the
    same key form a sample; members without an extension are skipped.

    Raises:
        ShardFormatError: reason ``corrupt_shard`` when the tar is truncated (also exactly between two members or
            inside a header, where tarfile alone stops without a word) or garbled (a member header that is neither
            valid nor the end-of-archive marker), after yielding the complete samples before the damage (not the
            last sample read, whose members may be cut off).
    """
    key, members = None, {}
    recorded = _RecentBytes(stream)
    try:
        with tarfile.open(fileobj=recorded, mode="r|") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                split = _MEMBER_NAME.match(info.name)
                if split is None:  # no extension: not a sample member
                    continue
                k, ext = split.group(1), split.group(2).lower()
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext] = data
            # tarfile stops quietly where the bytes end after a complete member, inside a header, or at a garbled
            # header; only a whole tar has the zero block of its end-of-archive marker where the next header would be.
            end = recorded.block_at(tf.offset)
            if end is not None and end != bytes(tarfile.BLOCKSIZE):
                what = "cut off" if len(end) < tarfile.BLOCKSIZE else "a garbled member header"
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tf.offset}: {what}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError("corrupt_shard", f"shard {name}: unreadable tar after sample {key!r} ({e})") from e
    if key is not None:
        yield key, members


def tar_sample_keys(path: str | os.PathLike[str]) -> Iterator[str]:
    """The keys of the samples in a local tar, in order, as :func:`iter_tar_samples` (and WebDataset) group its
    members, from the member headers only (the data is skipped, not read; a compressed tar, which WebDataset also
    reads, is decompressed). Stop early to read fewer headers.

    Raises:
        ValueError: ``path`` is not a readable tar (named): also one truncated exactly between two members or with a
            garbled member header, where tarfile stops without a word (after yielding the keys before).
        FileNotFoundError: ``path`` is missing.
    """
    key = None
    try:
        with tarfile.open(path, "r:*") as tf:
            for info in tf:
                split = _MEMBER_NAME.match(info.name) if info.isfile() else None
                if split is not None and split.group(1) != key:
                    key = split.group(1)
                    yield key
            tf.fileobj.seek(tf.offset)  # a whole tar has its end-of-archive marker where the next header would be
            end = tf.fileobj.read(tarfile.BLOCKSIZE)
            if end != bytes(tarfile.BLOCKSIZE):
                what = "cut off" if len(end) < tarfile.BLOCKSIZE else "a garbled member header"
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tf.offset}: {what}")
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path}: not a readable tar ({e})") from e


def count_tar_samples(path: str | os.PathLike[str]) -> int:
    """Samples in a local tar, from its member headers only (:func:`tar_sample_keys`).

    Raises:
        ValueError: ``path`` is not a readable tar (named).
    """
    return sum(1 for _ in tar_sample_keys(path))
