"""Masked documents from user input (``cm3leon generate --infill``): exact ids, span numbering and modalities, and
the errors that name the argument."""

import pytest

from cm3leon_lightning.generation.masking import infill_document, masked_text, parse_rows
from cm3leon_lightning.tokenization.text import TextTokenizer

CORPUS = ["a red circle in the center", "a blue square on the left", "two green triangles"] * 20


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def vocab(tok):
    return tok.make_vocab(n_codes=32, grid_h=4, grid_w=4)


def test_a_placeholder_masks_the_word_with_its_leading_space(tok, vocab):
    """Filling the sentinel of "a <mask> circle" with " red" gives the ids of "a red circle": the masked form is the
    one CM3 masking of the encoded caption produces."""
    ids = masked_text(tok.encode, vocab, "a <mask> circle in the <mask>")
    s0, s1 = vocab.sentinel_id(0), vocab.sentinel_id(1)
    assert ids == [*tok.encode("a"), s0, *tok.encode(" circle in the"), s1]
    i = ids.index(s0)
    filled = ids[:i] + tok.encode(" red") + ids[i + 1 : -1] + tok.encode(" center")
    assert filled == tok.encode("a red circle in the center")
    assert masked_text(tok.encode, vocab, "<mask>", first=3) == [vocab.sentinel_id(3)]
    with pytest.raises(ValueError, match="9 masks: the vocabulary has 8 sentinels"):
        masked_text(tok.encode, vocab, "<mask> " * 9)


def test_rows_of_an_image_become_one_image_span_after_the_text_spans(tok, vocab):
    codes = list(range(16))  # a 4x4 grid
    ids, kinds = infill_document(tok.encode, vocab, "a <mask> circle", codes, rows=(1, 3))
    image = [vocab.n_text + c for c in codes]
    head = [vocab.eos_id, *masked_text(tok.encode, vocab, "a <mask> circle"), vocab.break_id]
    assert ids == head + image[:4] + [vocab.sentinel_id(1)] + image[12:]
    assert kinds == ["text", "image"]
    ids, kinds = infill_document(tok.encode, vocab, "a red circle", codes, rows=(0, 4))  # the whole image
    assert ids[-2:] == [vocab.break_id, vocab.sentinel_id(0)] and kinds == ["image"]
    ids, kinds = infill_document(tok.encode, vocab, "a <mask>")  # text only
    assert ids == [vocab.eos_id, *tok.encode("a"), vocab.sentinel_id(0)] and kinds == ["text"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": "a red circle"}, "nothing to fill"),
        ({"text": "a <mask>", "rows": (0, 1)}, "--infill-rows redraws part of an image: give --image"),
        ({"text": "a <mask>", "codes": [1, 2, 3]}, "the image has 3 codes; the vocabulary's grid holds 16"),
    ],
)
def test_documents_that_cannot_be_filled_are_refused(tok, vocab, kwargs, message):
    with pytest.raises(ValueError, match=message):
        infill_document(tok.encode, vocab, **kwargs)


def test_rows_are_parsed_within_the_grid():
    assert parse_rows("1:3", 4) == (1, 3) and parse_rows(":2", 4) == (0, 2) and parse_rows("2:", 4) == (2, 4)
    for bad in ("3", "3:3", "0:5", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="--infill-rows must be A:B with 0 <= A < B <= 4"):
            parse_rows(bad, 4)
