"""One id space for text and image tokens (DESIGN section 3; paper section 2.1 and figure 8).

Layout::

    [0, n_text)                  text tokenizer ids; special tokens at fixed low ids:
                                 0 <pad>, 1 <eos>, 2 <break>, 3 <mask>, 4 <infill>, 5.. <mask:0>..<mask:K-1>
    [n_text, n_text + n_codes)   image codes: code c -> id n_text + c
    [n_text + n_codes, padded)   padding rows of the embedding, never produced or sampled

A *document* is a list of segments, text or image. Serialized it is ``<eos>`` followed by the segments joined by
``<break>``; an image segment is exactly ``grid_h * grid_w`` code ids.
"""

from __future__ import annotations

import numbers
import operator
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

PAD, EOS, BREAK, MASK, INFILL = "<pad>", "<eos>", "<break>", "<mask>", "<infill>"
BASE_SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BREAK, MASK, INFILL)
PAD_ID, EOS_ID, BREAK_ID, MASK_ID, INFILL_ID = range(5)
SENTINEL_OFFSET = len(BASE_SPECIAL_TOKENS)
DEFAULT_NUM_SENTINELS = 8
VOCAB_FIELDS: tuple[str, ...] = ("n_text", "n_codes", "grid_h", "grid_w", "num_sentinels", "pad_to_multiple")
IDENTITY_FIELDS: tuple[str, ...] = ("text_tokenizer_sha256", "vqgan_sha256", "vqgan_weights_sha256")
"""Optional fields naming the tokenizers behind the ids (hex sha256): the text tokenizer's ``tokenizer.json`` bytes
(a manifest's ``text_tokenizer.sha256``, :attr:`TextTokenizer.sha256`); the VQGAN file or directory ``cm3leon prepare``
read (a manifest's ``image_tokenizer.checkpoint_sha256``); the VQGAN's architecture and weights
(:func:`vqgan_weights_sha256`, recorded by ``cm3leon export`` beside the VQGAN it bundles, whose files it rewrites)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sentinel_token(i: int) -> str:
    """The string form of sentinel ``i``: ``<mask:i>``."""
    return f"<mask:{i}>"


def special_tokens(num_sentinels: int = DEFAULT_NUM_SENTINELS) -> list[str]:
    """All special tokens in id order: the five base tokens, then ``<mask:0>``..``<mask:K-1>``."""
    if num_sentinels < 1:
        raise ValueError(f"num_sentinels must be >= 1, got {num_sentinels}")
    return list(BASE_SPECIAL_TOKENS) + [sentinel_token(i) for i in range(num_sentinels)]


SegmentKind = Literal["text", "image"]


def _index(value: object, what: str) -> int:
    """``value`` as an int; a float (``1.5``, even ``2.0``) or a string raises instead of being truncated."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _int_array(values: np.ndarray | Sequence[int], what: str) -> np.ndarray:
    """``values`` as a numpy integer array (dtype kept); float, bool or object values raise instead of truncating."""
    arr = np.asarray(values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr


@dataclass(frozen=True)
class Segment:
    """One modality run inside a document.

    Attributes:
        kind: ``"text"`` (``tokens`` are text tokenizer ids) or ``"image"`` (``tokens`` are VQ codes in
            ``[0, n_codes)``, not vocabulary ids).
        tokens: the segment's ids or codes, 1-D.
    """

    kind: SegmentKind
    tokens: tuple[int, ...]

    @staticmethod
    def text(ids: Iterable[int]) -> Segment:
        """A text segment from text-tokenizer ids."""
        return Segment("text", tuple(_index(i, "a text id") for i in ids))

    @staticmethod
    def image(codes: Iterable[int]) -> Segment:
        """An image segment from VQ codes (``0 <= code < n_codes``)."""
        return Segment("image", tuple(_index(c, "an image code") for c in codes))


Document = list[Segment]


class MultimodalVocab:
    """The unified vocabulary of text ids and image codes, and the document <-> ids conversion.

    Args:
        n_text: size of the text tokenizer's vocabulary, special tokens included (paper: 56320).
        n_codes: number of image codes of the VQ tokenizer (paper: 8192).
        grid_h: image token grid height (paper: 32).
        grid_w: image token grid width (paper: 32).
        num_sentinels: number of ``<mask:i>`` sentinels K reserved in the text tokenizer.
        pad_to_multiple: the model's embedding size is ``n_text + n_codes`` rounded up to this.
        text_tokenizer_sha256, vqgan_sha256, vqgan_weights_sha256: which tokenizers the ids came from, when known
            (:data:`IDENTITY_FIELDS`). Equal sizes are not enough (another BPE of the same size gives the same ids
            other words), so :func:`check_same_tokenizers` compares them where tokenizers meet a model. They are
            not part of equality or hashing: two vocabularies are equal when their ids are laid out alike.
    """

    def __init__(
        self,
        n_text: int,
        n_codes: int = 8192,
        grid_h: int = 32,
        grid_w: int = 32,
        num_sentinels: int = DEFAULT_NUM_SENTINELS,
        pad_to_multiple: int = 128,
        text_tokenizer_sha256: str | None = None,
        vqgan_sha256: str | None = None,
        vqgan_weights_sha256: str | None = None,
    ) -> None:
        sizes = {"n_text": n_text, "n_codes": n_codes, "grid_h": grid_h, "grid_w": grid_w,
                 "num_sentinels": num_sentinels, "pad_to_multiple": pad_to_multiple}  # fmt: skip
        for name, value in sizes.items():  # a float (64.5) or a bool would give fractional ids and sizes
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if num_sentinels < 1:
            raise ValueError(f"num_sentinels must be >= 1 (CM3 masking needs <mask:0>), got {num_sentinels}")
        if n_text <= SENTINEL_OFFSET + num_sentinels:
            raise ValueError(f"n_text={n_text} must exceed the {SENTINEL_OFFSET + num_sentinels} special tokens")
        for name, value in (("n_codes", n_codes), ("grid_h", grid_h), ("grid_w", grid_w)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        # plain ints (a numpy integer would make to_dict() unserializable to JSON and YAML)
        self.n_text = int(n_text)
        self.n_codes = int(n_codes)
        self.grid_h = int(grid_h)
        self.grid_w = int(grid_w)
        self.num_sentinels = int(num_sentinels)
        self.pad_to_multiple = int(pad_to_multiple)
        hashes = {"text_tokenizer_sha256": text_tokenizer_sha256, "vqgan_sha256": vqgan_sha256,
                  "vqgan_weights_sha256": vqgan_weights_sha256}  # fmt: skip
        for name, value in hashes.items():
            if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
                raise ValueError(f"{name} must be a hex sha256 (64 lowercase hex digits) or None, got {value!r}")
        self.text_tokenizer_sha256: str | None = text_tokenizer_sha256
        self.vqgan_sha256: str | None = vqgan_sha256
        self.vqgan_weights_sha256: str | None = vqgan_weights_sha256

    @property
    def identity(self) -> dict[str, str]:
        """The tokenizer hashes this vocabulary records (:data:`IDENTITY_FIELDS` that are set)."""
        return {k: getattr(self, k) for k in IDENTITY_FIELDS if getattr(self, k) is not None}

    def layout(self) -> dict[str, int]:
        """The six size fields (:data:`VOCAB_FIELDS`): what equality compares."""
        return {k: getattr(self, k) for k in VOCAB_FIELDS}

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def size(self) -> int:
        """Number of real ids: ``n_text + n_codes``."""
        return self.n_text + self.n_codes

    @property
    def padded_size(self) -> int:
        """The model's embedding/LM-head size: :attr:`size` rounded up to ``pad_to_multiple``."""
        m = self.pad_to_multiple
        return (self.size + m - 1) // m * m

    @property
    def image_tokens(self) -> int:
        """Tokens per image segment: ``grid_h * grid_w``."""
        return self.grid_h * self.grid_w

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.n_text

    # ------------------------------------------------------------------------------------------ special ids
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    break_id: int = BREAK_ID
    mask_id: int = MASK_ID
    infill_id: int = INFILL_ID

    def sentinel_id(self, i: int) -> int:
        """Id of ``<mask:i>``."""
        i = _index(i, "sentinel index")
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel index {i} outside [0, {self.num_sentinels})")
        return SENTINEL_OFFSET + i

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<mask:0>``..``<mask:K-1>``."""
        return list(range(SENTINEL_OFFSET, SENTINEL_OFFSET + self.num_sentinels))

    def is_sentinel(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the ``<mask:i>`` sentinels."""
        return SENTINEL_OFFSET <= token_id < SENTINEL_OFFSET + self.num_sentinels

    @property
    def num_special(self) -> int:
        """Number of special ids at the bottom of the text range."""
        return SENTINEL_OFFSET + self.num_sentinels

    # -------------------------------------------------------------------------------------- image id ranges
    def codes_to_ids(self, codes: np.ndarray | Sequence[int]) -> np.ndarray:
        """Image codes ``(..., n)`` -> vocabulary ids, checking the code range (and that the codes are integers)."""
        arr = _int_array(codes, "image codes")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_codes):
            bad = int(arr[(arr < 0) | (arr >= self.n_codes)].flat[0])
            raise ValueError(f"image code {bad} outside the allowed range [0, {self.n_codes})")
        return arr.astype(np.int64) + self.n_text

    def ids_to_codes(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Vocabulary ids of an image segment -> codes, checking every id is an image id."""
        arr = _int_array(ids, "image ids")
        if arr.size and (arr.min() < self.n_text or arr.max() >= self.size):
            bad = int(arr[(arr < self.n_text) | (arr >= self.size)].flat[0])
            raise ValueError(f"id {bad} is not an image id; image ids lie in [{self.n_text}, {self.size})")
        return arr.astype(np.int64) - self.n_text

    def is_image_id(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of image ids (works on numpy arrays and torch tensors)."""
        return (ids >= self.n_text) & (ids < self.size)

    def is_text_id(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of text ids, special tokens included (numpy arrays and torch tensors)."""
        return (ids >= 0) & (ids < self.n_text)

    def validate_ids(self, ids: np.ndarray | Sequence[int], what: str = "ids") -> None:
        """Raise ValueError naming the first id outside ``[0, n_text + n_codes)``, or non-integer ids (floats)."""
        arr = _int_array(ids, what)
        if arr.size and (arr.min() < 0 or arr.max() >= self.size):
            bad = int(arr[(arr < 0) | (arr >= self.size)].flat[0])
            raise ValueError(f"{what}: id {bad} outside the allowed range [0, {self.size})")

    # ------------------------------------------------------------------------------------------ documents
    def _segment_ids(self, seg: Segment) -> list[int]:
        if seg.kind == "text":
            ids = list(seg.tokens)
            if ids and (min(ids) < 0 or max(ids) >= self.n_text):
                bad = next(i for i in ids if i < 0 or i >= self.n_text)
                raise ValueError(f"text id {bad} outside the allowed range [0, {self.n_text})")
            if any(i in (self.eos_id, self.break_id) for i in ids):
                raise ValueError("a text segment may not contain <eos> or <break>; they delimit segments")
            return ids
        if seg.kind == "image":
            if len(seg.tokens) != self.image_tokens:
                raise ValueError(
                    f"image segment has {len(seg.tokens)} codes; expected grid_h*grid_w = {self.image_tokens}"
                )
            return self.codes_to_ids(seg.tokens).tolist()
        raise ValueError(f"segment kind must be 'text' or 'image', got {seg.kind!r}")

    def document_to_ids(self, document: Sequence[Segment]) -> list[int]:
        """Serialize a document: ``<eos> seg_0 <break> seg_1 ...``.

        Raises:
            ValueError: empty document, an id or code out of range, or an image segment of the wrong length.
        """
        if not document:
            raise ValueError("a document needs at least one segment")
        out = [self.eos_id]
        for i, seg in enumerate(document):
            if i:
                out.append(self.break_id)
            out.extend(self._segment_ids(seg))
        return out

    def ids_to_document(self, ids: Sequence[int] | np.ndarray) -> Document:
        """Parse one serialized document (the inverse of :meth:`document_to_ids`).

        A segment whose ids are all image ids is an image segment (its length is checked); any other non-empty
        segment is text.
        """
        flat = np.asarray(ids).reshape(-1)
        self.validate_ids(flat, "document")  # before int(): a float id would be truncated
        arr = [int(i) for i in flat]
        if not arr or arr[0] != self.eos_id:
            raise ValueError("a serialized document must start with <eos>")
        if self.eos_id in arr[1:]:
            raise ValueError("a serialized document holds exactly one <eos>, at its start")
        segments: Document = []
        current: list[int] = []
        for tok in arr[1:] + [self.break_id]:
            if tok != self.break_id:
                current.append(tok)
                continue
            is_image = bool(current) and all(self.n_text <= t < self.size for t in current)
            if is_image:
                segments.append(Segment.image(self.ids_to_codes(current).tolist()))
                if len(current) != self.image_tokens:
                    raise ValueError(
                        f"image segment has {len(current)} codes; expected grid_h*grid_w = {self.image_tokens}"
                    )
            else:
                if any(self.n_text <= t for t in current):
                    raise ValueError("a segment mixes text ids and image ids; separate modalities with <break>")
                segments.append(Segment.text(current))
            current = []
        return segments

    def caption_image_document(
        self, text_ids: Sequence[int], codes: Sequence[int], image_first: bool = False
    ) -> Document:
        """The caption-image pair document (caption first by default, as in the paper's figure 8)."""
        segs = [Segment.text(text_ids), Segment.image(codes)]
        return segs[::-1] if image_first else segs

    def example_to_ids(self, retrieved: Sequence[Sequence[Segment]], query: Sequence[Segment]) -> list[int]:
        """A training example: retrieved documents first, the query document last, then a final ``<eos>``."""
        out: list[int] = []
        for doc in [*retrieved, query]:
            out.extend(self.document_to_ids(doc))
        out.append(self.eos_id)
        return out

    def text_to_image_prompt(self, text_ids: Sequence[int]) -> list[int]:
        """The zero-shot text-to-image prompt ``<eos> caption <break>``."""
        return self.document_to_ids([Segment.text(text_ids)]) + [self.break_id]

    def to_dict(self) -> dict[str, Any]:
        """Primitive description (plain ints, and the tokenizer hashes that are known), for manifests and
        hyper-parameters; :meth:`from_dict` inverts it. Without hashes it is exactly the six size fields."""
        return {**self.layout(), **self.identity}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "vocab") -> MultimodalVocab:
        """The inverse of :meth:`to_dict`: every size field is required, the tokenizer hashes
        (:data:`IDENTITY_FIELDS`) are optional (checkpoints older than them lack them), no other field is accepted.

        Args:
            d: the description, e.g. from a manifest, checkpoint hyper-parameters or a model config file.
            where: what ``d`` is, for error messages (a file name and key).

        Raises:
            ValueError: ``d`` is not a mapping, a field is missing or unknown, or a value is invalid; the message
                starts with ``where`` and names the field.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: must be a mapping with keys {list(VOCAB_FIELDS)}, got {type(d).__name__}")
        missing = [k for k in VOCAB_FIELDS if k not in d]
        unknown = sorted(str(k) for k in d if k not in VOCAB_FIELDS + IDENTITY_FIELDS)
        if missing or unknown:
            problems = ([f"missing field(s) {missing}"] if missing else []) + (
                [f"unknown field(s) {unknown}"] if unknown else []
            )
            raise ValueError(
                f"{where}: {', '.join(problems)}; expected exactly {list(VOCAB_FIELDS)} "
                f"(and optionally {list(IDENTITY_FIELDS)})"
            )
        try:
            return cls(**{k: d[k] for k in VOCAB_FIELDS + IDENTITY_FIELDS if k in d})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MultimodalVocab) and self.layout() == other.layout()

    def __hash__(self) -> int:
        return hash(tuple(self.layout().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.layout().items())
        hashes = "".join(f", {k}={short(v)}" for k, v in self.identity.items())
        return f"MultimodalVocab({args}{hashes})"


# ------------------------------------------------------------------------------------------ tokenizer identity
_WARNED: set[tuple[str, str]] = set()
_KINDS = {
    "text": ("text tokenizer", ("text_tokenizer_sha256",)),
    "vqgan": ("VQGAN", ("vqgan_sha256", "vqgan_weights_sha256")),
}
_LABELS = {"text_tokenizer_sha256": "sha256", "vqgan_sha256": "sha256", "vqgan_weights_sha256": "weights sha256"}


def short(sha256: str) -> str:
    """The first 12 hex digits of a sha256, as messages print it."""
    return sha256[:12]


def vqgan_weights_sha256(vqgan: Any) -> str:
    """Hex sha256 of a VQGAN's architecture (``config.to_dict()``) and weights (every state-dict tensor's name, dtype,
    shape and bytes): the same for the same model however its files are laid out (taming's, ours, a re-export)."""
    import hashlib
    import json

    import torch

    h = hashlib.sha256(json.dumps(vqgan.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(vqgan.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\n{name} {t.dtype} {t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _describe(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{_LABELS[k]} {short(record[k])}" for k in keys if record.get(k))


def check_same_tokenizer(
    kind: Literal["text", "vqgan"],
    model: Mapping[str, Any],
    model_source: str,
    other: Mapping[str, Any],
    other_source: str,
    hint: str = "",
    warn_unchecked: bool | None = None,
) -> bool:
    """Compare the text tokenizer (``kind="text"``) or VQGAN (``"vqgan"``) hashes a model's vocabulary records
    (:data:`IDENTITY_FIELDS`) with another record's: the data's manifest, or the tokenizer files given.

    A VQGAN matches when its file hash or its weights hash equals the model's. When the two sides record no hash in
    common (a checkpoint saved before they were recorded), a warning says the tokenizer cannot be checked, once per
    ``model_source`` and ``kind``: by default when one side records a hash and the other none (two sides that both
    record none, such as an in-memory data module, are not worth a warning).

    Args:
        kind: which tokenizer.
        model: the model's vocabulary description (``MultimodalVocab.to_dict()`` or ``identity``).
        model_source: the model's file, for messages (``"--ckpt runs/last.ckpt"``).
        other: the other side's hashes.
        other_source: the other side, for messages (``"--tokenizer tok/tokenizer.json"``).
        hint: appended to the error (what to do).
        warn_unchecked: warn whenever the hashes could not be compared (True: ``other`` is a tokenizer given by the
            user, hashed only where the model records a hash to compare with), or never (False).

    Returns:
        True when the hashes were compared and matched; False when they could not be compared.

    Raises:
        ValueError: the hashes differ; the message names both sources and their short hashes.
    """
    what, keys = _KINDS[kind]
    pairs = [(model[k], other[k]) for k in keys if model.get(k) and other.get(k)]
    if pairs and not any(a == b for a, b in pairs):
        raise ValueError(
            f"{what} mismatch: {model_source} records the {what} of {_describe(model, keys)}, but "
            f"{other_source} has {_describe(other, keys)} (a vocabulary of the same size is not enough: the same ids "
            f"would mean other {'words' if kind == 'text' else 'image codes'}){hint}"
        )
    if pairs:
        return True
    has_model, has_other = any(model.get(k) for k in keys), any(other.get(k) for k in keys)
    if warn_unchecked is None:
        warn_unchecked = has_model != has_other
    if warn_unchecked and (model_source, kind) not in _WARNED:
        _WARNED.add((model_source, kind))
        missing = other_source if has_model else model_source
        warnings.warn(
            f"the {what} cannot be checked: {missing} has no {what} hash to compare (saved before they were "
            f"recorded); make sure {other_source} is the {what} {model_source} was trained with",
            stacklevel=2,
        )
    return False
