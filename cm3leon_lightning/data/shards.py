"""The shard format (DESIGN section 4, format_version 1): sample schema, manifest, writer and reader.

A prepared dataset is a directory holding ``manifest.json`` and WebDataset tar shards ``shard-000000.tar``, ... One
sample is one query document with its retrieved neighbours' tokens inside, stored as members::

    <key>.caption.txt      the original caption (UTF-8)
    <key>.text.npy         int32 BPE ids of the caption
    <key>.image.npy        int16 (n_codes <= 32768) or int32 codes, shape (grid_h * grid_w,)
    <key>.neighbors.json   [{"key", "score", "by": "text" | "image"}, ...] in retrieval order
    <key>.neighbors.npz    arrays text_0, image_0, text_1, ... (an empty array: that modality is absent)
    <key>.jpg              optional source image (evaluation shards)

Everything loads with plain ``webdataset`` and ``numpy`` with ``allow_pickle=False``; pickle members (``.pyd``,
``.pkl``, ``.pth``) are refused. Problems found while reading raise :class:`ShardFormatError` with a ``reason``
from :data:`SKIP_REASONS`, which the data module counts and logs as ``data/skipped_<reason>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cm3leon_lightning.data.samples import (  # noqa: F401  (re-exported: the format's public names)
    FORBIDDEN_SUFFIXES,
    REQUIRED_MEMBERS,
    SKIP_REASONS,
    Neighbor,
    ShardFormatError,
    ShardSample,
    decode_sample,
    encode_sample,
    load_npy,
    load_npz,
)
from cm3leon_lightning.data.tars import (  # noqa: F401  (re-exported: their old home)
    count_tar_samples,
    iter_tar_samples,
    tar_sample_keys,
)
from cm3leon_lightning.files import write_bytes_whole
from cm3leon_lightning.tokenization.vocab import DEFAULT_NUM_SENTINELS, MultimodalVocab

FORMAT_VERSION = 1
SEGMENTS_FORMAT_VERSION = 2  # datasets holding documents with segments (samples.py); readers take 1 and 2
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"


def sanitize_key(key: str) -> str:
    """A WebDataset-safe key: characters outside ``[A-Za-z0-9_-]`` (``/``, ``.``, spaces...) become ``_``.

    WebDataset splits a member name at the first dot of its base name, so a key can hold no dot at all.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", str(key))
    if not clean.strip("_"):
        raise ValueError(f"key {key!r} has no usable characters after sanitising (allowed: A-Z a-z 0-9 _ -)")
    return clean


def _sha256_or_none(value: object) -> str | None:
    """``value`` when it is a hex sha256 (64 lowercase hex digits), else None (an empty or hand-written field)."""
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_version() -> str:
    """``cm3leon_lightning <version>`` for the manifest's ``created_by``."""
    try:
        return f"cm3leon_lightning {metadata.version('cm3leon_lightning')}"
    except metadata.PackageNotFoundError:
        return "cm3leon_lightning unknown"


# ------------------------------------------------------------------------------------------------ manifest
@dataclass
class ShardInfo:
    """One shard's entry in the manifest."""

    name: str
    count: int
    sha256: str


@dataclass
class Manifest:
    """``manifest.json``: the identity of the tokenizers and retriever, and the shards with their counts.

    Attributes:
        text_tokenizer: ``path``, ``sha256``, ``n_text`` and ``num_sentinels`` of the BPE tokenizer.
        image_tokenizer: ``checkpoint_sha256`` (the VQGAN file or directory), ``weights_sha256`` (its architecture and
            weights, however saved; manifests before it lack it), ``n_codes``, ``grid_h``, ``grid_w``, ``image_size``.
        clip: ``model`` name and embedding ``dim`` of the retriever.
        retrieval: the retrieval settings used (free-form primitives).
        shards: the shard files, in order.
        format_version: :data:`FORMAT_VERSION`, or :data:`SEGMENTS_FORMAT_VERSION` when some documents have
            segments (an older reader would drop them silently, so it refuses the dataset instead).
        created_by: the package version that wrote the shards.
    """

    text_tokenizer: dict[str, Any]
    image_tokenizer: dict[str, Any]
    clip: dict[str, Any] = field(default_factory=dict)
    retrieval: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    created_by: str = field(default_factory=package_version)
    location: str | None = field(default=None, compare=False, repr=False)  # where it was read from (not saved)

    def __post_init__(self) -> None:
        version = self.format_version  # "1" was refused as "format_version 1 is not supported", and true taken as 1
        integer = isinstance(version, numbers.Integral) and not isinstance(version, bool)
        if not integer or version not in (FORMAT_VERSION, SEGMENTS_FORMAT_VERSION):
            raise ValueError(
                f"manifest format_version {version!r} is not supported (expected the integer {FORMAT_VERSION} or "
                f"{SEGMENTS_FORMAT_VERSION})"
            )
        for section, keys in (
            ("text_tokenizer", ("n_text",)),
            ("image_tokenizer", ("n_codes", "grid_h", "grid_w")),
        ):
            values = getattr(self, section)
            if not isinstance(values, dict):
                raise ValueError(f"manifest {section} must be an object, got {values!r}")
            missing = [k for k in keys if k not in values]
            if missing:
                raise ValueError(f"manifest {section} lacks {missing}")
            for k in keys + (("num_sentinels",) if section == "text_tokenizer" and "num_sentinels" in values else ()):
                if isinstance(values[k], bool) or not isinstance(values[k], numbers.Integral):  # 64.7 became 64
                    raise ValueError(f"manifest {section}.{k} must be an integer, got {values[k]!r}")
        self.shards = [_shard_info(i, s) for i, s in enumerate(_as_list(self.shards))]
        first: dict[str, int] = {}
        for i, info in enumerate(self.shards):  # a bad count loses or misreads samples without a word
            if not isinstance(info.name, str) or not info.name:
                raise ValueError(f"manifest shards[{i}].name must be a non-empty string, got {info.name!r}")
            if isinstance(info.count, bool) or not isinstance(info.count, int) or info.count < 0:
                raise ValueError(
                    f"manifest shards[{i}] ({info.name}): count must be an integer >= 0, got {info.count!r}"
                )
            if info.sha256 is not None and not isinstance(info.sha256, str):
                raise ValueError(f"manifest shards[{i}] ({info.name}): sha256 must be a string, got {info.sha256!r}")
            if info.name in first:  # the dataset's directory listed it twice: its samples were read twice an epoch
                raise ValueError(f"manifest shards[{i}] ({info.name}) repeats the name of shards[{first[info.name]}]")
            first[info.name] = i
        self.vocab()  # validates the sizes

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.count for s in self.shards)

    def vocab(self, pad_to_multiple: int = 128) -> MultimodalVocab:
        """The vocabulary these shards were tokenized for, with the tokenizers' hashes the manifest records
        (``text_tokenizer.sha256``, ``image_tokenizer.checkpoint_sha256`` and ``weights_sha256``; one that is not a
        hex sha256 is left out)."""
        t, i = self.text_tokenizer, self.image_tokenizer
        return MultimodalVocab(
            n_text=int(t["n_text"]),
            n_codes=int(i["n_codes"]),
            grid_h=int(i["grid_h"]),
            grid_w=int(i["grid_w"]),
            num_sentinels=int(t.get("num_sentinels", DEFAULT_NUM_SENTINELS)),
            pad_to_multiple=pad_to_multiple,
            text_tokenizer_sha256=_sha256_or_none(t.get("sha256")),
            vqgan_sha256=_sha256_or_none(i.get("checkpoint_sha256")),
            vqgan_weights_sha256=_sha256_or_none(i.get("weights_sha256")),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready primitives."""
        return {
            "format_version": self.format_version,
            "created_by": self.created_by,
            "text_tokenizer": self.text_tokenizer,
            "image_tokenizer": self.image_tokenizer,
            "clip": self.clip,
            "retrieval": self.retrieval,
            "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256} for s in self.shards],
        }

    def text_tokenizer_path(self) -> str | None:
        """The BPE tokenizer's path: ``text_tokenizer.path`` as recorded, which ``cm3leon prepare`` writes relative
        to the manifest's folder (``tokenizer.json`` beside it), resolved against :attr:`location` when known."""
        path = self.text_tokenizer.get("path")
        if path is None or self.location is None or "://" in str(path) or os.path.isabs(path):
            return path
        return os.path.join(os.path.dirname(self.location), path)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse and validate a manifest dictionary."""
        if not isinstance(d, dict):
            raise ValueError(f"a manifest is a JSON object, got {type(d).__name__}")
        if "format_version" not in d:
            raise ValueError("manifest lacks format_version")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "location"})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary name, then rename)."""
        write_bytes_whole(path, json.dumps(self.to_dict(), indent=1).encode(), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], allow_remote: bool = False) -> Manifest:
        """Read ``manifest.json`` from a local path (or an fsspec URL when ``allow_remote``)."""
        try:
            data = json.loads(open_bytes(str(path), allow_remote))
            manifest = cls.from_dict(data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"cannot read manifest {path}: {e}") from e
        manifest.location = str(path)
        return manifest


def _as_list(shards: Any) -> list[Any]:
    """The manifest's ``shards``, which must be a list (a dict or a string was iterated by key or by character)."""
    if not isinstance(shards, list):
        raise ValueError(f"manifest shards must be a list of {{name, count, sha256}}, got {type(shards).__name__}")
    return shards


def _shard_info(i: int, entry: Any) -> ShardInfo:
    """Entry ``i`` of the manifest's ``shards`` as a :class:`ShardInfo`, its missing or unknown fields named."""
    if isinstance(entry, ShardInfo):
        return entry
    fields = ("name", "count", "sha256")
    if not isinstance(entry, dict):
        raise ValueError(f"manifest shards[{i}] must be an object with {list(fields)}, got {entry!r}")
    missing, unknown = [f for f in fields if f not in entry], sorted(set(entry) - set(fields))
    if missing or unknown:
        what = [f"lacks {missing}"] * bool(missing) + [f"has unknown field(s) {unknown}"] * bool(unknown)
        raise ValueError(f"manifest shards[{i}] {' and '.join(what)} (its fields: {list(fields)})")
    return ShardInfo(**entry)


def is_remote(url: str) -> bool:
    """Whether ``url`` is a ``pipe:`` command or a non-``file://`` URL (``file://`` and plain paths are local)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def open_bytes(url: str, allow_remote: bool = False) -> bytes:
    """All bytes of a local path, or of an fsspec URL / ``pipe:`` command when ``allow_remote`` is set."""
    if is_remote(url):
        if not allow_remote:
            raise ValueError(f"{url!r} is a remote URL or pipe; pass allow_remote=True to read it")
        if url.startswith("pipe:"):
            import subprocess

            done = subprocess.run(url[5:], shell=True, capture_output=True)
            if done.returncode:  # an OSError, so the reader skips and counts the shard as it does a missing file
                err = done.stderr.decode(errors="replace").strip().splitlines()
                raise OSError(f"{url}: exit {done.returncode}" + (f": {err[-1]}" if err else ""))
            return done.stdout
        import fsspec

        with fsspec.open(url, "rb") as f:
            return f.read()
    with open(url.removeprefix("file://"), "rb") as f:
        return f.read()


def read_shard(path: str | os.PathLike[str], manifest: Manifest) -> Iterator[ShardSample]:
    """Read and validate every sample of a local shard (raising on the first problem, naming the shard and key)."""
    vocab = manifest.vocab()
    with open(path, "rb") as f:
        for key, members in iter_tar_samples(f, str(path)):
            try:
                sample = decode_sample(key, members, vocab)
            except ShardFormatError as e:  # decode_sample names the key; the shard is known only here
                raise ShardFormatError(e.reason, f"shard {path}: {e}") from e
            yield sample


# ------------------------------------------------------------------------------------------------ writing
class ShardWriter:
    """Write samples into WebDataset shards of a set size, then ``manifest.json``.

    Each shard is written under a hidden temporary name and renamed when complete; the manifest is written last
    (also atomically), so a killed writer never leaves a dataset that looks complete. Tar headers carry fixed
    times and owners, so the same samples give byte-identical shards (and sha256).

    Args:
        out_dir: the dataset directory (created).
        text_tokenizer: ``path``, ``sha256``, ``n_text`` (and ``num_sentinels``) of the BPE tokenizer.
        image_tokenizer: ``checkpoint_sha256`` (the VQGAN file or directory), ``weights_sha256`` (its architecture and
            weights, however saved; manifests before it lack it), ``n_codes``, ``grid_h``, ``grid_w``, ``image_size``.
        clip: retriever ``model`` name and embedding ``dim``.
        retrieval: the retrieval settings used.
        samples_per_shard: start a new shard after this many samples.
        max_shard_bytes: or once a shard reaches this many bytes.
        overwrite: allow writing into a directory that already holds a manifest.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        text_tokenizer: dict[str, Any],
        image_tokenizer: dict[str, Any],
        clip: dict[str, Any] | None = None,
        retrieval: dict[str, Any] | None = None,
        samples_per_shard: int = 1000,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST_NAME).exists() and not overwrite:
            raise ValueError(f"{self.out_dir / MANIFEST_NAME} exists; pass overwrite=True to replace the dataset")
        self.manifest = Manifest(
            text_tokenizer=dict(text_tokenizer),
            image_tokenizer=dict(image_tokenizer),
            clip=dict(clip or {}),
            retrieval=dict(retrieval or {}),
        )
        self.vocab = self.manifest.vocab()
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._tmp: Path | None = None

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.manifest.shards))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        name = self._tmp.name[1:-4]
        final = self.out_dir / name
        self.manifest.shards.append(ShardInfo(name=name, count=self._count, sha256=file_sha256(self._tmp)))
        os.replace(self._tmp, final)
        self._tar, self._tmp = None, None

    def write(self, sample: ShardSample) -> str:
        """Validate and append one sample; returns its sanitised key.

        Raises:
            ValueError: a duplicate key, or a sample that the reader would reject (naming the field).
        """
        key = sanitize_key(sample.key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} (from {sample.key!r})")
        members = encode_sample(sample, self.vocab)
        decode_sample(key, members, self.vocab)  # refuse what the reader would skip
        if sample.segments is not None:
            self.manifest.format_version = SEGMENTS_FORMAT_VERSION
        if self._tar is None:
            self._open_shard()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        full = self._count >= self.samples_per_shard
        if self.max_shard_bytes is not None and self._tar.fileobj.tell() >= self.max_shard_bytes:
            full = True
        if full:
            self._close_shard()
        return key

    def write_all(self, samples: Sequence[ShardSample]) -> Manifest:
        """Write every sample, then close."""
        for s in samples:
            self.write(s)
        return self.close()

    def close(self) -> Manifest:
        """Finish the last shard and write ``manifest.json``; returns the manifest."""
        self._close_shard()
        self.manifest.save(self.out_dir / MANIFEST_NAME)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress (no manifest is written)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
