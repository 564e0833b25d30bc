"""Masked documents for :func:`~cm3leon_lightning.generation.generate.infill` from what a user can type: a caption with
``<mask>`` placeholders, and grid rows of an image to redraw (CM3 infilling, paper section 2.2).

The spans are numbered in document order (``<mask:0>``, ``<mask:1>``, ...), as ``cm3_infill`` writes them. A
placeholder takes the space before it: byte-level BPE attaches a word's leading space to the word, so ``"a <mask>
circle"`` masks the span ``" red"`` of ``"a red circle"`` exactly as CM3 masking of the encoded caption would. This
module imports no Lightning and reads no files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cm3leon_lightning.tokenization.vocab import MultimodalVocab

MASK_PLACEHOLDER = "<mask>"
"""What marks a span to fill in a user's text."""


def parse_rows(text: str, grid_h: int) -> tuple[int, int]:
    """``"A:B"`` -> grid rows ``[A, B)`` of an image with ``grid_h`` rows (``":B"`` from the top, ``"A:"`` to the
    bottom). Raises ValueError naming ``--infill-rows`` for anything else."""
    start, sep, stop = text.partition(":")
    try:
        a, b = int(start or 0), int(stop) if stop else grid_h
    except ValueError:
        a = b = -1
    if not sep or not 0 <= a < b <= grid_h:
        raise ValueError(f"--infill-rows must be A:B with 0 <= A < B <= {grid_h} (grid rows), got {text!r}")
    return a, b


def masked_text(encode: Callable[[str], list[int]], vocab: MultimodalVocab, text: str, first: int = 0) -> list[int]:
    """Text ids with ``<mask:first>``, ``<mask:first+1>``, ... where ``text`` has :data:`MASK_PLACEHOLDER`.

    Args:
        encode: the text tokenizer's ``encode``.
        vocab: the vocabulary (for the sentinel ids and their number).
        text: e.g. ``"a <mask> circle in the <mask>"``.
        first: the number of the first sentinel.
    """
    pieces = text.split(MASK_PLACEHOLDER)
    if first + len(pieces) - 1 > vocab.num_sentinels:
        raise ValueError(f"{len(pieces) - 1} masks: the vocabulary has {vocab.num_sentinels} sentinels")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i < len(pieces) - 1:
            piece = piece.removesuffix(" ")  # the masked word brings its own leading space
        ids += encode(piece) if piece else []
        if i < len(pieces) - 1:
            ids.append(vocab.sentinel_id(first + i))
    return ids


def infill_document(
    encode: Callable[[str], list[int]],
    vocab: MultimodalVocab,
    text: str,
    codes: Sequence[int] | None = None,
    rows: tuple[int, int] | None = None,
) -> tuple[list[int], list[str]]:
    """The masked document ``<eos> text [<break> image]`` and the modality of each span, for ``infill``.

    Args:
        encode: the text tokenizer's ``encode``.
        vocab: the vocabulary.
        text: the caption, with :data:`MASK_PLACEHOLDER` where text is to be filled.
        codes: the image's ``grid_h * grid_w`` codes, or None for a text-only document.
        rows: grid rows ``[A, B)`` of the image to redraw (one span), or None.

    Raises:
        ValueError: no span to fill, rows without an image, or codes of the wrong length.
    """
    ids = [vocab.eos_id, *masked_text(encode, vocab, text)]
    kinds = ["text"] * sum(1 for t in ids if vocab.is_sentinel(t))
    if rows is not None and codes is None:
        raise ValueError("--infill-rows redraws part of an image: give --image")
    if codes is not None:
        codes = list(codes)
        if len(codes) != vocab.image_tokens:
            raise ValueError(f"the image has {len(codes)} codes; the vocabulary's grid holds {vocab.image_tokens}")
        image = vocab.codes_to_ids(codes).tolist()
        if rows is not None:
            a, b = rows[0] * vocab.grid_w, rows[1] * vocab.grid_w
            if len(kinds) >= vocab.num_sentinels:
                raise ValueError(f"{len(kinds) + 1} spans: the vocabulary has {vocab.num_sentinels} sentinels")
            image = image[:a] + [vocab.sentinel_id(len(kinds))] + image[b:]
            kinds.append("image")
        ids += [vocab.break_id, *image]
    if not kinds:
        raise ValueError(f"nothing to fill: put {MASK_PLACEHOLDER} in the text or give --infill-rows")
    return ids, kinds
