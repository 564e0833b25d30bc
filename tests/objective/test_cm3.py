"""Tests for the CM3 infilling objective: exact examples, errors, and hypothesis properties over random documents."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_lightning.objective import cm3_infill, cm3_restore, find_segments
from cm3leon_lightning.objective.cm3 import check_infill_args
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment

VOCAB = MultimodalVocab(n_text=64, n_codes=16, grid_h=2, grid_w=2, num_sentinels=4)
EOS, BRK, INF, MASK = VOCAB.eos_id, VOCAB.break_id, VOCAB.infill_id, VOCAB.mask_id
M0, M1, M2, M3 = VOCAB.sentinel_ids
IMG = VOCAB.n_text  # id of image code 0


def img(*codes: int) -> list[int]:
    return [IMG + c for c in codes]


# ------------------------------------------------------------------------------------------------- strategies
text_segment = st.lists(st.integers(VOCAB.num_special, VOCAB.n_text - 1), min_size=0, max_size=7).map(Segment.text)
image_segment = st.lists(st.integers(0, VOCAB.n_codes - 1), min_size=4, max_size=4).map(Segment.image)
document = st.lists(st.one_of(text_segment, image_segment), min_size=1, max_size=4)
example = st.lists(document, min_size=1, max_size=4).map(
    lambda docs: np.asarray(VOCAB.example_to_ids(docs[:-1], docs[-1]), dtype=np.int64)
)
rates = st.sampled_from([0.0, 0.5, 1.0, 3.0, 20.0])
probs = st.sampled_from([0.0, 0.25, 1.0])


def original_spans(masked: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(start, end, tokens) of each span in the *original* sequence, parsed independently of cm3_restore."""
    p = int(np.flatnonzero(masked == INF)[0])
    body, tail = masked[:p], masked[p + 1 : -1]
    tail_sent = np.flatnonzero(np.isin(tail, VOCAB.sentinel_ids))
    spans_tokens = np.split(tail, tail_sent)[1:]  # each starts with its sentinel
    body_sent = np.flatnonzero(np.isin(body, VOCAB.sentinel_ids))
    out, shift = [], 0
    for pos, toks in zip(body_sent, spans_tokens):
        start = int(pos) + shift
        out.append((start, start + len(toks) - 1, toks[1:]))
        shift += len(toks) - 2
    return out


# -------------------------------------------------------------------------------------------- exact examples
def test_find_segments_splits_at_specials_and_modality_switches():
    ids = np.array([EOS, 10, 11, BRK, *img(1, 2), 12, MASK, 13, EOS, EOS])
    starts, ends = find_segments(ids, VOCAB)
    assert starts.tolist() == [1, 4, 6, 8]
    assert ends.tolist() == [3, 6, 7, 9]


def test_single_token_document_is_masked_whole():
    # One segment of length 1: any span is the whole token, whatever the generator draws.
    out = cm3_infill([EOS, 40, EOS], VOCAB, np.random.default_rng(0), rate=50.0)
    assert out.tolist() == [EOS, M0, INF, M0, 40, EOS]


def test_caption_and_image_masked_whole():
    ids = [EOS, 20, 21, BRK, *img(3, 4, 5, 6), EOS]
    out = cm3_infill(ids, VOCAB, np.random.default_rng(0), rate=50.0, whole_segment_prob=1.0)
    assert out.tolist() == [EOS, M0, BRK, M1, INF, M0, 20, 21, M1, *img(3, 4, 5, 6), EOS]


def test_fixed_seed_exact_output():
    # Pinned to numpy's Generator(PCG64) draws for seed 28: n = 3, one partial span in each segment (at the
    # start of the caption, at the end of the image, at the end of the second caption).
    ids = [EOS, 20, 21, 22, 23, BRK, *img(1, 2, 3, 4), EOS, 30, 31, 32, EOS]
    out = cm3_infill(ids, VOCAB, np.random.default_rng(28), rate=2.0, whole_segment_prob=0.0)
    expected = [EOS, M0, 21, 22, 23, BRK, *img(1, 2, 3), M1, EOS, 30, M2]
    expected += [INF, M0, 20, M1, *img(4), M2, 31, 32, EOS]
    assert out.tolist() == expected
    assert cm3_restore(out, VOCAB).tolist() == ids


def test_image_to_text_prompt_is_in_distribution():
    # The captioning prompt "<eos> <mask:0> <break> image <infill> <mask:0>" must be a prefix that training produces.
    caption, image = [20, 21, 22, 23, 24], img(7, 8, 9, 10)
    ids = [EOS, *caption, BRK, *image, EOS]
    prompt = [EOS, M0, BRK, *image, INF, M0]
    hits = 0
    for seed in range(400):
        out = cm3_infill(ids, VOCAB, np.random.default_rng(seed)).tolist()
        if out[: len(prompt)] == prompt:
            assert out == prompt + caption + [EOS]
            hits += 1
    # P = P(n=1) * P(caption chosen) * P(whole caption) = 0.368 * 0.5 * (0.25 + 0.75 * 2/30) ~ 0.055 -> ~22 / 400
    assert 8 <= hits <= 45


def test_rate_zero_returns_input_unchanged():
    ids = np.array([EOS, 20, 21, BRK, *img(1, 2, 3, 4), EOS], dtype=np.int32)
    out = cm3_infill(ids, VOCAB, np.random.default_rng(0), rate=0.0)
    assert out.dtype == np.int64 and out.tolist() == ids.tolist()
    assert out is not ids
    assert cm3_restore(out, VOCAB).tolist() == ids.tolist()


def test_no_maskable_segment_returns_input_unchanged():
    ids = [EOS, BRK, EOS, EOS]
    assert cm3_infill(ids, VOCAB, np.random.default_rng(0), rate=50.0).tolist() == ids


def test_number_of_spans_capped_at_sentinels():
    docs = [[Segment.text([20 + i])] for i in range(10)]
    ids = VOCAB.example_to_ids(docs[:-1], docs[-1])
    out = cm3_infill(ids, VOCAB, np.random.default_rng(0), rate=50.0)
    assert len(out) == len(ids) + 2 * VOCAB.num_sentinels + 1
    assert [int((out == s).sum()) for s in VOCAB.sentinel_ids] == [2, 2, 2, 2]


def test_input_is_not_modified():
    ids = np.array([EOS, 20, 21, 22, BRK, *img(1, 2, 3, 4), EOS])
    before = ids.copy()
    cm3_infill(ids, VOCAB, np.random.default_rng(0), rate=5.0)
    assert np.array_equal(ids, before)


# -------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("ids", "kwargs", "match"),
    [
        ([EOS, 20, 21], {}, "must end with <eos>"),
        ([], {}, "must end with <eos>"),
        ([EOS, 20, INF, EOS], {}, "reserved"),
        ([EOS, 20, M2, EOS], {}, r"id 7\)"),
        ([EOS, 200, EOS], {}, r"id 200 outside the allowed range \[0, 80\)"),
        ([EOS, -1, EOS], {}, r"id -1 outside"),
        ([EOS, 20, EOS], {"rate": -1.0}, "rate must be"),
        ([EOS, 20, EOS], {"rate": float("nan")}, "rate must be"),
        ([EOS, 20, EOS], {"whole_segment_prob": 1.5}, r"whole_segment_prob must lie in \[0, 1\]"),
        ([[EOS, 20, EOS]], {}, "must be 1-D"),
        ([1.0, 1.0], {}, "integer ids"),
    ],
)
def test_infill_rejects_bad_input(ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cm3_infill(np.asarray(ids), VOCAB, np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # YAML 1.1 reads ``1e-1`` as a string: the error must name the argument, not be a bare TypeError
        ({"rate": "1e-1"}, r"rate must be a finite number >= 0, got '1e-1'"),
        ({"rate": None}, r"rate must be a finite number >= 0, got None"),
        ({"rate": True}, r"rate must be a finite number >= 0, got True"),
        # numpy's Poisson refuses such a rate: it must be refused up front, not at the first batch in a worker
        ({"rate": 1e19}, r"rate must be at most 1000000 \(the number of spans is capped at K anyway\), got 1e\+19"),
        ({"whole_segment_prob": "0.5"}, r"whole_segment_prob must lie in \[0, 1\], got '0.5'"),
        ({"whole_segment_prob": False}, r"whole_segment_prob must lie in \[0, 1\], got False"),
    ],
)
def test_check_infill_args_names_the_argument_for_non_numbers_and_huge_rates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_infill_args(**kwargs)
    with pytest.raises(ValueError, match=match):
        cm3_infill([EOS, 20, EOS], VOCAB, np.random.default_rng(0), **kwargs)
    check_infill_args(rate=np.float32(2.0), whole_segment_prob=np.float64(0.5))  # numpy scalars are numbers
    check_infill_args(rate=1, whole_segment_prob=1)


@pytest.mark.parametrize(
    ("masked", "match"),
    [
        ([EOS, M0, EOS], "sentinels but no <infill>"),
        ([EOS, M0, INF, M0, 20, INF, EOS], "2 <infill>"),
        ([EOS, M0, INF, M0, 20], "must end with <eos>"),
        ([EOS, 20, INF], "must end with <eos>"),
        ([EOS, M1, INF, M1, 20, EOS], "unmatched sentinels"),
        ([EOS, M0, M1, INF, M0, 20, EOS], "unmatched sentinels"),
        ([EOS, 20, INF, M0, 20, EOS], "unmatched sentinels"),
        ([EOS, M0, 21, M1, INF, M1, 20, M0, 22, EOS], "must be"),
        ([EOS, M0, INF, 30, M0, 20, EOS], "first right after <infill>"),
        ([EOS, M0, INF, M0, 20, BRK, 21, EOS], "moved span 0 holds a special token"),
    ],
)
def test_restore_rejects_malformed_input(masked, match):
    with pytest.raises(ValueError, match=match):
        cm3_restore(np.asarray(masked), VOCAB)


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=200, deadline=None)
@given(ids=example, seed=st.integers(0, 2**32 - 1), rate=rates, whole=probs)
def test_restore_inverts_infill(ids, seed, rate, whole):
    out = cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=rate, whole_segment_prob=whole)
    assert out.dtype == np.int64
    assert np.array_equal(cm3_restore(out, VOCAB), ids)


def naive_segments(ids: list[int]) -> list[tuple[int, int]]:
    """Reference: maximal runs of non-special ids of one modality, by a plain loop."""
    out, start = [], None
    for i, t in enumerate([*ids, -1]):
        kind = -1 if t < VOCAB.num_special else int(t >= VOCAB.n_text)
        prev = -1 if i == 0 or ids[i - 1] < VOCAB.num_special else int(ids[i - 1] >= VOCAB.n_text)
        if start is not None and kind != prev:
            out.append((start, i))
            start = None
        if kind >= 0 and start is None:
            start = i
    return out


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from([EOS, BRK, MASK, 0, 20, 21, 63, IMG, IMG + 15]), max_size=20))
def test_find_segments_matches_reference(ids):
    starts, ends = find_segments(np.asarray(ids, dtype=np.int64), VOCAB)
    assert list(zip(starts.tolist(), ends.tolist())) == naive_segments(ids)


@settings(max_examples=100, deadline=None)
@given(ids=example, seed=st.integers(0, 2**32 - 1), rate=rates)
def test_same_seed_same_output(ids, seed, rate):
    a = cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=rate)
    b = cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=rate)
    assert np.array_equal(a, b)


@settings(max_examples=100, deadline=None)
@given(ids=example, seed=st.integers(0, 2**32 - 1))
def test_rate_zero_is_identity(ids, seed):
    assert np.array_equal(cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=0.0), ids)


@settings(max_examples=200, deadline=None)
@given(ids=example, seed=st.integers(0, 2**32 - 1), rate=rates, whole=probs)
def test_sentinel_pairs_match(ids, seed, rate, whole):
    out = cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=rate, whole_segment_prob=whole)
    if np.array_equal(out, ids):
        assert not np.isin(out, [INF, *VOCAB.sentinel_ids]).any()
        return
    infill = np.flatnonzero(out == INF)
    assert len(infill) == 1 and out[-1] == EOS
    p = int(infill[0])
    body_sent = out[:p][np.isin(out[:p], VOCAB.sentinel_ids)]
    tail_sent = out[p + 1 :][np.isin(out[p + 1 :], VOCAB.sentinel_ids)]
    n = len(body_sent)
    assert 1 <= n <= VOCAB.num_sentinels
    assert body_sent.tolist() == tail_sent.tolist() == VOCAB.sentinel_ids[:n]
    assert out[p + 1] == M0
    assert len(out) == len(ids) + 2 * n + 1


@settings(max_examples=200, deadline=None)
@given(ids=example, seed=st.integers(0, 2**32 - 1), rate=rates, whole=probs)
def test_spans_stay_inside_one_segment(ids, seed, rate, whole):
    out = cm3_infill(ids, VOCAB, np.random.default_rng(seed), rate=rate, whole_segment_prob=whole)
    if len(out) == len(ids):
        return
    starts, ends = find_segments(ids, VOCAB)
    seen_segments = set()
    for start, end, tokens in original_spans(out):
        assert end > start
        assert np.array_equal(ids[start:end], tokens)
        assert (tokens >= VOCAB.num_special).all(), "a span covers a special token"
        seg = np.flatnonzero((starts <= start) & (end <= ends))
        assert len(seg) == 1, f"span [{start}, {end}) crosses a segment boundary"
        assert int(seg[0]) not in seen_segments, "two spans in one segment"
        seen_segments.add(int(seg[0]))
        if whole == 1.0:
            assert (start, end) == (starts[seg[0]], ends[seg[0]])


def test_module_docstring_example_is_what_infill_writes():
    """The module docstring showed the masked body ending in ``image <eos>``; the final <eos> is dropped, so the body
    ends ``image`` and ``<infill>`` follows it (the captioning prompt's shape)."""
    from cm3leon_lightning.objective import cm3

    lines = [ln.strip().split("  ")[0].split() for ln in cm3.__doc__.split("::")[1].strip().splitlines()[:3]]
    names = {"<eos>": [EOS], "<break>": [BRK], "<infill>": [INF], "<mask:0>": [M0], "image": img(1, 2, 3, 4)}
    names.update(a=[20], b=[21], c=[22])
    example, body, tail = ([i for tok in line for i in names[tok]] for line in lines)
    # seed 26 draws one span, of the caption's middle token
    assert cm3_infill(example, VOCAB, np.random.default_rng(26)).tolist() == body + tail
