"""CM3 infilling at decode time (paper section 2.2): fill the ``<mask:i>`` spans of documents, many in one batch.

The model reads ``masked document <infill> <mask:0>`` and writes span 0; then ``<mask:1>`` is fed and it writes span
1, and so on. :func:`infill_batch` decodes many documents (or many samples of one) in lockstep through one
:class:`~cm3leon_lightning.generation.decoder.Decoder`: every row writes the same cache slots, so a row whose span
ended early (a text span stops at ``<eos>``, ``<break>`` or a sentinel; image spans may miss different numbers of
codes) leaves the slots of what it sampled after its end *invalid* in the cache. An invalid slot is neither attended
to nor counted in positions (``model/kv_cache.py``), so each row computes exactly what it would alone, and the next
sentinel of every row is fed at the same slot. This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cm3leon_lightning.generation.decoder import Decoder
from cm3leon_lightning.generation.generate import check_vocab, cut_at_stop, stop_ids, text_spec
from cm3leon_lightning.generation.sampling import allowed_ids
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.tokenization.vocab import MultimodalVocab


@dataclass
class InfillResult:
    """The result of :func:`infill` for one document.

    Attributes:
        ids: the input with every ``<mask:i>`` replaced by its generated span (without the input's trailing
            ``<eos>``, which :func:`infill` drops).
        spans: the generated span of each sentinel, in order (vocabulary ids).
    """

    ids: list[int]
    spans: list[list[int]]


def plan_spans(vocab: MultimodalVocab, body: list[int], span_kinds: Sequence[str] | None) -> list[tuple[str, int]]:
    """For each sentinel of ``body`` in order: its modality and, for images, the number of codes that complete the
    segment (0 for text).

    Raises:
        ValueError: ``<infill>`` or ``<pad>`` in ``body``, no sentinel, sentinels out of order, ``span_kinds`` of the
            wrong length or contradicting a span that sits next to image codes, an image segment with nothing left to
            fill or with two masked spans.
    """
    for name, token, why in (
        ("<infill>", vocab.infill_id, "give the masked document before it: infill appends <infill> <mask:0> itself"),
        ("<pad>", vocab.pad_id, "padding is no part of a document"),
    ):
        if token in body:
            raise ValueError(f"infill: the ids hold {name} at position {body.index(token)}; {why}")
    where = [j for j, t in enumerate(body) if vocab.is_sentinel(t)]
    if [body[j] for j in where] != vocab.sentinel_ids[: len(where)]:
        raise ValueError("the sentinels must appear in order <mask:0>, <mask:1>, ... (as cm3_infill writes them)")
    if not where:
        raise ValueError("infill: the ids hold no <mask:i> sentinel")
    if span_kinds is not None and len(span_kinds) != len(where):
        raise ValueError(f"span_kinds has {len(span_kinds)} entries for {len(where)} sentinels")

    def inside(t: int) -> bool:  # part of a segment: content or a masked span (<eos>, <break> end it)
        return t >= vocab.num_special or vocab.is_sentinel(t)

    plan = []
    for i, j in enumerate(where):
        lo, hi = j, j + 1
        while lo > 0 and inside(body[lo - 1]):
            lo -= 1
        while hi < len(body) and inside(body[hi]):
            hi += 1
        n_image = sum(1 for t in body[lo:hi] if t >= vocab.n_text)
        n_spans = sum(1 for t in body[lo:hi] if vocab.is_sentinel(t))
        if n_image and n_spans > 1:
            raise ValueError(
                f"span {i}: its image segment holds {n_spans} masked spans; infill fills one per image segment (how "
                "the missing codes divide between them is unknown; cm3_infill never masks two)"
            )
        kind = "image" if n_image else (span_kinds[i] if span_kinds is not None else "text")
        if kind not in ("text", "image"):
            raise ValueError(f"span_kinds[{i}] must be 'text' or 'image', got {kind!r}")
        if span_kinds is not None and span_kinds[i] != kind:
            raise ValueError(f"span {i} sits next to image codes, so it is an image span, not {span_kinds[i]!r}")
        missing = vocab.image_tokens - n_image
        if kind == "image" and missing < 1:
            raise ValueError(f"span {i}: its image segment already holds {n_image} codes; nothing left to infill")
        plan.append((kind, missing if kind == "image" else 0))
    return plan


def _span_seeds(seed: int, n: int) -> list[int]:
    """``n`` seeds derived from ``seed``, one per span (the first is unused: span 0 draws from ``seed`` itself)."""
    return torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def infill_new_tokens(plan: Sequence[tuple[str, int]], max_span_tokens: int) -> int:
    """The tokens :func:`infill_batch` reserves after the prompt for spans ``plan`` (:func:`plan_spans`): each span
    at its longest (an image span its missing codes) and the sentinels between."""
    return sum(n if kind == "image" else max_span_tokens for kind, n in plan) + len(plan) + 1


def infill_positions(plan: Sequence[tuple[str, int]], body_len: int, max_span_tokens: int) -> int:
    """The context positions infilling a document of ``body_len`` ids with spans ``plan`` needs: the body,
    ``<infill> <mask:0>`` and :func:`infill_new_tokens` (what the decoder checks against ``max_seq_len``)."""
    return body_len + 2 + infill_new_tokens(plan, max_span_tokens)


def infill(
    model: CM3Leon,
    vocab: MultimodalVocab,
    ids: Sequence[int],
    *,
    span_kinds: Sequence[str] | None = None,
    max_span_tokens: int = 32,
    method: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    check_every: int = 8,
    compile: bool | str | None = None,
) -> InfillResult:
    """Fill the masked spans of one document (CM3 infilling, paper section 2.2), text or image.

    ``ids`` is a masked body as :func:`~cm3leon_lightning.objective.cm3_infill` writes it before ``<infill>``, e.g.
    ``<eos> a <mask:0> <break> image-with-<mask:1>`` (a trailing ``<eos>`` is dropped, as in training). An image
    span gets exactly as many codes as its segment misses (image codes only); a text span ends at ``<eos>``,
    ``<break>`` or a sentinel, or after ``max_span_tokens``. Several fillings of one document, or of many, decode
    together with :func:`infill_batch`.

    Args:
        ids: the masked document.
        span_kinds: ``"text"``/``"image"`` per sentinel; needed only for a whole masked image segment, whose
            modality cannot be seen from its neighbours (default: text).
        max_span_tokens: the most tokens of a text span.
        method, temperature, top_p, seed, check_every, compile: as
            :func:`~cm3leon_lightning.generation.generate.generate_text`.
    """
    (result,) = infill_batch(
        model, vocab, [ids], span_kinds=[span_kinds], max_span_tokens=max_span_tokens, method=method,
        temperature=temperature, top_p=top_p, seed=seed, check_every=check_every, compile=compile,
    )  # fmt: skip
    return result


def infill_batch(
    model: CM3Leon,
    vocab: MultimodalVocab,
    documents: Sequence[Sequence[int]],
    *,
    span_kinds: Sequence[Sequence[str] | None] | None = None,
    max_span_tokens: int = 32,
    method: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    check_every: int = 8,
    compile: bool | str | None = None,
) -> list[InfillResult]:
    """Fill the masked spans of several documents in one batch (see :func:`infill` for one).

    The documents may differ in length, text and in how many codes their image spans miss, but their spans must
    have the same modalities in the same order (the batch samples text or image codes at each span); ``[ids] * n``
    draws ``n`` fillings of one document. A document gets, greedily, the filling :func:`infill` gives it alone;
    sampled fillings depend on the seed and on the batch. Each span after the first draws its noise from a generator
    seeded from ``seed`` and its number, so how many steps an earlier span ran (``check_every``, when every row
    stopped) never changes a later span.

    Args:
        documents: masked documents, as :func:`infill`'s ``ids``.
        span_kinds: per document, as :func:`infill`'s ``span_kinds`` (None: inferred for all).
        Other arguments as :func:`infill`.

    Raises:
        ValueError: an empty batch, invalid ids, a document without sentinels, documents whose spans differ in
            modality, or spans that cannot fit the model's context.
    """
    check_vocab(model, vocab)
    if not documents:
        raise ValueError("infill: no documents given")
    if max_span_tokens < 1 or check_every < 1:
        raise ValueError(f"max_span_tokens and check_every must be >= 1, got {max_span_tokens} and {check_every}")
    kinds_of = list(span_kinds) if span_kinds is not None else [None] * len(documents)
    if len(kinds_of) != len(documents):
        raise ValueError(f"span_kinds has {len(kinds_of)} entries for {len(documents)} documents")
    bodies, plans = [], []
    for r, doc in enumerate(documents):
        body = [int(t) for t in doc]
        vocab.validate_ids(body, f"infill document {r}")
        if body and body[-1] == vocab.eos_id:
            body = body[:-1]
        bodies.append(body)
        try:
            plans.append(plan_spans(vocab, body, kinds_of[r]))
        except ValueError as err:  # which document of a batch was not said
            raise ValueError(f"{err} (infill document {r})") from None
    kinds = [k for k, _ in plans[0]]
    for r, plan in enumerate(plans[1:], 1):
        if [k for k, _ in plan] != kinds:
            raise ValueError(
                f"infill: document {r} has spans {[k for k, _ in plan]}, document 0 {kinds}; documents decoded "
                "together need spans of the same modalities in the same order"
            )
    spec = text_spec(method, temperature, top_p, hi=vocab.size)  # text and image spans
    device = next(model.parameters()).device
    allowed = {k: allowed_ids(vocab, model.config.vocab_size, k, device)[: vocab.size] for k in ("text", "image")}
    steps = [max(p[i][1] for p in plans) if k == "image" else max_span_tokens for i, k in enumerate(kinds)]
    stops = stop_ids(vocab)
    prompts = [body + [vocab.infill_id, vocab.sentinel_id(0)] for body in bodies]
    R = len(prompts)
    spans: list[list[list[int]]] = [[] for _ in range(R)]
    with torch.no_grad():
        new = infill_new_tokens(list(zip(kinds, steps)), max_span_tokens)
        dec = Decoder(model, spec, prompts, new, seed=seed, allowed=allowed[kinds[0]], compile=compile)
        # Span i > 0 reseeds: a text span that every row ended early (checked every ``check_every`` steps) drew
        # fewer noise tensors, which shifted every later span's samples with ``check_every``.
        span_seeds = _span_seeds(dec.generator.initial_seed(), len(kinds))
        first, start = dec.prefill(), dec.prompt_len  # start: the slot where span i's first token is fed
        for i, kind in enumerate(kinds):
            dec.allowed = allowed[kind]
            if i:
                dec.generator.manual_seed(span_seeds[i])
                # Each row feeds its previous span's last token (its own slot held it, or a later token: invalidated
                # below) and <mask:i>; a row whose span was empty feeds padding in place of the last token.
                last = [s[-1][-1] if s[-1] else vocab.pad_id for s in spans]
                tokens = torch.tensor([[t, vocab.sentinel_id(i)] for t in last], device=device)
                mask = torch.tensor([[bool(s[-1]), True] for s in spans], device=device)
                first = dec.feed_prompt(tokens, mask)
                start += 2
            out = dec.run(first, steps[i], stops if kind == "text" else (), check_every)  # (R, m)
            rows = [out[r, : plans[r][i][1]].tolist() for r in range(R)] if kind == "image" else cut_at_stop(out, stops)
            fed = out.shape[1] - 1  # tokens fed at slots start.. (the last one sampled is fed with the next span)
            valid = model.kv_cache.valid
            for r, span in enumerate(rows):
                spans[r].append(span)
                # The span's last token is fed again before <mask:i+1>: its slot and every later one are void.
                valid[r, start + max(len(span) - 1, 0) : start + fed] = False
            start += fed
    results = []
    for body, row in zip(bodies, spans):
        filled: list[int] = []
        for t in body:
            filled.extend(row[t - vocab.sentinel_id(0)] if vocab.is_sentinel(t) else [t])
        results.append(InfillResult(filled, row))
    return results
