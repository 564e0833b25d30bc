"""Selection rules of paper section 2.1 on hand-built candidate lists."""

import subprocess
import sys

import numpy as np
import pytest

from cm3leon_lightning.retrieval.select import (
    SelectionConfig,
    drop_caption_tokens,
    is_near_duplicate,
    multimodal_first,
    query_dropout,
    query_rng,
    select_neighbors,
    within_relevance_cap,
)

KEYS = [f"doc{i}" for i in range(8)]


def _orthogonal(n: int = 8, d: int = 8) -> np.ndarray:
    return np.eye(n, d, dtype=np.float32)  # every document distinct


def test_takes_k_per_modality_text_first_in_order():
    out = select_neighbors("q", [1, 2, 3], [0.8, 0.7, 0.6], [4, 5, 6], [0.5, 0.4, 0.3], KEYS)
    assert out == [
        {"key": "doc1", "score": pytest.approx(0.8), "by": "text"},
        {"key": "doc2", "score": pytest.approx(0.7), "by": "text"},
        {"key": "doc4", "score": pytest.approx(0.5), "by": "image"},
        {"key": "doc5", "score": pytest.approx(0.4), "by": "image"},
    ]


def test_query_itself_is_skipped():
    out = select_neighbors("doc1", [1, 2, 3], [0.85, 0.7, 0.6], [1, 5, 6], [0.85, 0.4, 0.3], KEYS)
    assert [n["key"] for n in out] == ["doc2", "doc3", "doc5", "doc6"]


def test_relevance_cap_skips_scores_above_0_9_and_keeps_0_9():
    assert within_relevance_cap(0.9) and not within_relevance_cap(0.9001)
    out = select_neighbors("q", [1, 2, 3, 4], [0.99, 0.95, 0.9, 0.5], [], [], KEYS)
    assert [(n["key"], n["score"]) for n in out] == [("doc3", pytest.approx(0.9)), ("doc4", pytest.approx(0.5))]
    cfg = SelectionConfig(max_relevance=0.6)
    out = select_neighbors("q", [1, 2, 3, 4], [0.99, 0.95, 0.9, 0.5], [], [], KEYS, config=cfg)
    assert [n["key"] for n in out] == ["doc4"]


def test_documents_chosen_by_text_are_not_chosen_again_by_image():
    out = select_neighbors("q", [1, 2], [0.8, 0.7], [2, 1, 6, 7], [0.8, 0.7, 0.6, 0.5], KEYS)
    assert [(n["key"], n["by"]) for n in out] == [
        ("doc1", "text"),
        ("doc2", "text"),
        ("doc6", "image"),
        ("doc7", "image"),
    ]


def test_near_duplicates_of_a_chosen_document_are_skipped():
    emb = _orthogonal()
    emb[2] = emb[1] + 0.05 * emb[3]  # doc2 ~ doc1 (cosine 0.9988)
    emb[5] = emb[1] * 0.7 + emb[4] * 0.7  # doc5: cosine 0.707 with doc1: different enough
    out = select_neighbors("q", [1, 2, 3], [0.8, 0.79, 0.6], [2, 5, 6], [0.7, 0.6, 0.5], KEYS, embeddings=emb)
    assert [n["key"] for n in out] == ["doc1", "doc3", "doc5", "doc6"]
    # A lower threshold also drops doc5; without embeddings only exact keys count.
    out = select_neighbors(
        "q", [1, 2, 3], [0.8, 0.79, 0.6], [2, 5, 6], [0.7, 0.6, 0.5], KEYS, embeddings=emb,
        config=SelectionConfig(duplicate_threshold=0.5),
    )  # fmt: skip
    assert [n["key"] for n in out] == ["doc1", "doc3", "doc6"]
    out = select_neighbors("q", [1, 2, 3], [0.8, 0.79, 0.6], [2, 5, 6], [0.7, 0.6, 0.5], KEYS)
    assert [n["key"] for n in out] == ["doc1", "doc2", "doc5", "doc6"]


def test_copies_of_the_query_are_skipped_though_their_relevance_is_under_the_cap():
    """A one-modality query scores an exact copy of its document at ~0.7-0.8 (an averaged text+image embedding),
    under the 0.9 cap: the query's own document embedding catches it (found in review: copies were retrieved)."""
    emb = _orthogonal()
    query = emb[7].copy()
    emb[1] = query  # doc1: a byte copy of the query under another key
    emb[4] = 0.99 * query + 0.1 * emb[3]  # doc4: a near copy (cosine 0.995)
    args = ("q", [1, 2, 3], [0.72, 0.64, 0.6], [4, 5, 6], [0.71, 0.6, 0.5], KEYS)
    out = select_neighbors(*args, embeddings=emb, query_embedding=query)
    assert [n["key"] for n in out] == ["doc2", "doc3", "doc5", "doc6"]
    assert [n["key"] for n in select_neighbors(*args, embeddings=emb)] == ["doc1", "doc2", "doc5", "doc6"]


def test_documents_of_the_query_group_are_skipped():
    groups = ["g0", "g1", "q", "g3", "q", "g5", "g6", "g7"]  # doc2 and doc4: the query's image, other captions
    out = select_neighbors("q", [2, 1, 3], [0.8, 0.7, 0.6], [4, 5, 6], [0.7, 0.6, 0.5], KEYS, query_group="q",
                           groups=groups)  # fmt: skip
    assert [n["key"] for n in out] == ["doc1", "doc3", "doc5", "doc6"]


def test_one_picture_under_another_caption_is_not_retrieved_twice():
    """COCO ``--coco-mode all``: two captions of one picture embed at document cosine ~0.9 (caption-image cosine 0.3,
    caption-caption 0.75), under the duplicate threshold, so both slots of the image search went to one picture
    (found in review); a chosen document's group is skipped like the query's, across both searches."""
    e = np.eye(8)
    t1 = 0.3 * e[0] + np.sqrt(0.91) * e[1]
    u = 0.66 / np.sqrt(0.91)
    t2 = 0.3 * e[0] + u * e[1] + np.sqrt(0.91 - u * u) * e[2]
    emb = e.astype(np.float32)
    emb[1], emb[2] = (t1 + e[0]) / np.linalg.norm(t1 + e[0]), (t2 + e[0]) / np.linalg.norm(t2 + e[0])
    assert float(emb[1] @ emb[2]) == pytest.approx(0.9038, abs=1e-4)
    groups = ["g0", "p7", "p7", "g3", "g4", "g5", "g6", "q"]
    out = select_neighbors("q", [3], [0.7], [1, 2, 4, 5], [0.8, 0.79, 0.6, 0.5], KEYS, embeddings=emb,
                           query_embedding=emb[7], query_group="q", groups=groups)  # fmt: skip
    assert [(n["key"], n["by"]) for n in out] == [("doc3", "text"), ("doc1", "image"), ("doc4", "image")]
    out = select_neighbors("q", [2, 3], [0.8, 0.7], [1, 4, 5], [0.8, 0.6, 0.5], KEYS, groups=groups)
    assert [(n["key"], n["by"]) for n in out] == [("doc2", "text"), ("doc3", "text"), ("doc4", "image"),
                                                  ("doc5", "image")]  # fmt: skip
    # without groups (or each document its own group) only the embedding rule applies
    out = select_neighbors("q", [3], [0.7], [1, 2, 4, 5], [0.8, 0.79, 0.6, 0.5], KEYS, embeddings=emb)
    assert [n["key"] for n in out] == ["doc3", "doc1", "doc2"]


def test_the_query_picture_under_another_caption_and_group_is_skipped_by_its_image_embedding():
    """A web re-post of the query's photo under a new caption is another group, and its document embedding (a new
    caption averaged in) has cosine ~0.85 with the query's, under the 0.95 threshold: only the image embedding
    catches it (found in review: the target image leaked into its own retrieved context). A picture already chosen
    under one caption is not chosen again under another either."""
    docs, imgs = _orthogonal(), _orthogonal()
    query_img = imgs[7].copy()
    imgs[1] = query_img  # doc1: the query's photo under another caption and group
    docs[1] = 0.85 * docs[7] + np.sqrt(1 - 0.85**2) * docs[1]  # document cosine 0.85 with the query's
    imgs[5] = imgs[2]  # doc5: doc2's photo under another caption
    args = ("q", [1, 2, 3], [0.72, 0.64, 0.6], [5, 4, 6], [0.71, 0.6, 0.5], KEYS)
    kwargs = {"embeddings": docs, "query_embedding": docs[7], "groups": KEYS, "query_group": "q"}
    assert [n["key"] for n in select_neighbors(*args, **kwargs)] == ["doc1", "doc2", "doc5", "doc4"]
    out = select_neighbors(*args, **kwargs, image_embeddings=imgs, query_image_embedding=query_img)
    assert [n["key"] for n in out] == ["doc2", "doc3", "doc4", "doc6"]
    # without the query's picture, chosen pictures still count
    out = select_neighbors(*args, **kwargs, image_embeddings=imgs)
    assert [n["key"] for n in out] == ["doc1", "doc2", "doc4", "doc6"]
    with pytest.raises(ValueError, match="image_embeddings has 3 rows but keys has 8"):
        select_neighbors(*args, image_embeddings=imgs[:3])


def test_rejected_counts_each_skipped_candidate_by_its_first_rule():
    from collections import Counter

    from cm3leon_lightning.retrieval.select import RULES

    docs, imgs = _orthogonal(), _orthogonal()
    docs[3] = docs[1]  # doc3 duplicates doc1's document, doc4 its picture
    imgs[4] = imgs[1]
    groups = ["g0", "g1", "q", "g3", "g4", "g5", "g1", "g7"]  # doc2: the query's group; doc6: doc1's
    rejected: Counter = Counter()
    out = select_neighbors(
        "doc0", [0, 1, 2, 6, 7, 3], [0.8, 0.8, 0.8, 0.8, 0.95, 0.8], [1, 3, 4, 5, 7], [0.8, 0.8, 0.8, 0.5, 0.5], KEYS,
        embeddings=docs, groups=groups, query_group="q", image_embeddings=imgs, rejected=rejected,
    )  # fmt: skip
    assert [(n["key"], n["by"]) for n in out] == [("doc1", "text"), ("doc5", "image"), ("doc7", "image")]
    assert rejected == {"query": 1, "chosen": 1, "group": 2, "relevance": 1, "duplicate": 2, "image_duplicate": 1}
    assert set(rejected) <= set(RULES)


def test_is_near_duplicate_threshold():
    c = np.array([1.0, 0.0])
    assert not is_near_duplicate(c, np.zeros((0, 2)), 0.95)
    assert is_near_duplicate(c, np.array([[0.0, 1.0], [2.0, 0.1]]), 0.95)  # scale does not matter
    assert not is_near_duplicate(c, np.array([[0.0, 1.0], [1.0, 1.0]]), 0.95)


def test_an_identical_picture_is_decided_alike_at_threshold_one():
    """Rounding put an identical float16 vector's cosine above 1 for about a third of vectors: a threshold of 1 (the
    picture rule at its edge) skipped exact copies at random, and decided other copies otherwise (found in review)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 512)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    assert [is_near_duplicate(v, v[None], 1.0) for v in vectors] == [False] * 200  # nothing is above 1
    assert [is_near_duplicate(v, v[None], 0.9999) for v in vectors] == [True] * 200
    imgs = np.zeros((8, 512), np.float32)
    imgs[1:] = vectors[:7]
    args = ("q", [1, 2], [0.6, 0.5], [3, 4], [0.6, 0.5], KEYS)
    for threshold, keys in ((1.0, ["doc1", "doc2", "doc3", "doc4"]), (0.9999, ["doc2", "doc3", "doc4"])):
        out = select_neighbors(*args, config=SelectionConfig(image_duplicate_threshold=threshold),
                               image_embeddings=imgs, query_image_embedding=imgs[1].copy())  # fmt: skip
        assert [n["key"] for n in out] == keys, threshold


def test_a_nan_row_hides_no_other_duplicate_and_a_nan_query_is_refused():
    """One NaN row among the vectors to avoid made the cosines' max NaN, so no candidate was a duplicate of any of
    them; a NaN query embedding turned the query-copy rules off without a word (found in review)."""
    c = np.array([1.0, 0.0], np.float32)
    assert is_near_duplicate(c, np.array([[np.nan, 0.0], [1.0, 0.0]], np.float32), 0.95)
    assert not is_near_duplicate(c, np.array([[np.nan, 0.0], [0.0, 1.0]], np.float32), 0.95)
    assert not is_near_duplicate(c, np.zeros((1, 2), np.float32), 0.95)  # no direction: duplicates nothing
    docs = _orthogonal()
    nan = np.full(8, np.nan, np.float32)
    for name, kwargs in (
        ("query_embedding", {"embeddings": docs, "query_embedding": nan}),
        ("query_image_embedding", {"image_embeddings": docs, "query_image_embedding": nan}),
    ):
        with pytest.raises(ValueError, match=f"^{name} has NaN or infinite values"):
            select_neighbors("q", [1], [0.5], [2], [0.5], KEYS, **kwargs)


def test_multimodal_documents_are_preferred_then_single_modality_fills():
    mm = np.array([True, False, True, False, True, True, False, True])
    assert multimodal_first([1, 2, 3, 4], mm) == [2, 4, 1, 3]
    out = select_neighbors("q", [1, 3, 2], [0.8, 0.7, 0.6], [6, 5, 7], [0.8, 0.7, 0.6], KEYS, multimodal=mm)
    # text: only doc2 is multimodal, doc1 (best text-only) fills; image: doc5, doc7 beat the text-only doc6
    assert [(n["key"], n["by"]) for n in out] == [
        ("doc2", "text"),
        ("doc1", "text"),
        ("doc5", "image"),
        ("doc7", "image"),
    ]
    out = select_neighbors(
        "q", [1, 3, 2], [0.8, 0.7, 0.6], [6, 5, 7], [0.8, 0.7, 0.6], KEYS, multimodal=mm,
        config=SelectionConfig(prefer_multimodal=False),
    )  # fmt: skip
    assert [n["key"] for n in out] == ["doc1", "doc3", "doc6", "doc5"]


def test_missing_hits_and_short_lists():
    out = select_neighbors("q", [3, -1, -1], [0.5, -np.inf, -np.inf], [-1], [-np.inf], KEYS)
    assert out == [{"key": "doc3", "score": pytest.approx(0.5), "by": "text"}]
    assert select_neighbors("q", [1], [0.5], [2], [0.4], KEYS, config=SelectionConfig(k_per_modality=0)) == []
    with pytest.raises(ValueError, match="text ids and scores"):
        select_neighbors("q", [1, 2], [0.5], [], [], KEYS)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="query_dropout"):
        SelectionConfig(query_dropout=1.0)
    with pytest.raises(ValueError, match="k_per_modality"):
        SelectionConfig(k_per_modality=-1)
    with pytest.raises(ValueError, match="max_relevance"):
        SelectionConfig(max_relevance=2.0)


def test_query_dropout_rate_over_many_draws():
    rng = np.random.default_rng(0)
    tokens = list(range(50))
    kept = [query_dropout(tokens, 0.2, rng) for _ in range(2000)]
    rate = 1 - sum(len(k) for k in kept) / (50 * 2000)
    assert abs(rate - 0.2) < 0.01  # std of the estimate is 0.0013
    assert all(k == sorted(k) for k in kept)  # order kept
    assert query_dropout(tokens, 0.0, rng) == tokens
    assert query_dropout([], 0.5, rng) == []
    # never empty: with rate 0.99 single-token queries keep their token
    assert all(query_dropout(["a"], 0.99, rng) == ["a"] for _ in range(100))
    with pytest.raises(ValueError, match="rate"):
        query_dropout(tokens, 1.0, rng)


def test_query_dropout_is_deterministic_by_seed_and_key():
    caption = "a small red square in the upper left corner of a white picture"
    a = [drop_caption_tokens(caption, 0.2, query_rng(7, f"k{i}")) for i in range(50)]
    b = [drop_caption_tokens(caption, 0.2, query_rng(7, f"k{i}")) for i in reversed(range(50))][::-1]
    c = [drop_caption_tokens(caption, 0.2, query_rng(8, f"k{i}")) for i in range(50)]
    assert a == b  # order of processing does not matter
    assert a != c  # the seed does
    assert len(set(a)) > 10
    assert all(set(x.split()) <= set(caption.split()) for x in a)


def test_query_rng_is_stable_across_processes():
    # blake2b, not Python's salted hash(): another interpreter draws the same numbers.
    code = "from cm3leon_lightning.retrieval.select import query_rng; print(query_rng(3, 'doc').integers(1 << 30))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(other) == int(query_rng(3, "doc").integers(1 << 30))


def test_select_imports_no_faiss_torch_or_lightning():
    # Load the file on its own (not through the package __init__) to see what select.py itself imports.
    import cm3leon_lightning.retrieval.select as mod

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('select_alone', {mod.__file__!r}); "
        "m = sys.modules['select_alone'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(sorted(m for m in ('faiss', 'torch', 'lightning', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_per_modality": 1.5}, "k_per_modality must be an integer, got 1.5"),
        ({"k_per_modality": True}, "k_per_modality must be an integer, got True"),
        ({"max_relevance": "0.9"}, "max_relevance must be a number, got '0.9'"),
        ({"duplicate_threshold": None}, "duplicate_threshold must be a number, got None"),
    ],
)
def test_config_types_are_checked(kwargs, match):
    """Found in review: k_per_modality=1.5 passed validation and, never equal to the count taken, kept every
    candidate; a string threshold failed later with a TypeError naming no field."""
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kwargs)
    assert SelectionConfig(k_per_modality=np.int64(1)).k_per_modality == 1


def test_query_dropout_rate_over_many_seeds_and_keys():
    tokens = list(range(20))
    kept = [len(query_dropout(tokens, 0.2, query_rng(seed, f"k{k}"))) for seed in range(100) for k in range(20)]
    assert abs(1 - sum(kept) / (20 * len(kept)) - 0.2) < 0.01  # std of the estimate is 0.002


def test_an_image_search_whose_candidates_were_taken_by_text_returns_fewer():
    out = select_neighbors("q", [1, 2, 3], [0.8, 0.7, 0.6], [2, 1, 3], [0.8, 0.7, 0.6], KEYS)
    assert [(n["key"], n["by"]) for n in out] == [("doc1", "text"), ("doc2", "text"), ("doc3", "image")]


def test_retrieval_package_exports_resolve_and_are_listed():
    """Found in review: the lazily imported names were missing from ``dir(cm3leon_lightning.retrieval)`` (so from
    tab completion), unlike the top-level package's."""
    import cm3leon_lightning.retrieval as retrieval
    from cm3leon_lightning.retrieval import select

    assert set(retrieval.__all__) <= set(dir(retrieval))
    names = ("Neighbor", "SelectionConfig", "select_neighbors", "query_dropout", "drop_caption_tokens", "query_rng")
    for name in names:
        assert getattr(retrieval, name) is getattr(select, name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        retrieval.nope  # noqa: B018


def test_ids_beyond_keys_and_per_row_arrays_of_another_length_are_clear_errors():
    """Found in review: an id beyond ``keys`` (another bank's search) and a ``groups`` shorter than ``keys`` failed with
    a bare IndexError; a longer ``embeddings`` or ``groups`` (another bank's) was read silently."""
    with pytest.raises(ValueError, match=r"image ids \[8, 9\] are beyond the 8 bank rows of keys"):
        select_neighbors("q", [1], [0.5], [8, 2, 9], [0.5, 0.4, 0.3], KEYS)
    with pytest.raises(ValueError, match="groups has 7 rows but keys has 8"):
        select_neighbors("q", [1], [0.5], [], [], KEYS, groups=KEYS[:7])
    with pytest.raises(ValueError, match="embeddings has 9 rows but keys has 8"):
        select_neighbors("q", [1], [0.5], [], [], KEYS, embeddings=np.eye(9, dtype=np.float32))
    with pytest.raises(ValueError, match="multimodal has 2 rows but keys has 8"):
        select_neighbors("q", [1], [0.5], [], [], KEYS, multimodal=np.ones(2, bool))
    out = select_neighbors("q", [1, -1], [0.5, -np.inf], [], [], KEYS, multimodal=np.ones(8, bool), groups=KEYS)
    assert out == [{"key": "doc1", "score": 0.5, "by": "text"}]
