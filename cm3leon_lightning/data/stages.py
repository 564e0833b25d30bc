"""Pipeline stages from a shard sample to a training batch (module-level functions, so they pickle into workers).

decode -> choose retrieved documents -> fit to context -> build the sequence -> CM3 masking -> batch

Every random choice for a sample comes from a generator seeded by ``(seed, epoch, key, stage)``
(:func:`sample_rng`), never from a stream's running state: a sample gets the same retrieved documents and the same
masks whichever rank or worker reads it and whether or not the run was resumed.

Context fitting runs on documents *before* masking, with room reserved for the masking overhead
(:func:`cm3_infill` adds ``2n + 1`` tokens for n spans, n <= K sentinels), so masking never pushes an example past
its length and no masked span is ever cut.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cm3leon_lightning.data.shards import Neighbor, ShardFormatError, ShardSample, decode_sample
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

CHOICE_STREAM, ORDER_STREAM, MASK_STREAM = 0, 1, 2
SFT_KEY_PREFIX = "sft-"  # keys of ``cm3leon prepare --source sft`` documents (data/sft.py: sft-<file>-<line>-<copy>)
INFILL_ARGS = ("rate", "whole_segment_prob")  # the keyword arguments of cm3_infill that infill_kwargs may set


def check_seed(seed: object, seeds: str) -> None:
    """Refuse a ``seed`` that is not an integer >= 0, saying what it ``seeds``: numpy refuses a negative one only
    when first used ("expected non-negative integer", naming nothing), often in a worker, and takes a float or bool."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (it seeds {seeds}), got {seed!r}")


@dataclass
class PipelineConfig:
    """Everything the per-sample stages need (small and picklable).

    Attributes:
        vocab: the data's vocabulary.
        seed: base seed of every per-sample random choice.
        max_retrieved: at most this many retrieved documents per example (paper section 2.1: three).
        no_retrieval_share: share of examples built with no retrieved document (zero-shot prompts in distribution).
        image_first_prob: probability that an example's documents put the image before the caption.
        infill: apply CM3 masking (:func:`cm3_infill`).
        infill_kwargs: extra keyword arguments of :func:`cm3_infill` (``rate``, ``whole_segment_prob``).
        slot_len: tokens available to one example (``seq_len // pack``).
        cut_captions: whether a query caption that does not fit is cut from its end (:func:`may_cut_caption`);
            a sample whose caption may not be cut is skipped instead, as ``too_long``. None: every caption but those
            of instruction-tuning documents (keys ``sft-...``), whose text ends with the answer.

    Raises:
        ValueError: a negative or non-integer ``seed``, ``infill_kwargs`` that :func:`cm3_infill` would refuse, or a
            ``cut_captions`` that is not a bool or None.
    """

    vocab: MultimodalVocab
    seed: int = 0
    max_retrieved: int = 3
    no_retrieval_share: float = 0.1
    image_first_prob: float = 0.0
    infill: bool = True
    infill_kwargs: dict[str, Any] = field(default_factory=dict)
    slot_len: int = 4096
    cut_captions: bool | None = None

    def __post_init__(self) -> None:
        # Checked here, when the data module is built: a bad value used to fail at the first batch, in a worker.
        check_seed(self.seed, "numpy's generators")
        if self.cut_captions is not None and not isinstance(self.cut_captions, bool):
            raise ValueError(f"cut_captions must be true, false or null (automatic), got {self.cut_captions!r}")
        from cm3leon_lightning.objective.cm3 import check_infill_args

        unknown = sorted(set(self.infill_kwargs) - set(INFILL_ARGS))
        if unknown:
            raise ValueError(f"infill_kwargs: unknown key(s) {unknown}; cm3_infill takes {', '.join(INFILL_ARGS)}")
        try:
            check_infill_args(**self.infill_kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"infill_kwargs: {e}") from e

    @property
    def mask_overhead(self) -> int:
        """Most tokens masking can add: ``2 K + 1``."""
        return 2 * self.vocab.num_sentinels + 1 if self.infill else 0

    @property
    def budget(self) -> int:
        """Tokens an unmasked example may use."""
        return self.slot_len - self.mask_overhead


@dataclass
class Example:
    """One example ready to batch.

    Attributes:
        key: the query document's key.
        ids: ``(T,)`` int64 token ids (masked when infilling is on).
        n_retrieved: retrieved documents kept.
        dropped_retrieved: retrieved documents dropped to fit the context.
        truncated_tokens: caption tokens cut from the query to fit the context.
    """

    key: str
    ids: np.ndarray
    n_retrieved: int
    dropped_retrieved: int = 0
    truncated_tokens: int = 0


def key_seed(key: str) -> int:
    """A stable 64-bit integer from a document key (blake2b), independent of Python's hash seed."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str, stage: int) -> np.random.Generator:
    """The generator of one sample's random choices at one stage, seeded by ``(seed, epoch, key, stage)``."""
    return np.random.default_rng([seed, epoch, key_seed(key), stage])


def decode(item: tuple[str, dict[str, bytes]], vocab: MultimodalVocab) -> ShardSample:
    """Stage 1: tar members -> validated :class:`ShardSample` (raises ``ShardFormatError`` with a reason)."""
    key, members = item
    return decode_sample(key, members, vocab)


def choose_retrieved(
    neighbors: Sequence[Neighbor], rng: np.random.Generator, max_retrieved: int = 3, no_retrieval_share: float = 0.1
) -> list[Neighbor]:
    """Stage 2: pick up to ``max_retrieved`` stored neighbours at random, kept in retrieval order.

    Paper section 2.1: "In training, we randomly select three retrieved samples for every caption-image pair".
    With probability ``no_retrieval_share`` none is kept, so zero-shot prompts (no retrieval) stay in distribution.
    """
    if rng.random() < no_retrieval_share or not neighbors or max_retrieved <= 0:
        return []
    k = min(max_retrieved, len(neighbors))
    return [neighbors[i] for i in np.sort(rng.choice(len(neighbors), size=k, replace=False))]


def document_length(n_text: int, n_image: int) -> int:
    """Serialized length of a document: ``<eos>``, its segments and one ``<break>`` between two segments."""
    return 1 + n_text + n_image + (1 if n_text and n_image else 0)


def fit_to_context(retrieved_lengths: Sequence[int], caption_len: int, image_len: int, budget: int) -> tuple[int, int]:
    """Stage 3: how many retrieved documents (a prefix) and caption tokens fit in ``budget`` tokens.

    Rules: drop retrieved documents first (the last of ``retrieved_lengths`` first), then truncate the query's caption
    from the end (dropping the caption segment when nothing is left); an image segment is never cut. (A caption that
    :func:`may_cut_caption` forbids cutting makes :func:`build_example` skip the sample instead.)

    Args:
        retrieved_lengths: serialized lengths of the retrieved documents, most relevant first
            (:func:`keep_order`).
        caption_len: the query's caption tokens.
        image_len: the query's image tokens.
        budget: tokens available, the final ``<eos>`` included.

    Returns:
        ``(kept_retrieved, kept_caption_tokens)``.

    Raises:
        ValueError: when even the query image alone does not fit.
    """
    if document_length(0, image_len) + 1 > budget:
        raise ValueError(f"seq_len too small: one image document needs {image_len + 2} tokens, budget is {budget}")
    kept = len(retrieved_lengths)
    total = sum(retrieved_lengths) + document_length(caption_len, image_len) + 1
    while total > budget and kept > 0:
        kept -= 1
        total -= retrieved_lengths[kept]
    caption = caption_len
    if total > budget:
        caption = max(0, caption_len - (total - budget))  # at 0 the <break> goes too, so it still fits
    return kept, caption


def may_cut_caption(key: str, cut_captions: bool | None = None) -> bool:
    """Whether the query caption of sample ``key`` may be cut from its end to fit (:func:`fit_to_context`).

    ``cut_captions`` when it is a bool; else (None) True except for instruction-tuning documents (keys starting with
    :data:`SFT_KEY_PREFIX`, as ``cm3leon prepare --source sft`` writes them): their text is an instruction followed
    by its answer, so a cut removes the training target first and keeps the question, and ``cm3leon prepare``
    already refuses to cut such a text (``text_too_long``). A sample that may not be cut and does not fit is skipped
    and counted as ``too_long``, like a document with segments.
    """
    return cut_captions if cut_captions is not None else not key.startswith(SFT_KEY_PREFIX)


def keep_order(retrieved: Sequence[Neighbor]) -> list[int]:
    """Indices of the retrieved documents, most relevant (highest score) first; ties keep retrieval order.

    Fitting drops from the end of this order, so the least relevant document goes first. Retrieval order is not a
    relevance order: ``neighbors.json`` lists the text search's picks, then the image search's, so dropping the last
    stored document would always drop an image pick; at the paper's scale (4096 tokens, 32x32 image grids), where only
    two of three retrieved documents fit, the image search's second pick would never be trained on.
    """
    return sorted(range(len(retrieved)), key=lambda i: -float(retrieved[i].score))


def document_ids(text: np.ndarray, image: np.ndarray, vocab: MultimodalVocab, image_first: bool = False) -> np.ndarray:
    """Serialize one document like :meth:`MultimodalVocab.document_to_ids`, vectorised.

    ``text`` holds text ids, ``image`` VQ codes; an empty array means the segment is absent.
    """
    pair = [np.asarray(text, dtype=np.int64), np.asarray(image, dtype=np.int64) + vocab.n_text]
    segs = [s for s in (pair[::-1] if image_first else pair) if s.size]
    parts = [np.array([vocab.eos_id], dtype=np.int64), segs[0]]
    if len(segs) == 2:
        parts += [np.array([vocab.break_id], dtype=np.int64), segs[1]]
    return np.concatenate(parts).astype(np.int64)


def segments_ids(segments: Sequence[tuple[str, np.ndarray]], vocab: MultimodalVocab) -> np.ndarray:
    """Serialize a document with segments: ``<eos>``, then the segments joined by ``<break>`` (image codes offset)."""
    parts = [np.array([vocab.eos_id], dtype=np.int64)]
    for i, (kind, arr) in enumerate(segments):
        if i:
            parts.append(np.array([vocab.break_id], dtype=np.int64))
        parts.append(np.asarray(arr, dtype=np.int64) + (vocab.n_text if kind == "image" else 0))
    return np.concatenate(parts)


def fit_segments(retrieved_lengths: Sequence[int], query_len: int, budget: int, key: str) -> int:
    """How many retrieved documents (a prefix of ``retrieved_lengths``, most relevant first) fit before a document
    with segments (which is never cut).

    Raises:
        ShardFormatError: ``too_long``, when the document alone (and the final ``<eos>``) exceeds ``budget``.
    """
    if query_len + 1 > budget:
        raise ShardFormatError("too_long", f"sample {key!r}: its {query_len} tokens do not fit {budget} (seq_len)")
    kept, total = len(retrieved_lengths), sum(retrieved_lengths) + query_len + 1
    while total > budget and kept > 0:
        kept -= 1
        total -= retrieved_lengths[kept]
    return kept


def build_example(sample: ShardSample, cfg: PipelineConfig, epoch: int) -> Example:
    """Stages 2-5 for one sample: retrieved documents, context fit, serialization and CM3 masking.

    The sequence is the one :meth:`MultimodalVocab.example_to_ids` builds: retrieved documents first, the query
    last, then a final ``<eos>``. A query with segments (:func:`segments_ids`) keeps its own order and is never cut.

    Raises:
        ShardFormatError: ``too_long``, for a query that does not fit and may not be cut: a document with segments,
            or a caption :func:`may_cut_caption` forbids cutting (an instruction-tuning document's, by default).
    """
    vocab = cfg.vocab
    retrieved = choose_retrieved(
        sample.neighbors,
        sample_rng(cfg.seed, epoch, sample.key, CHOICE_STREAM),
        cfg.max_retrieved,
        cfg.no_retrieval_share,
    )
    image_first = bool(sample_rng(cfg.seed, epoch, sample.key, ORDER_STREAM).random() < cfg.image_first_prob)
    order = keep_order(retrieved)  # fitting drops the least relevant first
    lengths = [document_length(retrieved[i].text.size, retrieved[i].image.size) for i in order]
    if sample.segments is not None:  # a document in its own order: never cut, never reordered
        query = segments_ids(sample.segments, vocab)
        kept = fit_segments(lengths, query.size, cfg.budget, sample.key)
        caption_len = sample.text.size
    else:
        kept, caption_len = fit_to_context(lengths, sample.text.size, sample.image.size, cfg.budget)
        if caption_len < sample.text.size and not may_cut_caption(sample.key, cfg.cut_captions):
            need = document_length(sample.text.size, sample.image.size) + 1  # the final <eos> too
            why = "cut_captions=False" if cfg.cut_captions is False else "an SFT document's text ends with its answer"
            raise ShardFormatError(
                "too_long",
                f"sample {sample.key!r}: its {sample.text.size} text and {sample.image.size} image tokens need {need} "
                f"tokens, more than the {cfg.budget} that seq_len // pack leaves after the masking reserve, and its "
                f"text is never cut ({why}); raise seq_len or lower pack",
            )
        query = document_ids(sample.text[:caption_len], sample.image, vocab, image_first)
    # the kept documents go into the sequence in retrieval order
    docs = [document_ids(retrieved[i].text, retrieved[i].image, vocab, image_first) for i in sorted(order[:kept])]
    docs.append(query)
    docs.append(np.array([vocab.eos_id], dtype=np.int64))
    ids = np.concatenate(docs)
    if cfg.infill:
        ids = cm3_mask(ids, cfg, sample_rng(cfg.seed, epoch, sample.key, MASK_STREAM))
    return Example(
        key=sample.key,
        ids=ids,
        n_retrieved=kept,
        dropped_retrieved=len(retrieved) - kept,
        truncated_tokens=int(sample.text.size - caption_len),
    )


def cm3_mask(ids: np.ndarray, cfg: PipelineConfig, rng: np.random.Generator) -> np.ndarray:
    """Stage 5: CM3 infilling (:func:`cm3leon_lightning.objective.cm3.cm3_infill`, paper section 2.2)."""
    from cm3leon_lightning.objective.cm3 import cm3_infill

    out = cm3_infill(ids, cfg.vocab, rng, **cfg.infill_kwargs)
    if out.size > cfg.slot_len:
        raise RuntimeError(f"masking made {out.size} tokens out of {ids.size}; slot holds {cfg.slot_len}")
    return out


def collate(
    examples: Sequence[Example], batch_size: int, seq_len: int, pack: int = 1, pad_id: int = 0
) -> dict[str, Any]:
    """Stage 6: a static-shape batch. Row i concatenates examples ``i*pack .. i*pack+pack-1``, then pads.

    Rows without examples (the exact mode's remainder) are all padding, which the loss ignores.

    Returns:
        ``input_ids``: ``(batch_size, seq_len)`` LongTensor; ``keys``: per row, the keys of its examples;
        ``n_retrieved``, ``dropped_retrieved``, ``truncated_tokens``: ``(batch_size,)`` LongTensor sums per row.
    """
    if len(examples) > batch_size * pack:
        raise ValueError(f"{len(examples)} examples do not fit {batch_size} rows x {pack} per row")
    ids = np.full((batch_size, seq_len), pad_id, dtype=np.int64)  # (B, T)
    stats = np.zeros((3, batch_size), dtype=np.int64)
    keys: list[list[str]] = [[] for _ in range(batch_size)]
    for j, ex in enumerate(examples):
        row = j // pack
        pos = sum(ids_len for ids_len in (e.ids.size for e in examples[row * pack : j]))
        if pos + ex.ids.size > seq_len:
            raise ValueError(f"example {ex.key!r} ({ex.ids.size} tokens) overflows row {row} of {seq_len}")
        ids[row, pos : pos + ex.ids.size] = ex.ids
        keys[row].append(ex.key)
        stats[:, row] += (ex.n_retrieved, ex.dropped_retrieved, ex.truncated_tokens)
    return {
        "input_ids": torch.from_numpy(ids),
        "keys": keys,
        "n_retrieved": torch.from_numpy(stats[0]),
        "dropped_retrieved": torch.from_numpy(stats[1]),
        "truncated_tokens": torch.from_numpy(stats[2]),
    }
