"""One sample of the shard format (DESIGN section 4): its members, their encoding, and validation on read.

Members of sample ``<key>``: ``caption.txt`` (UTF-8), ``text.npy`` (int32 caption ids), ``image.npy`` (int16 or
int32 codes, ``grid_h * grid_w`` of them), ``neighbors.json`` (``[{key, score, by}]`` in retrieval order),
``neighbors.npz`` (``text_i``, ``image_i`` per neighbour; an empty array means that modality is absent) and an
optional ``jpg``. A document with more segments than one caption and one image (instruction tuning: editing,
X-to-image; manifest format_version 2) adds ``segments.json`` (the kinds in order, ``"text"`` / ``"image"``) and
``segments.npz`` (``s0``, ``s1``...: text ids or image codes); they are the query document, and ``text.npy`` /
``image.npy`` then hold its text and output image for retrieval and evaluation. Arrays load without pickle;
``.pyd``/``.pkl``/``.pth`` members are refused. A problem raises :class:`ShardFormatError` whose ``reason`` (one of
:data:`SKIP_REASONS`) the data module counts.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from cm3leon_lightning.tokenization.vocab import MultimodalVocab

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
    "too_long",
)


class SkipError(ValueError):
    """Input that a pipeline skips and counts under ``reason``, which must be one of the class's ``REASONS``."""

    REASONS: tuple[str, ...] = ()

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; allowed: {self.REASONS}")
        super().__init__(message)
        self.reason = reason


class ShardFormatError(SkipError):
    """A shard, sample or member that breaks the format; ``reason`` is one of :data:`SKIP_REASONS`."""

    REASONS = SKIP_REASONS


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
    segments: list[tuple[str, np.ndarray]] | None = None  # the whole document, when it is more than caption + image


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
    if sample.segments is not None:
        seg = io.BytesIO()
        np.savez(seg, **{f"s{i}": np.asarray(a, np.int32 if k == "text" else code_dtype).reshape(-1)
                         for i, (k, a) in enumerate(sample.segments)})  # fmt: skip
        members["segments.json"] = json.dumps([k for k, _ in sample.segments]).encode()
        members["segments.npz"] = seg.getvalue()
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
    segments = decode_segments(key, members, vocab)
    return ShardSample(key, caption, text, image, neighbors, members.get("jpg"), segments)


def decode_segments(key: str, members: dict[str, bytes], vocab: MultimodalVocab) -> list[tuple[str, np.ndarray]] | None:
    """The ``segments.json`` / ``segments.npz`` document of a sample, validated; None when it has none."""
    if "segments.json" not in members and "segments.npz" not in members:
        return None
    if "segments.json" not in members or "segments.npz" not in members:
        raise ShardFormatError("missing_field", f"sample {key!r}: segments.json and segments.npz come together")
    try:
        kinds = json.loads(members["segments.json"])
        stored = load_npz(members["segments.npz"])
    except Exception as e:
        raise ShardFormatError("corrupt_member", f"sample {key!r}: segments.json/npz unreadable ({e})") from e
    if not isinstance(kinds, list) or not kinds or any(k not in ("text", "image") for k in kinds):
        raise ShardFormatError("corrupt_member", f"sample {key!r}: segments.json must be a list of 'text' / 'image'")
    out = []
    for i, kind in enumerate(kinds):
        what = f"sample {key!r} segment {i}"
        if f"s{i}" not in stored:
            raise ShardFormatError("missing_field", f"{what}: segments.npz lacks s{i}")
        arr = stored[f"s{i}"]
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
            raise ShardFormatError("corrupt_member", f"{what}: s{i} must be a non-empty 1-D integer array")
        out.append((kind, _check_text(arr, vocab, what) if kind == "text" else _check_image(arr, vocab, what)))
    return out
