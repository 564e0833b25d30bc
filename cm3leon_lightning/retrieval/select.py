"""Pure, seeded selection of retrieved documents (paper section 2.1, "Retrieval Augmentation").

The paper samples retrieved documents for each training example by three factors: relevance, modality and diversity.
For each query document the caller runs two dense-retriever searches over the memory bank, one with the caption (after
query dropout) and one with the image, and hands the ranked candidates to :func:`select_neighbors`, which applies:

1. skip the query document itself, the documents of its group (its image under another caption), and (given its
   embedding) any copy of it: a candidate whose document embedding has cosine above the duplicate threshold with
   the query's (the relevance score compares a one-modality query with an averaged document, so an exact copy
   scores only ~0.7-0.8 and passes the 0.9 cap), and (given image embeddings) its picture under another caption
   in another group (a web re-post: the new caption pulls the document cosine under the threshold);
2. relevance cap: keep only candidates with relevance score <= 0.9 (higher means a near copy of the query);
3. diversity: skip candidates already chosen, documents of a chosen one's group (its picture under another caption,
   which the embedding cosine does not always catch), and near-duplicates of a chosen one (document or, given them,
   image embedding cosine above a threshold);
4. modality: prefer documents that have both an image and a caption;
5. take ``k_per_modality`` from each search ("we retrieve two documents each, based on image and text").

Everything here is numpy only (no faiss, torch or Lightning) and deterministic given its inputs and seed.
"""

from __future__ import annotations

import hashlib
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, TypeVar

import numpy as np

T = TypeVar("T")
By = Literal["text", "image"]


class Neighbor(TypedDict):
    """One selected neighbour, as stored in a shard's ``neighbors.json`` (DESIGN section 4)."""

    key: str
    score: float
    by: By


@dataclass(frozen=True)
class SelectionConfig:
    """Settings of the retrieval strategy (paper section 2.1).

    Attributes:
        k_per_modality: documents kept from the text query and from the image query each (paper: 2).
        max_relevance: candidates scoring above this are too similar to the query and skipped (paper: 0.9).
        duplicate_threshold: a candidate whose embedding has cosine above this with an already chosen document is a
            near-duplicate and skipped (the paper gives no value; 0.95 keeps paraphrases out).
        prefer_multimodal: take documents with both an image and a caption before single-modality ones.
        query_dropout: fraction of the caption's tokens dropped before the text query is embedded (paper: 20%).
        image_duplicate_threshold: a candidate whose image embedding has cosine above this with the query's picture
            or a chosen document's is the same picture (a re-post under another caption) and skipped; 1 or above
            turns the rule off (no cosine is above 1; a CLIP that is not trained maps every picture to nearly one
            direction).
    """

    k_per_modality: int = 2
    max_relevance: float = 0.9
    duplicate_threshold: float = 0.95
    prefer_multimodal: bool = True
    query_dropout: float = 0.2
    image_duplicate_threshold: float = 0.95

    def __post_init__(self) -> None:
        # a float k (1.5) would never equal the count taken, so every candidate would be kept
        if isinstance(self.k_per_modality, bool) or not isinstance(self.k_per_modality, numbers.Integral):
            raise ValueError(f"k_per_modality must be an integer, got {self.k_per_modality!r}")
        for name in ("max_relevance", "duplicate_threshold", "query_dropout", "image_duplicate_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.k_per_modality < 0:
            raise ValueError(f"k_per_modality must be >= 0, got {self.k_per_modality}")
        if not -1.0 <= self.max_relevance <= 1.0 + 1e-6:
            raise ValueError(f"max_relevance must be in [-1, 1], got {self.max_relevance}")
        if not -1.0 <= self.duplicate_threshold <= 1.0 + 1e-6:
            raise ValueError(f"duplicate_threshold must be in [-1, 1], got {self.duplicate_threshold}")
        if not -1.0 <= self.image_duplicate_threshold < float("inf"):  # NaN fails too
            raise ValueError(
                f"image_duplicate_threshold must be >= -1 (above 1: off), got {self.image_duplicate_threshold}"
            )
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")


def query_rng(seed: int, key: str) -> np.random.Generator:
    """A generator for one query document, from the run seed and the document key only.

    Deriving it from the key (not from a shared stream) makes each document's query dropout independent of the order
    and sharding of the run, so a resumed or split run makes the same choices.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def query_dropout(tokens: Sequence[T], rate: float, rng: np.random.Generator) -> list[T]:
    """Drop each query token independently with probability ``rate`` (paper section 2.1, "query dropout").

    "We use query dropout, which drops some tokens of the query used in retrieval (20% of tokens) to encourage
    diversity and serve as regularization for training." At least one token is always kept (a uniformly chosen one
    when all draws drop), so a non-empty query never becomes empty.

    Args:
        tokens: the query's tokens, in order.
        rate: drop probability per token, in ``[0, 1)``.
        rng: the random generator (see :func:`query_rng`).

    Returns:
        The kept tokens, in their original order.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"query dropout rate must be in [0, 1), got {rate}")
    n = len(tokens)
    if n == 0:
        return []
    keep = rng.random(n) >= rate
    if not keep.any():
        keep[rng.integers(n)] = True
    return [t for t, k in zip(tokens, keep) if k]


def drop_caption_tokens(caption: str, rate: float, rng: np.random.Generator) -> str:
    """Query dropout on a caption's whitespace tokens (paper section 2.1); the result is re-joined by spaces.

    Words are the tokens here because the CLIP tokenizer runs inside the encoder; dropping whole words keeps the
    query made of real words.
    """
    return " ".join(query_dropout(caption.split(), rate, rng))


def within_relevance_cap(score: float, max_relevance: float = 0.9) -> bool:
    """Relevance rule (paper section 2.1): "we only use retrieved documents with relevance score <= 0.9".

    A higher score means the candidate is a near copy of the query, which teaches the generator to copy.
    """
    return bool(score <= max_relevance)


def is_near_duplicate(candidate: np.ndarray, chosen: np.ndarray, threshold: float) -> bool:
    """Diversity rule (paper section 2.1): a candidate too similar to an already retrieved document is skipped.

    "Simply taking the top K documents based on relevance score can result in duplicates or highly similar
    documents, hurting downstream pretraining." Similarity is the cosine between document embeddings.

    Cosines are clipped to ``[-1, 1]``: rounding puts an identical vector's cosine just above 1 as often as not, so
    a threshold of 1 would skip exact copies at random instead of never. A row with NaN (or all zeros) duplicates
    nothing and hides no other row's match.

    Args:
        candidate: ``(D,)`` candidate embedding.
        chosen: ``(M, D)`` embeddings of the documents chosen so far (``M`` may be 0).
        threshold: cosine above which the candidate counts as a duplicate.
    """
    if len(chosen) == 0:
        return False
    c = candidate / max(float(np.linalg.norm(candidate)), 1e-12)
    m = chosen / np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
    return bool((np.clip(m @ c, -1.0, 1.0) > threshold).any())  # any(): a NaN row's max would hide the others


def multimodal_first(ids: Sequence[int], multimodal: np.ndarray) -> list[int]:
    """Modality rule (paper section 2.1): order candidates with both image and caption first, stably.

    "Retrieving a multi-modal document consisting of images and text leads to better generator performance than
    retrieving either image or text." Relevance order is kept within each group.

    Args:
        ids: candidate row ids in relevance order.
        multimodal: ``(N,)`` bool per bank row, True when the document has both an image and a caption.
    """
    both = [i for i in ids if multimodal[i]]
    return both + [i for i in ids if not multimodal[i]]


RULES = ("query", "chosen", "group", "relevance", "duplicate", "image_duplicate")
"""The rules that skip a candidate, in the order :func:`select_neighbors` applies them: the query itself, a document
already chosen, the query's or a chosen document's group, the relevance cap, a near-duplicate document embedding and a
near-duplicate picture."""


def _copies(rows: np.ndarray | None, row: int, avoid: list[np.ndarray], threshold: float) -> bool:
    """Whether bank row ``row`` of ``rows`` (document or image embeddings) nearly duplicates one of ``avoid``."""
    if rows is None or not avoid:
        return False
    return is_near_duplicate(np.asarray(rows[row], np.float32), np.stack(avoid), threshold)


def select_neighbors(
    query_key: str,
    text_ids: Sequence[int] | np.ndarray,
    text_scores: Sequence[float] | np.ndarray,
    image_ids: Sequence[int] | np.ndarray,
    image_scores: Sequence[float] | np.ndarray,
    keys: Sequence[str],
    multimodal: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    config: SelectionConfig = SelectionConfig(),
    query_embedding: np.ndarray | None = None,
    query_group: str | None = None,
    groups: Sequence[str] | None = None,
    image_embeddings: np.ndarray | None = None,
    query_image_embedding: np.ndarray | None = None,
    rejected: Counter[str] | None = None,
) -> list[Neighbor]:
    """Choose the retrieved documents of one query document (paper section 2.1).

    Candidates come from two searches of the memory bank, by the (dropped-out) caption and by the image, each in
    relevance order. From each, up to ``k_per_modality`` documents are taken, text first, skipping: the query itself
    (same key), candidates above the relevance cap, candidates already chosen (by either search), documents of a
    chosen one's group (with ``groups``) and near-duplicates of a chosen one. With ``prefer_multimodal`` the
    image+caption documents of a search are considered before the single-modality ones, so a text-only or image-only
    document is picked only when too few multimodal ones pass.
    Fewer than ``k_per_modality`` are returned for a search whose candidates run out: search the bank with a margin
    (e.g. 8-16 candidates per modality).

    Args:
        query_key: the query document's key.
        text_ids: row ids of the text search, best first (``-1`` entries, faiss's "no hit", are ignored).
        text_scores: their relevance scores.
        image_ids: row ids of the image search, best first.
        image_scores: their relevance scores.
        keys: document key of every bank row.
        multimodal: ``(N,)`` bool per bank row (both image and caption); ``None`` treats every row as multimodal.
        embeddings: ``(N, D)`` document embeddings per bank row for the near-duplicate rule; ``None`` keeps only the
            exact (same key) duplicate rule.
        config: the rule settings.
        query_embedding: ``(D,)`` the query's own document embedding (with ``embeddings``): candidates whose
            cosine with it is above ``duplicate_threshold`` are copies of the query and skipped.
        query_group: the query's split group (several captions of one image share one; see ``RawPair.group``).
        groups: the split group of every bank row: a row of a chosen document's group is skipped (COCO's other
            captions of a chosen picture: two captions of one picture embed at cosine ~0.9, under the duplicate
            threshold, and would fill both slots of a search), and with ``query_group`` so are rows of the query's
            group (the query's own image under another caption).
        image_embeddings: ``(N, D)`` image embeddings per bank row: a candidate whose picture has cosine above
            ``image_duplicate_threshold`` with the query's picture (``query_image_embedding``) or a chosen document's is
            skipped, whatever its caption and group (the same photo re-posted under another caption embeds as a
            document at cosine ~0.85-0.9 with the query's, under the threshold, and would leak the target image).
        query_image_embedding: ``(D,)`` the query's image embedding (with ``image_embeddings``).
        rejected: a counter to add the skipped candidates to, by the first rule that skipped each (:data:`RULES`);
            each search's candidates count apart, so a document both searches skip counts twice (the query, always).

    Returns:
        The chosen neighbours as ``{key, score, by}`` in selection order: the text search's picks, then the image
        search's.

    Raises:
        ValueError: ids and scores of a search differ in shape, an id is beyond ``keys``, or ``multimodal``,
            ``embeddings``, ``groups`` or ``image_embeddings`` has another length than ``keys`` (each named), or
            ``query_embedding`` / ``query_image_embedding`` has NaN or infinite values (named).
    """
    per_row = {
        "multimodal": multimodal,
        "embeddings": embeddings,
        "groups": groups,
        "image_embeddings": image_embeddings,
    }
    for name, rows in per_row.items():
        if rows is not None and len(rows) != len(keys):  # a shorter one failed with an IndexError, a longer one not
            raise ValueError(f"{name} has {len(rows)} rows but keys has {len(keys)}: both describe every bank row")
    for name, vec in (("query_embedding", query_embedding), ("query_image_embedding", query_image_embedding)):
        if vec is not None and not np.isfinite(np.asarray(vec, np.float64)).all():  # NaN matches nothing: rule off
            raise ValueError(f"{name} has NaN or infinite values: no copy of the query could be recognised")
    chosen: list[Neighbor] = []
    chosen_keys: set[str] = set()
    chosen_groups: set[str] = set()  # with ``groups``: a chosen document's picture under another caption is no news
    chosen_rows: list[int] = []
    # what a candidate must not duplicate: the query (when its embedding is known), then each chosen document
    avoid = [] if query_embedding is None or embeddings is None else [np.asarray(query_embedding, np.float32)]
    # the same for pictures: the query's (when known), then each chosen document's
    avoid_images = [] if query_image_embedding is None else [np.asarray(query_image_embedding, np.float32)]
    for by, ids, scores in (("text", text_ids, text_scores), ("image", image_ids, image_scores)):
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        if ids.shape != scores.shape or ids.ndim != 1:
            raise ValueError(f"{by} ids and scores must be 1-D of equal length, got {ids.shape} and {scores.shape}")
        score_of = {int(i): float(s) for i, s in zip(ids, scores) if i >= 0}
        order = [int(i) for i in ids if i >= 0]
        beyond = [i for i in order if i >= len(keys)]
        if beyond:  # e.g. the ids of another bank's search
            raise ValueError(f"{by} ids {beyond[:5]} are beyond the {len(keys)} bank rows of keys")
        if config.prefer_multimodal and multimodal is not None:
            order = multimodal_first(order, multimodal)
        taken = 0
        for row in order:
            if taken == config.k_per_modality:
                break
            key, score = keys[row], score_of[row]
            rule = (  # the first rule that skips the candidate, if any (evaluated lazily, in this order)
                "query" if key == query_key
                else "chosen" if key in chosen_keys
                else "group" if groups is not None and (groups[row] in chosen_groups or groups[row] == query_group)
                else "relevance" if not within_relevance_cap(score, config.max_relevance)
                else "duplicate" if _copies(embeddings, row, avoid, config.duplicate_threshold)
                else "image_duplicate" if _copies(image_embeddings, row, avoid_images, config.image_duplicate_threshold)
                else None
            )  # fmt: skip
            if rule is not None:
                if rejected is not None:
                    rejected[rule] += 1
                continue
            chosen.append(Neighbor(key=key, score=score, by=by))  # type: ignore[typeddict-item]
            chosen_keys.add(key)
            if groups is not None:
                chosen_groups.add(groups[row])
            chosen_rows.append(row)
            if embeddings is not None:
                avoid.append(np.asarray(embeddings[row], np.float32))
            if image_embeddings is not None:
                avoid_images.append(np.asarray(image_embeddings[row], np.float32))
            taken += 1
    return chosen
