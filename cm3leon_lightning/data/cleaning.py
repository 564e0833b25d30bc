"""The rules that clean raw image-caption pairs for ``cm3leon prepare`` (the readers are in ``data/sources.py``).

Bad input is never fatal: :func:`clean_caption` and :func:`load_image` apply the rules below and raise
:class:`BadInput` with a counted ``reason``.

Caption rules: bytes are decoded as UTF-8 (a BOM is dropped); undecodable bytes, and unpaired surrogates in a string
(a JSON ``"\\ud800"`` escape), are replaced by U+FFFD and counted ``repaired_caption_non_utf8``. Control characters
become spaces and whitespace runs collapse to one space. Empty (or missing) after that: skipped, ``caption_empty`` /
``caption_missing``. Longer than ``max_chars``: cut at the last space before the limit (or at the limit) and counted
``repaired_caption_truncated``. A caption given as bytes gives the same text as the same caption given as a string; a
huge one is read only up to the text that the limit keeps. (The prepare pipeline also cuts BPE encodings longer than
``max_caption_tokens``, storing the caption decoded from the kept ids: ``repaired_caption_tokens``. An
instruction-tuning document is never cut, as its end holds the answer: it is skipped, ``text_too_long``.)

Image rules: missing file ``image_missing``; unreadable, truncated or decompression-bomb ``image_unreadable``;
shorter side below ``min_size`` pixels ``image_too_small`` (all skipped). An EXIF orientation other than upright is
applied (a phone photo stored sideways is turned as a viewer shows it) and counted ``repaired_image_orientation``. Any
mode other than RGB, and RGB with a transparent colour (a PNG ``tRNS`` chunk), is converted (transparent pixels
composited on white) and counted ``repaired_image_mode``.
"""

from __future__ import annotations

import codecs
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cm3leon_lightning.data.samples import SkipError

SKIP_REASONS = (
    "caption_missing",
    "caption_empty",
    "image_missing",
    "image_unreadable",
    "image_too_small",
    "duplicate_key",
    "text_too_long",
)
REPAIR_REASONS = (
    "repaired_caption_non_utf8",
    "repaired_caption_truncated",
    "repaired_caption_tokens",
    "repaired_image_mode",
    "repaired_image_orientation",
)
EXIF_ORIENTATION = 0x0112
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES = re.compile(r"\s+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PIECE = 1 << 16  # characters (str) or bytes (UTF-8) cleaned at a time


class BadInput(SkipError):
    """A raw pair that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    REASONS = SKIP_REASONS


def _pieces(caption: str | bytes) -> Iterator[tuple[str, bool]]:
    """``caption`` as text, in pieces of about :data:`_PIECE` characters, each with whether it decoded cleanly.

    Bytes are decoded as UTF-8 without a leading BOM, undecodable bytes (and a string's unpaired surrogates, which no
    tokenizer or file takes) replaced by U+FFFD; they are cut only before a byte that is not a continuation byte, so
    the pieces join to exactly the text of decoding the whole.
    """
    if isinstance(caption, str):  # lone surrogates (JSON's "\\ud800") are not text: U+FFFD as for bad bytes
        for i in range(0, len(caption), _PIECE):
            piece = caption[i : i + _PIECE]
            fixed = _SURROGATE.sub("\ufffd", piece)
            yield fixed, fixed == piece
        return
    i = len(codecs.BOM_UTF8) if caption.startswith(codecs.BOM_UTF8) else 0
    while i < len(caption):
        stop = cut = min(i + _PIECE, len(caption))
        while cut < len(caption) and cut > i + 1 and stop - cut < 3 and caption[cut] & 0xC0 == 0x80:
            cut -= 1  # back to the start of the character that ``stop`` falls in (at most 3 continuation bytes)
        if cut < len(caption) and caption[cut] & 0xC0 == 0x80:
            cut = stop  # 4 continuation bytes in a row: ``stop`` starts no character, nothing to keep together
        raw = caption[i:cut]
        try:
            yield raw.decode("utf-8"), True
        except UnicodeDecodeError:
            yield raw.decode("utf-8", errors="replace"), False
        i = cut


def _collapse(caption: str | bytes, max_chars: int) -> tuple[str, bool]:
    """Control characters -> spaces, whitespace runs -> one space, stripped; and whether the bytes decoded cleanly.

    Stops reading once more than ``max_chars + 1`` characters are known (all that the truncation rule looks at), so a
    megabyte caption costs one piece, and whitespace before the words never pushes them out.
    """
    parts: list[str] = []
    n, after_space, clean = 0, True, True
    for piece, ok in _pieces(caption):
        clean = clean and ok
        text = _SPACES.sub(" ", _CONTROL.sub(" ", piece))
        if after_space and text.startswith(" "):  # a run of spaces across two pieces, or leading spaces
            text = text[1:]
        if text:
            parts.append(text)
            n += len(text)
            after_space = text.endswith(" ")
        if n > max_chars + 1:
            break
    return "".join(parts).strip(), clean


def clean_caption(caption: str | bytes | None, max_chars: int = 1000) -> tuple[str, list[str]]:
    """Apply the caption rules (module docstring).

    Args:
        caption: the raw caption.
        max_chars: longer captions are truncated to at most this many characters (>= 1).

    Returns:
        The cleaned caption and the repair reasons that applied.

    Raises:
        BadInput: ``caption_missing`` or ``caption_empty``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if caption is None:
        raise BadInput("caption_missing", "no caption")
    text, decoded = _collapse(caption, max_chars)
    repairs = [] if decoded else ["repaired_caption_non_utf8"]
    if not text:
        raise BadInput("caption_empty", "caption is empty after removing whitespace and control characters")
    if len(text) > max_chars:
        cut = text[: max_chars + 1].rfind(" ")
        text = (text[:cut] if cut > 0 else text[:max_chars]).rstrip()
        repairs.append("repaired_caption_truncated")
    return text, repairs


def model_text(prompt: str, where: str = "prompt", what: str = "the prompt", allow_empty: bool = False) -> str:
    """The text of ``prompt`` that the model reads: the caption rule of ``cm3leon prepare`` (:func:`clean_caption`,
    never truncated here), so that a prompt's trailing space, newline, tab or doubled space tokenizes (and embeds with
    CLIP) as in training, where captions never hold them. Every inference entry point (``cm3leon predict``,
    ``generate``, ``serve``, the evaluation callbacks, retrieval queries) reads its prompts, instructions and questions
    through here; already cleaned text comes back unchanged. With ``allow_empty``, ``""`` comes back as it is (an
    empty instruction means plain captioning); whitespace alone is still refused.

    Raises:
        ValueError: naming ``where`` (and ``what`` the text is), for text with an unpaired surrogate (a JSON
            ``"\\ud800"`` escape, no text a tokenizer takes) or nothing left but whitespace and control characters;
            for anything but a ``str`` (None, a number, bytes).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: {what} must be a string, got {type(prompt).__name__} {prompt!r:.60}")
    if allow_empty and not prompt:
        return prompt
    try:
        text, repairs = clean_caption(prompt, max(1, len(prompt)))
    except BadInput as e:
        raise ValueError(f"{where}: {what} holds no text (only whitespace or control characters)") from e
    if repairs:  # a str is never truncated at its own length: only the surrogate repair is left
        raise ValueError(f"{where}: {what} holds an unpaired UTF-16 surrogate (a JSON \\ud800-\\udfff escape)")
    return text


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1: upright, 2-8: mirrored and/or turned); 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, TypeError, SyntaxError):  # malformed EXIF: read the pixels as stored
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as upright RGB: its EXIF orientation applied (as viewers show it), transparent pixels
    white, 16-bit grey scaled to 8 bits as viewers show it, ``v / 257`` (a plain ``convert("RGB")`` clips it to
    near-white). Preparation, training data modules, inference and evaluation all convert through here, so they see
    the same pixels."""
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    # A PNG tRNS chunk makes one colour transparent in P, L, RGB and 16-bit grey images alike (optipng writes RGBA
    # with binary alpha that way); convert("RGBA") turns it into alpha, but for 16-bit grey below.
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if image.mode == "RGB" and not transparent:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before converting
        arr = np.asarray(image, dtype=np.float64)
        # The transparent grey is matched at full depth: convert("RGBA") clips the grey to 8 bits before matching,
        # so a tRNS of 65535 made every pixel >= 255 transparent (white) and one of 1000 none.
        key = image.info.get("transparency") if transparent else None
        alpha = None if key is None else Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L")
        # As viewers show it: 16-bit grey over its full range (v / 257), not stretched to the image's own maximum (a
        # uniform 40000 became white, a dark scan full-range); 32-bit "I" holding 8-bit values stays as it is.
        deep = image.mode != "I" or (arr.size and arr.max() > 255)
        image = Image.fromarray(np.clip((arr / 257.0 if deep else arr).round(), 0, 255).astype(np.uint8), "L")
        if alpha is not None:
            image.putalpha(alpha)  # "LA"
    if transparent:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image: Path | bytes | np.ndarray | Image.Image | None, min_size: int = 32) -> tuple[Image.Image, list]:
    """Open and check one raw image per the image rules (module docstring).

    Args:
        image: a path, encoded bytes, a uint8 array ``(H, W)``/``(H, W, 3|4)`` or a PIL image.
        min_size: images whose shorter side is below this many pixels are skipped.

    Returns:
        The fully loaded RGB PIL image and the repair reasons that applied.

    Raises:
        BadInput: ``image_missing``, ``image_unreadable`` or ``image_too_small``.
    """
    if image is None:
        raise BadInput("image_missing", "no image")
    if isinstance(image, Path) and not image.is_file():
        raise BadInput("image_missing", f"image file not found: {image}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(image, np.ndarray):
                img = Image.fromarray(np.ascontiguousarray(image))
            elif isinstance(image, Image.Image):
                img = image
            else:
                img = Image.open(image if isinstance(image, Path) else io.BytesIO(image))
            img.load()  # decode now: truncated files fail here, not later
    except (
        OSError,
        ValueError,
        TypeError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise BadInput("image_unreadable", f"cannot decode image: {type(e).__name__}: {e}") from e
    if min(img.size) < min_size:
        raise BadInput(
            "image_too_small", f"image is {img.size[0]}x{img.size[1]}; the shorter side must be >= {min_size}"
        )
    repairs = [] if img.mode == "RGB" and "transparency" not in img.info else ["repaired_image_mode"]
    if exif_orientation(img) != 1:
        repairs.append("repaired_image_orientation")
    try:
        return to_rgb(img), repairs
    except (OSError, ValueError) as e:
        raise BadInput("image_unreadable", f"cannot convert image mode {img.mode}: {e}") from e


def source_jpeg(image: Path | bytes | np.ndarray | Image.Image, rgb: Image.Image, quality: int = 95) -> bytes:
    """The bytes kept as a sample's ``jpg`` member: the source file itself when it is a JPEG, else ``rgb`` encoded as
    JPEG at ``quality`` (deterministic for a given Pillow build)."""
    raw = image.read_bytes() if isinstance(image, Path) else image if isinstance(image, bytes) else None
    if raw is not None and raw[:3] == b"\xff\xd8\xff":
        return raw
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
