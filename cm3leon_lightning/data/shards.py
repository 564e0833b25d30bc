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
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cm3leon_lightning.tokenization.vocab import DEFAULT_NUM_SENTINELS, MultimodalVocab

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
REQUIRED_MEMBERS = ("caption.txt", "text.npy", "image.npy", "neighbors.json", "neighbors.npz")
FORBIDDEN_SUFFIXES = (".pyd", ".pkl", ".pth", ".pickle")
SKIP_REASONS = (
    "corrupt_shard",
    "sha256_mismatch",
    "corrupt_member",
    "missing_field",
    "ids_out_of_range",
    "image_length",
    "forbidden_member",
)


class ShardFormatError(ValueError):
    """A shard, sample or member that breaks the format; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; allowed: {SKIP_REASONS}")
        super().__init__(message)
        self.reason = reason


def sanitize_key(key: str) -> str:
    """A WebDataset-safe key: characters outside ``[A-Za-z0-9_-]`` (``/``, ``.``, spaces...) become ``_``.

    WebDataset splits a member name at the first dot of its base name, so a key can hold no dot at all.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", str(key))
    if not clean.strip("_"):
        raise ValueError(f"key {key!r} has no usable characters after sanitising (allowed: A-Z a-z 0-9 _ -)")
    return clean


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


# ------------------------------------------------------------------------------------------------- samples
@dataclass
class Neighbor:
    """One retrieved document stored with a sample.

    Attributes:
        key: the neighbour's document key.
        score: retriever relevance score.
        by: ``"text"`` or ``"image"``: which query embedding retrieved it.
        text: int32 caption ids (may be empty: no text segment).
        image: image codes ``(grid_h * grid_w,)`` (may be empty: no image segment).
    """

    key: str
    score: float
    by: str
    text: np.ndarray
    image: np.ndarray


@dataclass
class ShardSample:
    """One query document with its neighbours, as stored in a shard."""

    key: str
    caption: str
    text: np.ndarray
    image: np.ndarray
    neighbors: list[Neighbor] = field(default_factory=list)
    jpg: bytes | None = None


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
        image_tokenizer: ``checkpoint_sha256``, ``n_codes``, ``grid_h``, ``grid_w``, ``image_size``.
        clip: ``model`` name and embedding ``dim`` of the retriever.
        retrieval: the retrieval settings used (free-form primitives).
        shards: the shard files, in order.
        format_version: always :data:`FORMAT_VERSION` for this reader.
        created_by: the package version that wrote the shards.
    """

    text_tokenizer: dict[str, Any]
    image_tokenizer: dict[str, Any]
    clip: dict[str, Any] = field(default_factory=dict)
    retrieval: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    created_by: str = field(default_factory=package_version)

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )
        for section, keys in (
            ("text_tokenizer", ("n_text",)),
            ("image_tokenizer", ("n_codes", "grid_h", "grid_w")),
        ):
            missing = [k for k in keys if k not in getattr(self, section)]
            if missing:
                raise ValueError(f"manifest {section} lacks {missing}")
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        self.vocab()  # validates the sizes

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.count for s in self.shards)

    def vocab(self, pad_to_multiple: int = 128) -> MultimodalVocab:
        """The vocabulary these shards were tokenized for."""
        t, i = self.text_tokenizer, self.image_tokenizer
        return MultimodalVocab(
            n_text=int(t["n_text"]),
            n_codes=int(i["n_codes"]),
            grid_h=int(i["grid_h"]),
            grid_w=int(i["grid_w"]),
            num_sentinels=int(t.get("num_sentinels", DEFAULT_NUM_SENTINELS)),
            pad_to_multiple=pad_to_multiple,
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parse and validate a manifest dictionary."""
        if "format_version" not in d:
            raise ValueError("manifest lacks format_version")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary name, then rename)."""
        _atomic_write(Path(path), json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str], allow_remote: bool = False) -> Manifest:
        """Read ``manifest.json`` from a local path (or an fsspec URL when ``allow_remote``)."""
        try:
            data = json.loads(open_bytes(str(path), allow_remote))
            return cls.from_dict(data)
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"cannot read manifest {path}: {e}") from e


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_bytes(url: str, allow_remote: bool = False) -> bytes:
    """All bytes of a local path, or of an fsspec URL / ``pipe:`` command when ``allow_remote`` is set."""
    if url.startswith("pipe:") or "://" in url and not url.startswith("file://"):
        if not allow_remote:
            raise ValueError(f"{url!r} is a remote URL or pipe; pass allow_remote=True to read it")
        if url.startswith("pipe:"):
            import subprocess

            return subprocess.run(url[5:], shell=True, check=True, capture_output=True).stdout
        import fsspec

        with fsspec.open(url, "rb") as f:
            return f.read()
    with open(url.removeprefix("file://"), "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------- encoding
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: ShardSample, vocab: MultimodalVocab) -> dict[str, bytes]:
    """The tar members of one sample, by extension (``caption.txt``, ``text.npy``...)."""
    code_dtype = np.int16 if vocab.n_codes <= 32768 else np.int32
    arrays: dict[str, np.ndarray] = {}
    for i, nb in enumerate(sample.neighbors):
        arrays[f"text_{i}"] = np.asarray(nb.text, dtype=np.int32).reshape(-1)
        arrays[f"image_{i}"] = np.asarray(nb.image, dtype=code_dtype).reshape(-1)
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    members = {
        "caption.txt": sample.caption.encode("utf-8"),
        "text.npy": _npy(np.asarray(sample.text, dtype=np.int32).reshape(-1)),
        "image.npy": _npy(np.asarray(sample.image, dtype=code_dtype).reshape(-1)),
        "neighbors.json": json.dumps(
            [{"key": nb.key, "score": float(nb.score), "by": nb.by} for nb in sample.neighbors]
        ).encode(),
        "neighbors.npz": npz.getvalue(),
    }
    if sample.jpg is not None:
        members["jpg"] = bytes(sample.jpg)
    return members


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}\s*\n")


def load_npy(data: bytes) -> np.ndarray:
    """Read ``.npy`` bytes without pickle: a fast path for the 1-D integer arrays the writer makes, else numpy's
    reader (``allow_pickle=False``). Parsing numpy's header with ``ast`` costs more than the data at this size."""
    if data[:8] in (b"\x93NUMPY\x01\x00",) and len(data) >= 10:
        header_len = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.fullmatch(data[10 : 10 + header_len])
        if m is not None:
            dtype, n = np.dtype(m.group(1).decode()), int(m.group(2))
            return np.frombuffer(data, dtype=dtype, count=n, offset=10 + header_len)
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """Read ``.npz`` bytes (a zip of ``.npy`` members) without pickle."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name.removesuffix(".npy"): load_npy(zf.read(name)) for name in zf.namelist()}


def _load_array(data: bytes, name: str, key: str) -> np.ndarray:
    try:
        arr = load_npy(data)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError... on garbage
        raise ShardFormatError("corrupt_member", f"sample {key!r}: {name} is not a valid .npy array ({e})") from e
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ShardFormatError("corrupt_member", f"sample {key!r}: {name} must be a 1-D integer array")
    return arr


def _check_text(arr: np.ndarray, vocab: MultimodalVocab, what: str) -> np.ndarray:
    # Captions hold plain BPE ids: special ids (pad, eos, break, sentinels...) would corrupt the sequence.
    if arr.size and (arr.min() < vocab.num_special or arr.max() >= vocab.n_text):
        bad = int(arr[(arr < vocab.num_special) | (arr >= vocab.n_text)][0])
        raise ShardFormatError(
            "ids_out_of_range", f"{what}: text id {bad} outside the allowed range [{vocab.num_special}, {vocab.n_text})"
        )
    return arr.astype(np.int64)


def _check_image(arr: np.ndarray, vocab: MultimodalVocab, what: str, allow_empty: bool = False) -> np.ndarray:
    if not (allow_empty and arr.size == 0) and arr.size != vocab.image_tokens:
        raise ShardFormatError(
            "image_length", f"{what}: {arr.size} image codes; expected grid_h*grid_w = {vocab.image_tokens}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= vocab.n_codes):
        bad = int(arr[(arr < 0) | (arr >= vocab.n_codes)][0])
        raise ShardFormatError("ids_out_of_range", f"{what}: image code {bad} outside [0, {vocab.n_codes})")
    return arr.astype(np.int64)


def decode_sample(key: str, members: dict[str, bytes], vocab: MultimodalVocab) -> ShardSample:
    """Decode and validate one sample's members against the manifest's vocabulary.

    Raises:
        ShardFormatError: with reason ``forbidden_member``, ``missing_field``, ``corrupt_member``,
            ``ids_out_of_range`` or ``image_length``.
    """
    forbidden = [m for m in members if m.endswith(FORBIDDEN_SUFFIXES) or m in ("pyd", "pkl", "pth", "pickle")]
    if forbidden:
        raise ShardFormatError("forbidden_member", f"sample {key!r}: pickle member(s) {forbidden} are refused")
    missing = [m for m in REQUIRED_MEMBERS if m not in members]
    if missing:
        raise ShardFormatError("missing_field", f"sample {key!r}: missing member(s) {missing}")
    try:
        caption = members["caption.txt"].decode("utf-8")
        meta = json.loads(members["neighbors.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError("corrupt_member", f"sample {key!r}: caption.txt/neighbors.json unreadable ({e})") from e
    text = _check_text(_load_array(members["text.npy"], "text.npy", key), vocab, f"sample {key!r} text.npy")
    image = _check_image(_load_array(members["image.npy"], "image.npy", key), vocab, f"sample {key!r} image.npy")
    if not isinstance(meta, list) or not all(
        isinstance(m, dict)
        and isinstance(m.get("key"), str)
        and isinstance(m.get("score"), (int, float))
        and m.get("by") in ("text", "image")
        for m in meta
    ):
        raise ShardFormatError(
            "corrupt_member", f"sample {key!r}: neighbors.json must be a list of {{key, score, by: text|image}}"
        )
    try:
        stored = load_npz(members["neighbors.npz"])
    except Exception as e:
        raise ShardFormatError("corrupt_member", f"sample {key!r}: neighbors.npz unreadable ({e})") from e
    neighbors = []
    for i, m in enumerate(meta):
        what = f"sample {key!r} neighbour {i}"
        if f"text_{i}" not in stored or f"image_{i}" not in stored:
            raise ShardFormatError("missing_field", f"{what}: neighbors.npz lacks text_{i}/image_{i}")
        nt, ni = stored[f"text_{i}"], stored[f"image_{i}"]
        if any(a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) for a in (nt, ni)):
            raise ShardFormatError("corrupt_member", f"{what}: text_{i}/image_{i} must be 1-D integer arrays")
        if nt.size == 0 and ni.size == 0:
            raise ShardFormatError("missing_field", f"{what}: both text_{i} and image_{i} are empty")
        neighbors.append(
            Neighbor(
                key=m["key"],
                score=float(m["score"]),
                by=m["by"],
                text=_check_text(nt, vocab, what),
                image=_check_image(ni, vocab, what, allow_empty=True),
            )
        )
    return ShardSample(key=key, caption=caption, text=text, image=image, neighbors=neighbors, jpg=members.get("jpg"))


# -------------------------------------------------------------------------------------------- tar reading
def iter_tar_samples(stream: BinaryIO, name: str = "<stream>") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into ``(key, {extension: bytes})`` the way WebDataset does.

    Raises:
        ShardFormatError: reason ``corrupt_shard`` when the tar is truncated or garbled (after yielding the
            complete samples before the damage).
    """
    key, members = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k, ext = base.split(".", 1)
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError("corrupt_shard", f"shard {name}: unreadable tar after sample {key!r} ({e})") from e
    if key is not None:
        yield key, members


def read_shard(path: str | os.PathLike[str], manifest: Manifest) -> Iterator[ShardSample]:
    """Read and validate every sample of a local shard (raising on the first problem)."""
    vocab = manifest.vocab()
    with open(path, "rb") as f:
        for key, members in iter_tar_samples(f, str(path)):
            yield decode_sample(key, members, vocab)


# ------------------------------------------------------------------------------------------------ writing
class ShardWriter:
    """Write samples into WebDataset shards of a set size, then ``manifest.json``.

    Each shard is written under a hidden temporary name and renamed when complete; the manifest is written last
    (also atomically), so a killed writer never leaves a dataset that looks complete. Tar headers carry fixed
    times and owners, so the same samples give byte-identical shards (and sha256).

    Args:
        out_dir: the dataset directory (created).
        text_tokenizer: ``path``, ``sha256``, ``n_text`` (and ``num_sentinels``) of the BPE tokenizer.
        image_tokenizer: ``checkpoint_sha256``, ``n_codes``, ``grid_h``, ``grid_w``, ``image_size``.
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
