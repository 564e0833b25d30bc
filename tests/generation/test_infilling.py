"""Batched CM3 infilling (``generation/infilling.py``): documents of different lengths, whose text spans end at
different steps (empty, cut at the limit, in between) and whose image spans miss different numbers of codes, decode
in one batch to exactly what a no-cache greedy reference writes for each alone."""

import pytest
import torch
from test_generate import VOCAB, random_model

from cm3leon_lightning.generation import infill, infill_batch

V = VOCAB  # text 0..39, image codes 40..63, 2x3 images
S = V.sentinel_id
MAX_SPAN = 6


def document(before: list[int], after: list[int], visible: list[int]) -> list[int]:
    """``<eos> before <mask:0> after <break> code <mask:1> codes``: a text span, then an image span missing
    ``6 - len(visible)`` codes."""
    img = V.codes_to_ids(torch.tensor(visible)).tolist()
    return [V.eos_id, *before, S(0), *after, V.break_id, *img[:1], S(1), *img[1:]]


DOCS = [
    document([20, 21], [22], [1, 2, 3]),
    document([], [30, 31, 32], [4, 5, 6, 7]),
    document([25], [], [0, 8]),
    document([33, 34, 35, 36], [37], [9, 10, 11, 12, 13]),
]


def reference(model, body: list[int]) -> list[list[int]]:
    """Greedy, no cache, one document: the text span until a stop id (or MAX_SPAN), then ``<mask:1>`` and the
    missing image codes."""
    seq, spans = body + [V.infill_id, S(0)], []
    missing = V.image_tokens - sum(1 for t in body if t >= V.n_text)
    for i, (kind, steps) in enumerate((("text", MAX_SPAN), ("image", missing))):
        seq += [S(i)] if i else []
        span = []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0, -1]
            if kind == "text":
                text = logits[: V.n_text].clone()
                text[[V.pad_id, V.mask_id, V.infill_id]] = float("-inf")
                tok = int(text.argmax())
                if tok in (V.eos_id, V.break_id, *V.sentinel_ids):
                    break
            else:
                tok = int(logits[V.n_text : V.size].argmax()) + V.n_text
            span.append(tok)
            seq.append(tok)
        spans.append(span)
    return spans


@pytest.mark.parametrize("seed", [8, 11])
def test_a_batch_fills_each_document_as_a_no_cache_reference(seed: int) -> None:
    model = random_model(seed=seed)
    results = infill_batch(model, V, DOCS, max_span_tokens=MAX_SPAN, compile=False)
    text_lengths = {len(r.spans[0]) for r in results}
    assert 0 in text_lengths and MAX_SPAN in text_lengths and len(text_lengths) >= 3  # the rows really diverge
    assert [len(r.spans[1]) for r in results] == [3, 2, 4, 1]
    for doc, result in zip(DOCS, results):
        assert result.spans == reference(model, doc)
        masked = doc.index(S(0))
        assert result.ids[:masked] == doc[:masked]  # the document around the spans is kept
        assert result.ids == infill(model, V, doc, max_span_tokens=MAX_SPAN, compile=False).ids


def test_samples_of_one_document_share_a_decode_and_its_seed() -> None:
    model = random_model(seed=3)
    draw = dict(max_span_tokens=MAX_SPAN, method="top_p", top_p=0.95, temperature=1.5, compile=False)
    first = infill_batch(model, V, [DOCS[0]] * 4, seed=7, **draw)
    again = infill_batch(model, V, [DOCS[0]] * 4, seed=7, **draw)
    other = infill_batch(model, V, [DOCS[0]] * 4, seed=8, **draw)
    assert [r.ids for r in first] == [r.ids for r in again]
    assert [r.ids for r in first] != [r.ids for r in other]
    assert len({tuple(r.ids) for r in first}) > 1  # the rows sample independently
    largest = [infill_batch(model, V, [DOCS[0]] * 2, seed=2**63 - 1, **draw) for _ in range(2)]  # the top of the range
    assert [r.ids for r in largest[0]] == [r.ids for r in largest[1]]
    for r in first:
        assert len(r.spans[1]) == 3 and all(V.is_image_id(t) for t in r.spans[1])
        assert all(0 <= t < V.n_text for t in r.spans[0])


def test_batches_that_cannot_share_a_decode_are_refused() -> None:
    model = random_model()
    text_only = [V.eos_id, 20, S(0), 21]
    with pytest.raises(ValueError, match=r"document 1 has spans \['text'\], document 0 \['text', 'image'\]"):
        infill_batch(model, V, [DOCS[0], text_only], compile=False)
    with pytest.raises(ValueError, match="no documents given"):
        infill_batch(model, V, [], compile=False)
    with pytest.raises(ValueError, match="span_kinds has 1 entries for 2 documents"):
        infill_batch(model, V, [text_only, text_only], span_kinds=[None], compile=False)
    with pytest.raises(ValueError, match="infill document 1"):
        infill_batch(model, V, [text_only, [V.eos_id, 999, S(0)]], compile=False)
    with pytest.raises(ValueError, match=r"^infill: the ids hold no <mask:i> sentinel \(infill document 1\)$"):
        infill_batch(model, V, [text_only, [V.eos_id, 20, 21]], compile=False)
    for kwargs in ({"max_span_tokens": 0}, {"check_every": 0}, {"max_span_tokens": -3}):
        with pytest.raises(ValueError, match="max_span_tokens and check_every must be >= 1"):
            infill(model, V, text_only, compile=False, **kwargs)


def test_an_image_segment_with_two_masked_spans_is_refused() -> None:
    """Its missing codes could divide between the spans any way (each used to get all of them: 11 codes of 6)."""
    two = [V.eos_id, 20, 21, V.break_id, 40, S(0), 43, S(1), 45]
    with pytest.raises(ValueError, match="span 0: its image segment holds 2 masked spans"):
        infill(random_model(), V, two, compile=False)
    # two text spans in one segment are fine, and an image span beside a text segment counts its own codes only
    ok = [V.eos_id, 20, S(0), 21, S(1), V.break_id, 40, S(2), 43, 45]
    result = infill(random_model(), V, ok, max_span_tokens=3, compile=False)
    assert len(result.spans[2]) == 3 and V.ids_to_document(result.ids)[1].tokens.__len__() == 6


def test_ids_with_infill_or_padding_are_refused_naming_the_token() -> None:
    """DESIGN's captioning form ``<eos> <mask:0> <break> image <infill> <mask:0>`` passed whole was refused as "the
    sentinels must appear in order" (its second ``<mask:0>``); a ``<pad>`` inside a document was decoded as a token."""
    img = V.codes_to_ids(torch.arange(6)).tolist()
    whole = [V.eos_id, S(0), V.break_id, *img, V.infill_id, S(0)]
    with pytest.raises(ValueError, match=r"^infill: the ids hold <infill> at position 9; give the masked document"):
        infill(random_model(), V, whole, compile=False)
    with pytest.raises(ValueError, match=r"^infill: the ids hold <pad> at position 2; padding is no part"):
        infill(random_model(), V, [V.eos_id, 20, V.pad_id, S(0), V.break_id, *img], compile=False)
    result = infill(random_model(), V, whole[:-2], max_span_tokens=2, compile=False)  # the body alone is filled
    assert len(result.spans) == 1 and result.ids[1 + len(result.spans[0]) :] == [V.break_id, *img]


def test_sampled_spans_do_not_depend_on_check_every() -> None:
    """A text span that every row ended early stops at the next check, ``check_every`` steps apart: it drew fewer
    noise tensors, and every later span's samples changed with ``check_every`` (seed 2: span 1 ``[35]`` at 8 and
    ``[17, 25, 37, ...]`` at 1)."""
    img = V.codes_to_ids(torch.tensor([1, 2, 3, 4])).tolist()
    doc = [V.eos_id, 20, S(0), 21, S(1), 22, V.break_id, *img[:2], S(2), *img[2:]]  # text, text, image (2 codes)
    draw = dict(max_span_tokens=12, method="temperature", seed=3, compile=False)
    for model_seed in (2, 9):
        model = random_model(seed=model_seed)
        every_step = [r.spans for r in infill_batch(model, V, [doc] * 2, check_every=1, **draw)]
        every_8 = [r.spans for r in infill_batch(model, V, [doc] * 2, check_every=8, **draw)]
        assert every_step == every_8
        assert all(len(s[2]) == 2 and all(V.is_image_id(t) for t in s[2]) for s in every_step)
    assert any(len(span) < 12 for spans in every_step for span in spans[:2])  # a text span did end early
