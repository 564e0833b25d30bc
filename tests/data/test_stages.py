"""Pipeline stages: exact sequences, retrieved-document choice, context fitting, masking, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sample

from cm3leon_lightning.data.shards import Neighbor, ShardFormatError, ShardSample
from cm3leon_lightning.data.stages import (
    CHOICE_STREAM,
    SFT_KEY_PREFIX,
    Example,
    PipelineConfig,
    build_example,
    choose_retrieved,
    collate,
    fit_to_context,
    may_cut_caption,
    sample_rng,
)
from cm3leon_lightning.objective.cm3 import cm3_restore
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment

VOCAB = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=2)  # 13 special ids, image ids 64..95


def hand_sample() -> ShardSample:
    a = np.array
    return ShardSample(
        key="q",
        caption="query",
        text=a([20, 21]),
        image=a([0, 1, 2, 3]),
        neighbors=[
            Neighbor("n0", 0.8, "text", a([30]), a([4, 5, 6, 7])),
            Neighbor("n1", 0.7, "image", a([40, 41]), a([8, 9, 10, 11])),
        ],
    )


def cfg(**kw) -> PipelineConfig:
    base = dict(vocab=VOCAB, max_retrieved=3, no_retrieval_share=0.0, infill=False, slot_len=64)
    return PipelineConfig(**{**base, **kw})


def test_exact_ids_with_two_neighbours() -> None:
    ex = build_example(hand_sample(), cfg(), epoch=0)
    # <eos> 30 <break> img(4..7) <eos> 40 41 <break> img(8..11) <eos> 20 21 <break> img(0..3) <eos>
    want = [1, 30, 2, 68, 69, 70, 71, 1, 40, 41, 2, 72, 73, 74, 75, 1, 20, 21, 2, 64, 65, 66, 67, 1]
    assert ex.ids.tolist() == want
    assert (ex.key, ex.n_retrieved, ex.dropped_retrieved, ex.truncated_tokens) == ("q", 2, 0, 0)
    docs = [[Segment.text(t), Segment.image(i)] for t, i in (([30], [4, 5, 6, 7]), ([40, 41], [8, 9, 10, 11]))]
    assert VOCAB.example_to_ids(docs, [Segment.text([20, 21]), Segment.image([0, 1, 2, 3])]) == want
    flipped = build_example(hand_sample(), cfg(image_first_prob=1.0), epoch=0).ids.tolist()
    assert flipped[:8] == [1, 68, 69, 70, 71, 2, 30, 1]  # image first when configured
    assert flipped[-9:] == [1, 64, 65, 66, 67, 2, 20, 21, 1]


def test_a_document_with_segments_keeps_its_order_and_is_never_cut() -> None:
    sample = hand_sample()
    sample.segments = [("text", np.array([50])), ("image", np.array([0, 1, 2, 3])), ("text", np.array([51, 52])),
                       ("image", np.array([4, 5, 6, 7]))]  # fmt: skip
    query = [1, 50, 2, 64, 65, 66, 67, 2, 51, 52, 2, 68, 69, 70, 71]  # <eos> text <break> img <break> text <break> img
    ex = build_example(sample, cfg(max_retrieved=0), epoch=0)
    assert ex.ids.tolist() == [*query, 1]
    flipped = build_example(sample, cfg(max_retrieved=0, image_first_prob=1.0), epoch=0)
    assert flipped.ids.tolist() == [*query, 1]  # the document's own order, whatever image_first_prob says
    with_neighbour = build_example(sample, cfg(slot_len=24), epoch=0)  # room for the first neighbour only
    assert with_neighbour.ids.tolist() == [1, 30, 2, 68, 69, 70, 71, *query, 1]
    assert (with_neighbour.n_retrieved, with_neighbour.dropped_retrieved) == (1, 1)
    with pytest.raises(ShardFormatError, match="do not fit") as err:
        build_example(sample, cfg(slot_len=15), epoch=0)
    assert err.value.reason == "too_long"


@pytest.mark.parametrize(
    ("slot", "want", "dropped", "truncated"),
    [
        (24, [1, 30, 2, 68, 69, 70, 71, 1, 40, 41, 2, 72, 73, 74, 75, 1, 20, 21, 2, 64, 65, 66, 67, 1], 0, 0),
        (23, [1, 30, 2, 68, 69, 70, 71, 1, 20, 21, 2, 64, 65, 66, 67, 1], 1, 0),  # the last retrieved doc goes first
        (15, [1, 20, 21, 2, 64, 65, 66, 67, 1], 2, 0),
        (8, [1, 20, 2, 64, 65, 66, 67, 1], 2, 1),  # then the caption is cut from its end
        (7, [1, 64, 65, 66, 67, 1], 2, 2),  # no caption left: the <break> goes too; the image is whole
    ],
)
def test_fit_to_context_drops_retrieved_then_truncates_caption(slot, want, dropped, truncated) -> None:
    ex = build_example(hand_sample(), cfg(slot_len=slot), epoch=0)
    assert ex.ids.tolist() == want
    assert (ex.dropped_retrieved, ex.truncated_tokens) == (dropped, truncated)
    assert len(want) <= slot


def test_an_sft_text_that_does_not_fit_is_skipped_not_cut_from_its_answer() -> None:
    """An SFT document's caption is its instruction then its answer (``Question: ... Answer: red.``, text before the
    image). It was cut from its end like any caption: the answer, the training target, went first and the question
    stayed, with only the generic caption-cut warning. Such a sample is now skipped as ``too_long`` (like a
    document with segments); ``cut_captions`` says otherwise for every sample."""
    sample = hand_sample()
    sample.key, sample.text = "sft-vqa-3-0", np.array([20, 21, 22])  # 10 tokens alone (with the final <eos>)
    whole = build_example(sample, cfg(slot_len=10), epoch=0)  # both neighbours dropped, the text whole
    assert whole.ids.tolist() == [1, 20, 21, 22, 2, 64, 65, 66, 67, 1]
    assert (whole.n_retrieved, whole.dropped_retrieved, whole.truncated_tokens) == (0, 2, 0)
    with pytest.raises(ShardFormatError, match=(
        r"sample 'sft-vqa-3-0': its 3 text and 4 image tokens need 10 tokens, more than the 9 that seq_len // pack "
        r"leaves after the masking reserve, and its text is never cut \(an SFT document's text ends with its "
        r"answer\); raise seq_len or lower pack")) as err:  # fmt: skip
        build_example(sample, cfg(slot_len=9), epoch=0)
    assert err.value.reason == "too_long"
    for image_first in (0.0, 1.0):  # image first, the answer is still the end
        with pytest.raises(ShardFormatError, match="never cut"):
            build_example(sample, cfg(slot_len=9, image_first_prob=image_first), epoch=0)
    cut = build_example(sample, cfg(slot_len=9, cut_captions=True), epoch=0)
    assert (cut.ids.tolist(), cut.truncated_tokens) == ([1, 20, 21, 2, 64, 65, 66, 67, 1], 1)
    sample.key = "doc-7"  # a pretraining caption is cut, unless cut_captions=False
    assert build_example(sample, cfg(slot_len=9), epoch=0).ids.tolist() == cut.ids.tolist()
    with pytest.raises(ShardFormatError, match=r"never cut \(cut_captions=False\)"):
        build_example(sample, cfg(slot_len=9, cut_captions=False), epoch=0)
    assert [may_cut_caption(k, c) for k in ("sft-a-1-0", "doc-1") for c in (None, True, False)] == [
        False, True, False, True, True, False
    ]  # fmt: skip
    with pytest.raises(ValueError, match="cut_captions must be true, false or null .*got 'no'"):
        cfg(cut_captions="no")


def test_sft_source_keys_carry_the_prefix_the_pipeline_reads(tmp_path) -> None:
    """The automatic rule recognises instruction-tuning documents by the key ``cm3leon prepare --source sft`` gives
    them: a change of those keys would silently cut answers again."""
    from cm3leon_lightning.data.sft import SFTSource

    lines = ['{"task": "vqa", "image": "a.jpg", "question": "Colour?", "answer": "red"}',
             '{"task": "caption", "image": "b.jpg", "caption": "a red circle"}']  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    source = SFTSource(tmp_path / "tasks.jsonl", up=1.0, down=1.0)
    keys = sorted(pair.key for pair in source.iter_range(0, len(source)))
    assert keys == ["sft-tasks-1-0", "sft-tasks-2-0"]
    assert all(key.startswith(SFT_KEY_PREFIX) and not may_cut_caption(key) for key in keys)


def test_fit_drops_the_least_relevant_retrieved_document_not_the_last_stored() -> None:
    """neighbors.json lists the text search's picks, then the image search's: the last stored is not the least
    relevant. Dropping the last always dropped an image pick (found in review: at 4096 tokens and 32x32 grids only
    two of three documents fit, so the image search's second pick was never trained on)."""
    a = np.array
    sample = hand_sample()
    sample.neighbors = [
        Neighbor("t1", 0.8, "text", a([30]), a([4, 5, 6, 7])),  # 7 tokens
        Neighbor("t2", 0.6, "text", a([31]), a([12, 13, 14, 15])),  # 7 tokens, the least relevant
        Neighbor("i1", 0.85, "image", a([40, 41]), a([8, 9, 10, 11])),  # 8 tokens, the most relevant
    ]
    t1, i1, query = [1, 30, 2, 68, 69, 70, 71], [1, 40, 41, 2, 72, 73, 74, 75], [1, 20, 21, 2, 64, 65, 66, 67, 1]
    everything = build_example(sample, cfg(slot_len=31), epoch=0)
    assert everything.ids.tolist() == [*t1, 1, 31, 2, 76, 77, 78, 79, *i1, *query]  # all three, in retrieval order
    two = build_example(sample, cfg(slot_len=24), epoch=0)
    assert two.ids.tolist() == [*t1, *i1, *query]  # t2 (0.6) goes, not i1 (the last stored)
    assert (two.n_retrieved, two.dropped_retrieved) == (2, 1)
    one = build_example(sample, cfg(slot_len=17), epoch=0)
    assert one.ids.tolist() == [*i1, *query]  # then t1 (0.8) before i1 (0.85)
    assert (one.n_retrieved, one.dropped_retrieved) == (1, 2)


def test_fit_to_context_never_cuts_an_image() -> None:
    assert fit_to_context([9, 8], 2, 4, 6) == (0, 0)
    with pytest.raises(ValueError, match="one image document needs 6 tokens, budget is 5"):
        fit_to_context([], 2, 4, 5)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_share_without_retrieval_matches_setting(share: float) -> None:
    neighbors = make_sample(0).neighbors
    chosen = [choose_retrieved(neighbors, sample_rng(0, 0, f"doc-{i}", CHOICE_STREAM), 3, share) for i in range(2000)]
    none = sum(not c for c in chosen) / len(chosen)
    assert abs(none - share) < 0.03
    kept = [c for c in chosen if c]
    assert all(len(c) == 3 for c in kept)
    # a random subset of the stored neighbours, kept in retrieval order, covering all of them over many samples
    orders = {tuple(n.key for n in c) for c in kept}
    assert all(list(o) == sorted(o) for o in orders)
    assert share == 1.0 or len(orders) == 4


def test_choices_depend_on_seed_epoch_and_key_only() -> None:
    neighbors = make_sample(0).neighbors

    def pick(seed: int, epoch: int, key: str) -> list[str]:
        return [n.key for n in choose_retrieved(neighbors, sample_rng(seed, epoch, key, CHOICE_STREAM), 2, 0.0)]

    assert pick(0, 0, "a") == pick(0, 0, "a")
    keys = [f"k{i}" for i in range(20)]
    assert [pick(0, 0, k) for k in keys] != [pick(0, 1, k) for k in keys]
    assert [pick(0, 0, k) for k in keys] != [pick(1, 0, k) for k in keys]


def test_masking_is_seeded_and_invertible() -> None:
    masked_any = 0
    for i in range(20):
        sample = make_sample(i)
        plain = build_example(sample, cfg(), epoch=3)
        masked = build_example(sample, cfg(infill=True), epoch=3)
        assert cm3_restore(masked.ids, VOCAB).tolist() == plain.ids.tolist()
        assert masked.ids.tolist() == build_example(sample, cfg(infill=True), epoch=3).ids.tolist()
        assert masked.ids.size <= 64
        masked_any += masked.ids.size > plain.ids.size
    assert masked_any >= 10


def test_masking_reserve_keeps_examples_within_the_slot() -> None:
    c = cfg(infill=True, slot_len=24 + 17)
    assert c.budget == 24  # 2 K + 1 = 17 tokens reserved for sentinels and <infill>
    assert build_example(hand_sample(), c, epoch=0).n_retrieved == 2
    assert build_example(hand_sample(), cfg(infill=True, slot_len=23 + 17), epoch=0).n_retrieved == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"seed": -1}, r"seed must be an integer >= 0 \(it seeds numpy's generators\), got -1"),
        ({"seed": 1.5}, r"seed must be an integer >= 0 .*got 1.5"),
        ({"infill_kwargs": {"rat": 1.0}}, r"infill_kwargs: unknown key\(s\) \['rat'\]; cm3_infill takes rate, "),
        ({"infill_kwargs": {"rate": -1.0}}, r"infill_kwargs: rate must be a finite number >= 0, got -1.0"),
        ({"infill_kwargs": {"whole_segment_prob": 2}}, r"infill_kwargs: whole_segment_prob must lie in \[0, 1\]"),
    ],
)
def test_bad_settings_fail_when_configured_not_at_the_first_batch(kw, message) -> None:
    """They failed at the first batch, inside a DataLoader worker (a negative seed as numpy's "expected
    non-negative integer", naming no argument; a misspelt infill key as cm3_infill's TypeError)."""
    with pytest.raises(ValueError, match=message):
        cfg(**kw)
    assert cfg(seed=np.int64(3), infill_kwargs={"rate": 2.0, "whole_segment_prob": 0.0}).seed == 3


def test_collate_pads_and_packs_to_static_shapes() -> None:
    def ex(key: str, n: int) -> Example:
        return Example(key, np.arange(1, n + 1), n_retrieved=1, dropped_retrieved=n % 2, truncated_tokens=0)

    b = collate([ex("a", 3), ex("b", 2), ex("c", 4)], batch_size=2, seq_len=8, pack=2, pad_id=0)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, 8)
    assert b["input_ids"].tolist() == [[1, 2, 3, 1, 2, 0, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]]
    assert b["keys"] == [["a", "b"], ["c"]]
    assert b["n_retrieved"].tolist() == [2, 1] and b["dropped_retrieved"].tolist() == [1, 0]
    empty = collate([], batch_size=3, seq_len=4)
    assert empty["input_ids"].tolist() == [[0] * 4] * 3 and empty["keys"] == [[], [], []]
    with pytest.raises(ValueError, match="overflows row 0 of 4"):
        collate([ex("a", 3), ex("b", 2)], batch_size=1, seq_len=4, pack=2)
