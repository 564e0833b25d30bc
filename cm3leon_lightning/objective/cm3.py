"""The CM3 causal-masked infilling objective (Aghajanyan et al. 2022; CM3Leon paper section 2.2).

A training example (retrieved documents, then the query document, each starting with ``<eos>``, then a final
``<eos>``; see :meth:`MultimodalVocab.example_to_ids`) becomes an infilling instance::

    <eos> a b c <break> image <eos>                             the example
    <eos> a <mask:0> c <break> image                            masked body (final <eos> dropped)
    <infill> <mask:0> b <eos>                                   the spans, moved to the end

and is trained with plain next-token prediction. :func:`cm3_restore` is the exact inverse.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from cm3leon_lightning.tokenization.vocab import SENTINEL_OFFSET, MultimodalVocab

DEFAULT_RATE = 1.0
DEFAULT_WHOLE_SEGMENT_PROB = 0.25
MAX_RATE = 1e6
"""Largest Poisson rate accepted: far above any sentinel count K (``n`` is capped at K), and below the rates numpy's
Poisson sampler refuses (about 9.2e18), which would otherwise fail only at the first batch."""


def find_segments(ids: np.ndarray, vocab: MultimodalVocab) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of maskable tokens: non-special ids of one modality.

    Special ids (``<pad>``, ``<eos>``, ``<break>``, ``<mask>``, ``<infill>``, sentinels) delimit segments, and so
    does a switch between text and image ids without a ``<break>``, so a span is always inside one segment.

    Args:
        ids: ``(T,)`` int array of vocabulary ids.
        vocab: the vocabulary that defines the special and image id ranges.

    Returns:
        ``(starts, ends)``: ``(S,)`` int64 arrays; segment s is ``ids[starts[s]:ends[s]]``, in order.
    """
    # kind per token, padded with a special (-1) at both ends: -1 special, 0 text, 1 image       # (T+2,)
    kind = np.full(len(ids) + 2, -1, dtype=np.int8)
    inner = kind[1:-1]
    inner[:] = ids >= vocab.n_text
    inner[ids < vocab.num_special] = -1
    bounds = np.flatnonzero(kind[1:] != kind[:-1])  # run j is ids[bounds[j]:bounds[j+1]]
    run_starts, run_ends = bounds[:-1], bounds[1:]
    maskable = inner[run_starts] >= 0
    return run_starts[maskable].astype(np.int64), run_ends[maskable].astype(np.int64)


def _as_ids(ids: np.ndarray | Sequence[int], vocab: MultimodalVocab, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    vocab.validate_ids(arr, name)
    return arr


def _is_real(value: object) -> bool:
    """A real number (Python or numpy), not a bool (YAML 1.1 reads ``1e-1`` as a string, so check the type)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_infill_args(rate: float = DEFAULT_RATE, whole_segment_prob: float = DEFAULT_WHOLE_SEGMENT_PROB) -> None:
    """Check :func:`cm3_infill`'s settings (a data pipeline calls it when configured, before any data is read).

    Raises:
        ValueError: ``rate`` not a number in ``[0, MAX_RATE]``, or ``whole_segment_prob`` not a number in ``[0, 1]``.
    """
    if not (_is_real(rate) and 0 <= rate < float("inf")):
        raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
    if rate > MAX_RATE:
        raise ValueError(
            f"rate must be at most {MAX_RATE:.0f} (the number of spans is capped at K anyway), got {rate!r}"
        )
    if not (_is_real(whole_segment_prob) and 0.0 <= whole_segment_prob <= 1.0):
        raise ValueError(f"whole_segment_prob must lie in [0, 1], got {whole_segment_prob!r}")


def cm3_infill(
    ids: np.ndarray | Sequence[int],
    vocab: MultimodalVocab,
    rng: np.random.Generator,
    *,
    rate: float = DEFAULT_RATE,
    whole_segment_prob: float = DEFAULT_WHOLE_SEGMENT_PROB,
) -> np.ndarray:
    """Apply the CM3 infilling transformation to one serialized training example.

    Paper section 2.2: CM3 "transforms [multi-modal inputs] into an infilling instance by masking specific spans
    and relocating them to the end", and CM3Leon makes "a minor modification to the CM3 objective by preventing
    masking across <break> tokens", so that the model never learns to generate an image from an arbitrary
    midpoint. Here no span crosses *any* special token (``<break>``, ``<eos>``, ``<pad>``, ``<mask>``) nor a
    text/image switch.

    Sampling (following CM3 / metaseq's ``CausalMaskedDataset``, restricted to segments):

    1. ``n ~ Poisson(rate)``, capped at ``vocab.num_sentinels`` (K) and at the number of segments;
       ``n == 0`` returns the input unchanged (no ``<infill>`` is appended).
    2. ``n`` distinct segments are chosen uniformly (not by length, so a 30-token caption is masked as often as
       a 1024-token image); each gets exactly one span.
    3. With probability ``whole_segment_prob`` the span is the whole segment (so the captioning prompt
       ``<eos> <mask:0> <break> image <infill> <mask:0>`` and whole-image infilling are in distribution).
       Otherwise, as in metaseq, two distinct cut points are drawn uniformly in ``{0..L}`` for a segment of
       length L and the span lies between them (length distribution triangular, favouring short spans).
    4. Span i (in order of position) becomes ``<mask:i>``; the example's final ``<eos>`` is replaced by
       ``<infill>``, followed by ``<mask:i> span_i`` for each span and a closing ``<eos>``. Dropping the final
       ``<eos>`` makes the body end exactly like the inference prompt ``... image <infill>``.

    The output is ``len(ids) + 2 * n + 1`` tokens long.

    Differences from metaseq's CM3 (``CausalMaskedDocumentToSequenceDataset`` in ``metaseq/data/cm3_dataset.py``):
    metaseq draws span end points uniformly over the whole packed block and, with
    ``allow_rotation_across_eod=False``, only clips each span to the document it overlaps most; so its spans can
    cross ``<break>`` (the case CM3Leon forbids) and can cover a document's own separator. It draws ``n``
    non-overlapping spans by rejection from ``n**2`` candidates (possibly fewer survive), caps ``n`` at ``K - 1``,
    has no ``<infill>`` token and closes every moved span with its own ``<eos>``. Here each span lies inside one
    segment, overlap is impossible by construction, a whole-segment span has a fixed probability, ``<infill>``
    marks the start of the moved spans (the paper's prompt "Image of <mask>: [image] <infill>") and one ``<eos>``
    closes the example.

    Args:
        ids: ``(T,)`` serialized example; must end with ``<eos>`` and contain no ``<infill>`` or sentinel.
        vocab: the vocabulary (special ids, sentinel count K, image range).
        rng: numpy random generator; the output is a pure function of ``ids`` and the generator's state.
        rate: Poisson rate of the number of spans, in ``[0, MAX_RATE]`` (0 disables masking).
        whole_segment_prob: probability that a span covers its whole segment, in ``[0, 1]``.

    Returns:
        ``(T + 2n + 1,)`` int64 array, or a ``(T,)`` copy of the input when ``n == 0``.

    Raises:
        ValueError: bad ``rate``/``whole_segment_prob``, ids out of range, an input that does not end with
            ``<eos>``, or one that already holds ``<infill>`` or a sentinel (it could not be restored).
    """
    check_infill_args(rate, whole_segment_prob)
    arr = _as_ids(ids, vocab, "ids")
    if arr.size == 0 or arr[-1] != vocab.eos_id:
        raise ValueError("ids must end with <eos> (a serialized training example, see MultimodalVocab.example_to_ids)")
    # <infill> (4) and the sentinels (5..) are one contiguous block of ids reserved for the objective.
    reserved = (arr >= vocab.infill_id) & (arr < vocab.num_special)
    if reserved.any():
        bad = int(arr[reserved][0])
        raise ValueError(
            f"ids already hold <infill> or a sentinel (id {bad}); ids in [{SENTINEL_OFFSET}, {vocab.num_special}) "
            f"and {vocab.infill_id} are reserved for the objective"
        )

    n = int(rng.poisson(rate))
    if n == 0:
        return arr.copy()
    starts, ends = find_segments(arr, vocab)
    n = min(n, vocab.num_sentinels, len(starts))
    if n == 0:
        return arr.copy()

    chosen = np.sort(np.argsort(rng.random(len(starts)))[:n])  # (n,) distinct segments, uniformly, in order
    seg_start, length = starts[chosen], ends[chosen] - starts[chosen]  # (n,)
    u_whole, u_a, u_b = rng.random((3, n))
    a = (u_a * (length + 1)).astype(np.int64)  # a cut point, uniform in {0..L}
    b = (u_b * length).astype(np.int64)  # a second one, uniform in {0..L} without a
    b = b + (b >= a)
    whole = u_whole < whole_segment_prob
    lo = np.where(whole, 0, np.minimum(a, b))
    hi = np.where(whole, length, np.maximum(a, b))
    span_start, span_end = seg_start + lo, seg_start + hi  # (n,)

    sentinels = SENTINEL_OFFSET + np.arange(n, dtype=np.int64)
    body, tail, prev = [], [np.array([vocab.infill_id], dtype=np.int64)], 0
    for i in range(n):  # n <= K: a loop over spans, never over tokens
        s, e = span_start[i], span_end[i]
        body += [arr[prev:s], sentinels[i : i + 1]]
        tail += [sentinels[i : i + 1], arr[s:e]]
        prev = e
    body.append(arr[prev:-1])  # the final <eos> makes way for <infill>
    tail.append(arr[-1:])
    return np.concatenate(body + tail)


def cm3_restore(masked: np.ndarray | Sequence[int], vocab: MultimodalVocab) -> np.ndarray:
    """Invert :func:`cm3_infill`: put every span back in place of its sentinel.

    An input with neither ``<infill>`` nor sentinels is a zero-span example and is returned unchanged.

    Args:
        masked: ``(T',)`` output of :func:`cm3_infill`.
        vocab: the vocabulary used to mask it.

    Returns:
        The original ``(T,)`` int64 example.

    Raises:
        ValueError: sentinels without ``<infill>``, more than one ``<infill>``, sentinels out of order or unmatched
            between the body and the infill block, a moved span holding a special token, or no closing ``<eos>``.
    """
    arr = _as_ids(masked, vocab, "masked")
    is_sent = (arr >= SENTINEL_OFFSET) & (arr < vocab.num_special)
    infill_pos = np.flatnonzero(arr == vocab.infill_id)
    if len(infill_pos) == 0:
        if is_sent.any():
            raise ValueError("masked ids hold sentinels but no <infill>")
        return arr.copy()
    if len(infill_pos) > 1:
        raise ValueError(f"masked ids hold {len(infill_pos)} <infill> tokens; expected exactly one")
    p = int(infill_pos[0])
    if arr[-1] != vocab.eos_id or p == len(arr) - 1:
        raise ValueError("the infill block must end with <eos>")
    body_pos = np.flatnonzero(is_sent[:p])  # (n,)
    tail_pos = np.flatnonzero(is_sent[p + 1 : -1]) + p + 1  # (n,)
    n = len(body_pos)
    expected = SENTINEL_OFFSET + np.arange(n)
    if n == 0 or len(tail_pos) != n or not np.array_equal(arr[body_pos], expected):
        raise ValueError(
            f"unmatched sentinels: body has {arr[body_pos].tolist()}, infill block has {arr[tail_pos].tolist()}; "
            f"expected <mask:0>..<mask:{max(n - 1, 0)}> once each, in order, in both"
        )
    if not np.array_equal(arr[tail_pos], expected) or tail_pos[0] != p + 1:
        raise ValueError(
            f"infill block sentinels {arr[tail_pos].tolist()} must be {expected.tolist()} in order, "
            "the first right after <infill>"
        )
    span_ends = np.append(tail_pos[1:], len(arr) - 1)  # (n,)
    out, prev = [], 0
    for i in range(n):
        span = arr[tail_pos[i] + 1 : span_ends[i]]
        if span.size and (span < vocab.num_special).any():
            raise ValueError(f"moved span {i} holds a special token: {span.tolist()}")
        out += [arr[prev : body_pos[i]], span]
        prev = body_pos[i] + 1
    out += [arr[prev:p], arr[-1:]]
    return np.concatenate(out)
