"""Tests for MultimodalVocab: id ranges, padded size, document round trips and validation errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment, sentinel_token, special_tokens

V = MultimodalVocab(n_text=64, n_codes=16, grid_h=2, grid_w=2, num_sentinels=4)


def test_special_token_layout():
    assert special_tokens(2) == ["<pad>", "<eos>", "<break>", "<mask>", "<infill>", "<mask:0>", "<mask:1>"]
    assert sentinel_token(3) == "<mask:3>"
    assert (V.pad_id, V.eos_id, V.break_id, V.mask_id, V.infill_id) == (0, 1, 2, 3, 4)
    assert V.sentinel_ids == [5, 6, 7, 8] and V.sentinel_id(3) == 8 and V.num_special == 9
    assert [V.is_sentinel(i) for i in (4, 5, 8, 9)] == [False, True, True, False]
    with pytest.raises(ValueError, match=r"sentinel index 4 outside \[0, 4\)"):
        V.sentinel_id(4)
    with pytest.raises(ValueError, match="num_sentinels must be >= 1, got 0"):
        special_tokens(0)


def test_sizes_and_padding():
    assert (V.size, V.padded_size, V.image_tokens, V.image_offset) == (80, 128, 4, 64)
    paper = MultimodalVocab(n_text=56320)
    assert paper.size == 56320 + 8192 and paper.padded_size == 64512 == 504 * 128
    odd = MultimodalVocab(n_text=50000, n_codes=8192)
    assert odd.padded_size == 58240 and odd.padded_size % 128 == 0 and odd.padded_size - odd.size < 128
    assert MultimodalVocab(n_text=64, n_codes=16, pad_to_multiple=1).padded_size == 80


def test_id_ranges():
    assert V.codes_to_ids([0, 15]).tolist() == [64, 79]
    assert V.ids_to_codes(np.array([64, 79])).tolist() == [0, 15]
    ids = np.array([0, 8, 63, 64, 79])
    assert V.is_text_id(ids).tolist() == [True, True, True, False, False]
    assert V.is_image_id(ids).tolist() == [False, False, False, True, True]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: V.codes_to_ids([3, 16]), r"image code 16 outside the allowed range \[0, 16\)"),
        (lambda: V.codes_to_ids([-1]), r"image code -1 outside the allowed range \[0, 16\)"),
        (lambda: V.ids_to_codes([64, 63]), r"id 63 is not an image id; image ids lie in \[64, 80\)"),
        (lambda: V.ids_to_codes([80]), r"id 80 is not an image id"),
        (lambda: V.validate_ids([0, 80], "batch"), r"batch: id 80 outside the allowed range \[0, 80\)"),
        (lambda: V.document_to_ids([Segment.text([10, 64])]), r"text id 64 outside the allowed range \[0, 64\)"),
        (lambda: V.document_to_ids([Segment.image([1, 2, 3, 16])]), r"image code 16 outside .*\[0, 16\)"),
        (
            lambda: V.document_to_ids([Segment.image([1, 2, 3])]),
            "image segment has 3 codes; expected grid_h\\*grid_w = 4",
        ),
        (lambda: V.document_to_ids([Segment.text([10, 1])]), "may not contain <eos> or <break>"),
        (lambda: V.document_to_ids([]), "at least one segment"),
        (lambda: V.document_to_ids([Segment("audio", (1,))]), "segment kind must be 'text' or 'image'"),
        (lambda: V.ids_to_document([10, 11]), "must start with <eos>"),
        (lambda: V.ids_to_document([1, 10, 1, 11]), "exactly one <eos>"),
        (lambda: V.ids_to_document([1, 10, 64]), "mixes text ids and image ids"),
        (lambda: V.ids_to_document([1, 10, 2, 64, 65]), "image segment has 2 codes; expected grid_h\\*grid_w = 4"),
        (lambda: V.ids_to_document([1, 99]), r"id 99 outside the allowed range \[0, 80\)"),
        (lambda: MultimodalVocab(n_text=9, num_sentinels=4), "n_text=9 must exceed the 9 special tokens"),
        (lambda: MultimodalVocab(n_text=64, n_codes=0), "n_codes must be >= 1, got 0"),
        (lambda: MultimodalVocab(n_text=64, grid_w=0), "grid_w must be >= 1, got 0"),
        (lambda: MultimodalVocab(n_text=64, pad_to_multiple=0), "pad_to_multiple must be >= 1, got 0"),
        (lambda: MultimodalVocab(n_text=64, num_sentinels=0), "num_sentinels must be >= 1"),
        (lambda: MultimodalVocab(n_text=64.5), "n_text must be an integer, got 64.5"),
        (lambda: MultimodalVocab(n_text=64, grid_h=True), "grid_h must be an integer, got True"),
    ],
)
def test_validation_errors_name_value_and_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_caption_image_document_serialization():
    doc = V.caption_image_document([10, 11, 12], [0, 1, 2, 3])
    assert V.document_to_ids(doc) == [1, 10, 11, 12, 2, 64, 65, 66, 67]
    flipped = V.caption_image_document([10], [0, 1, 2, 3], image_first=True)
    assert V.document_to_ids(flipped) == [1, 64, 65, 66, 67, 2, 10]


def test_example_and_prompt():
    query = [Segment.text([10]), Segment.image([4, 5, 6, 7])]
    retrieved = [[Segment.text([20, 21])], [Segment.image([0, 0, 0, 0])]]
    assert V.example_to_ids(retrieved, query) == [1, 20, 21, 1, 64, 64, 64, 64, 1, 10, 2, 68, 69, 70, 71, 1]
    assert V.example_to_ids([], query)[-1] == V.eos_id
    assert V.text_to_image_prompt([10, 11]) == [1, 10, 11, 2]


def test_to_dict_eq_hash_repr():
    same = MultimodalVocab(**V.to_dict())
    assert same == V and hash(same) == hash(V)
    assert MultimodalVocab(n_text=65, n_codes=16, grid_h=2, grid_w=2, num_sentinels=4) != V
    assert repr(V).startswith("MultimodalVocab(n_text=64, n_codes=16")


segment = st.one_of(
    st.lists(st.integers(V.num_special, V.n_text - 1), max_size=6).map(Segment.text),
    st.lists(st.integers(0, V.n_codes - 1), min_size=4, max_size=4).map(Segment.image),
)


@settings(max_examples=150, deadline=None)
@given(doc=st.lists(segment, min_size=1, max_size=5))
def test_document_round_trip(doc):
    ids = V.document_to_ids(doc)
    assert ids[0] == V.eos_id and ids.count(V.break_id) == len(doc) - 1
    assert V.ids_to_document(ids) == doc
    assert V.ids_to_document(np.asarray(ids)) == doc


def test_from_dict_inverts_to_dict_through_json():
    import json

    assert MultimodalVocab.from_dict(json.loads(json.dumps(V.to_dict()))) == V


def test_numpy_sizes_give_a_json_ready_to_dict():
    """Found in review: numpy integer sizes were kept as numpy scalars, so ``json.dumps(vocab.to_dict())`` (manifests,
    hyper-parameters) failed with "Object of type int64 is not JSON serializable"."""
    import json

    v = MultimodalVocab(n_text=np.int64(64), n_codes=np.int32(16), grid_h=2, grid_w=np.int16(2), num_sentinels=4)
    assert all(type(x) is int for x in v.to_dict().values())
    assert json.loads(json.dumps(v.to_dict())) == V.to_dict() and v == V


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (
            {"n_text": 64},
            r"model.json vocab: missing field\(s\) \['n_codes', 'grid_h', 'grid_w', 'num_sentinels', "
            r"'pad_to_multiple'\]; expected exactly",
        ),
        ({**V.to_dict(), "n_code": 16}, r"model.json vocab: unknown field\(s\) \['n_code'\]; expected exactly"),
        ([64, 16], r"model.json vocab: must be a mapping with keys \['n_text', .*\], got list"),
        ({**V.to_dict(), "grid_h": "2"}, r"model.json vocab: grid_h must be an integer, got '2'"),
        ({**V.to_dict(), "n_codes": 0}, r"model.json vocab: n_codes must be >= 1, got 0"),
    ],
)
def test_from_dict_errors_name_where_and_the_field(d, match):
    with pytest.raises(ValueError, match=match):
        MultimodalVocab.from_dict(d, "model.json vocab")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: V.codes_to_ids(np.array([1.5, 2.7])), r"image codes must hold integers, got dtype float64"),
        (lambda: V.codes_to_ids([0.0, 15.0]), r"image codes must hold integers, got dtype float64"),
        (lambda: V.ids_to_codes(np.array([64.9])), r"image ids must hold integers, got dtype float64"),
        (lambda: V.validate_ids(np.array([79.5]), "batch"), r"batch must hold integers, got dtype float64"),
        (lambda: V.ids_to_document([1.0, 20.5]), r"document must hold integers, got dtype float64"),
        (lambda: Segment.image([0.5, 1.5, 2.5, 3.9]), r"an image code must be an integer, got 0.5"),
        (lambda: Segment.text([20.7]), r"a text id must be an integer, got 20.7"),
        (lambda: V.sentinel_id(1.5), r"sentinel index must be an integer, got 1.5"),
        (lambda: V.codes_to_ids(np.array([2**63 + 1], np.uint64)), r"image code 9223372036854775809 outside"),
    ],
)
def test_float_ids_and_codes_are_refused_not_truncated(call, match):
    """Found in review: float ids and codes were truncated silently (codes 1.5, 2.7 became ids of codes 1 and 2,
    ``Segment.text([20.7])`` became id 20, ``sentinel_id(1.5)`` returned 6.5), and a uint64 code above the int64
    range was reported as a negative code."""
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_inputs_of_any_kind_are_still_accepted():
    import torch

    assert V.codes_to_ids(np.array([0, 15], np.uint8)).tolist() == [64, 79]
    assert V.codes_to_ids(torch.tensor([1, 2])).tolist() == [65, 66]
    assert V.codes_to_ids([]).tolist() == [] and V.validate_ids([]) is None
    assert Segment.text(torch.tensor([10, 11])) == Segment("text", (10, 11))
    assert Segment.image(np.array([1, 2], np.int16)) == Segment("image", (1, 2))
    assert V.sentinel_id(np.int64(2)) == 7
    assert V.ids_to_document(np.array([1, 10], np.int32)) == [Segment.text([10])]
