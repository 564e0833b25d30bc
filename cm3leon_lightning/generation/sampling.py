"""Pure logit functions for CM3Leon decoding (paper section 3.1, equations (1)-(3); section 4.1).

Every function maps tensors to tensors on their own device with static shapes: no ``.item()``, no data-dependent
Python branch, so a whole decode step (forward, guidance, filtering, sampling) can run in ``torch.compile`` or a
CUDA graph. Randomness enters only through the ``noise`` argument of :func:`sample` (exponential noise drawn from a
``torch.Generator``), so a seed fixes the samples, and eager and compiled steps given the same noise agree.

Logits are ``(..., V)``; removed tokens are set to ``-inf``. This module imports no Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cm3leon_lightning.tokenization.vocab import MultimodalVocab

NEG_INF = float("-inf")
SEED_LIMIT = 2**63
"""Seeds lie in ``[0, SEED_LIMIT)`` wherever a user gives one (``generate --seed``, a prompts file, a served request):
derived seeds (``seed + i``) then stay within what ``torch.Generator.manual_seed`` takes (below ``2**64``)."""


# ------------------------------------------------------------------------------------------------ filters
def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Tempered sampling (paper section 3.1): ``logits / temperature``.

    Args:
        logits: ``(..., V)``.
        temperature: > 0; below 1 sharpens, above 1 flattens. (Greedy decoding is ``temperature=0`` in the decode
            loops, which take an argmax instead of calling this.)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept), set the rest to ``-inf``.

    Args:
        logits: ``(..., V)``.
        k: ``1 <= k``; ``k >= V`` keeps everything.
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, NEG_INF)


TOP_P_SLACK = 2.0**-20
"""Relative shortfall of a nucleus's computed mass that still counts as reaching ``top_p`` (about 8 float32 ulps):
the softmax and the running sum round, so a set of mass exactly ``p`` could sum to just below it and take one more
token."""


def nucleus_mass(p: float) -> float:
    """The computed mass a nucleus must reach for ``top_p = p``: ``p * (1 - TOP_P_SLACK)``. :func:`top_p_filter` and
    the fused sampling kernel both compare against it, so they keep the same set."""
    return p * (1.0 - TOP_P_SLACK)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020; paper section 3.1, "TopP Sampling").

    Keeps the smallest set of top-ranked tokens whose cumulative probability is at least ``p`` (a token is needed when
    the probability mass ranked strictly above it is below ``p``, so the most likely token is always kept), and every
    token tied with the last one needed: which of equal logits to keep is not left to the sort order, which favoured
    low ids (bfloat16 logits tie often), and the nucleus is the fused sampling kernel's ``{p_i >= t*}``. A set whose
    computed mass falls short of ``p`` by rounding only reaches it (:func:`nucleus_mass`): probabilities 0.75, 0.25
    at ``p = 0.75`` keep the first token alone, though the softmax of their logs gives 0.7499999999999999.

    Args:
        logits: ``(..., V)``.
        p: in ``(0, 1]``; 1 keeps every token of non-zero probability.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {p}")
    if p >= 1:  # the running sum reaches 1.0 in float before the last tokens: filtering would drop some of them
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1).roll(1, dims=-1)  # (..., V) probability ranked strictly above each token
    mass_above[..., 0] = 0.0
    last = (mass_above < nucleus_mass(p)).sum(dim=-1, keepdim=True) - 1  # (..., 1) rank of the last token needed
    return logits.masked_fill(logits < sorted_logits.gather(-1, last), NEG_INF)


# ------------------------------------------------------------------------------------------------ guidance
def cfg_logits(cond: Tensor, uncond: Tensor, alpha: float) -> Tensor:
    """Classifier-free guidance, paper equation (2): ``uncond + alpha * (cond - uncond)``.

    ``cond`` are the logits of the stream that sees the condition (equation (1): ``T(t_y | t_x)``), ``uncond`` those of
    the stream that sees the mask token in its place (``T(t_y | <mask>)``; in this package the CM3 sentinel
    ``<mask:0>``, see :func:`~cm3leon_lightning.generation.generate.unconditional_image_prompt`). Computed as
    ``torch.lerp(uncond, cond, alpha)``, which returns ``cond`` bit for bit when ``alpha = 1`` (conditional sampling).

    Args:
        cond: ``(..., V)``.
        uncond: ``(..., V)``, same shape.
        alpha: the guidance scale ``alpha_c`` (the paper's best FID is near 3, figure 4).
    """
    return torch.lerp(uncond, cond, alpha)


def dual_cfg_logits(full: Tensor, image_only: Tensor, none: Tensor, text_scale: float, image_scale: float) -> Tensor:
    """Separate text and image guidance for editing (paper section 4.1; InstructPix2Pix, Brooks et al. 2023).

    Three streams: ``full`` sees the source image and the text instruction, ``image_only`` sees the image with the
    instruction masked (``<mask:0>``), ``none`` sees neither (``<mask:0>``, ``<mask:1>``)::

        none + image_scale * (image_only - none) + text_scale * (full - image_only)

    The paper uses ``image_scale = 1.5`` and ``text_scale = 7.5``. With both scales 1 this is ``full``.
    """
    return none + image_scale * (image_only - none) + text_scale * (full - image_only)


def cdk_logits(cond: Tensor, uncond: Tensor, k: int, alpha: float) -> Tensor:
    """Contrastive decoding top-K (CD-K), paper section 3.1 and equation (3).

    The score of a token is ``log p_EXP - log p_AMA`` with ``p_EXP`` the conditional stream and ``p_AMA`` the
    unconditional (masked-caption) stream, restricted to the plausible set
    ``V = {t : p_EXP(t) >= alpha * kmax_k(p_EXP)}`` where ``kmax_k`` is the k-th largest conditional probability
    (``k = 1`` is the original CD of Li et al. 2022), compared in log space. A token at the threshold is kept: the
    comparison allows a few float ulps of the numbers compared, so ``p = alpha * p_k`` holds however the logs round
    (probabilities 16/71 and 14/71 at ``alpha = 0.875``). Tokens outside ``V``, and tokens of conditional
    probability 0, get ``-inf``.

    Args:
        cond: ``(..., V)`` conditional logits.
        uncond: ``(..., V)`` unconditional logits.
        k: which largest probability sets the threshold, ``>= 1``.
        alpha: threshold factor in ``[0, 1]`` (above 1 the set can be empty and every token ``-inf``).
    """
    if k < 1:
        raise ValueError(f"cd_k k must be >= 1, got {k}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"cd_k alpha must lie in [0, 1], got {alpha}")
    log_p = cond.log_softmax(dim=-1)  # (..., V)
    log_q = uncond.log_softmax(dim=-1)
    k = min(k, log_p.shape[-1])
    kth = torch.topk(log_p, k, dim=-1).values[..., -1:]  # (..., 1) log of the k-th largest probability
    # Compared in log space: ``p >= alpha * p_k`` in probabilities underflowed to ``0 >= 0`` once ``p_k`` was below
    # float32's smallest number (a confident expert), and made every token plausible. A token the expert gives
    # probability 0 is never plausible (with ``alpha = 0`` its score was ``-inf - -inf = NaN``).
    threshold = kth + (math.log(alpha) if alpha > 0 else NEG_INF)  # (..., 1)
    # Ties at the threshold: ``log p`` and ``log p_k + log alpha`` round differently (each to a few ulps of the logs
    # and logits involved), and exact ties were often dropped.
    eps = torch.finfo(torch.promote_types(log_p.dtype, torch.float32)).eps  # the decoder's dtypes, not bf16's
    slack = 4 * eps * (threshold.abs() + cond.amax(dim=-1, keepdim=True).abs())
    plausible = (log_p >= threshold - slack) & (log_p > NEG_INF)
    return torch.where(plausible, log_p - log_q, torch.full_like(log_p, NEG_INF))


# ------------------------------------------------------------------------------------------- modality constraints
def allowed_ids(
    vocab: MultimodalVocab, vocab_size: int, modality: str, device: torch.device | str | None = None
) -> Tensor:
    """Boolean ``(vocab_size,)`` mask of the ids that may be sampled in one modality (DESIGN section 3).

    * ``"image"``: image codes ``[n_text, n_text + n_codes)`` only.
    * ``"text"``: text ids ``[0, n_text)`` except ``<pad>``, ``<mask>`` and ``<infill>`` (which only the data
      pipeline and the prompt builders insert); ``<eos>``, ``<break>`` and the sentinels stay, as they end a span.

    The padding rows ``[n_text + n_codes, vocab_size)`` of the embedding are never allowed.
    """
    if vocab_size < vocab.size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the vocabulary's {vocab.size} ids")
    ids = torch.arange(vocab_size, device=device)
    if modality == "image":
        return (ids >= vocab.n_text) & (ids < vocab.size)
    if modality == "text":
        banned = (ids == vocab.pad_id) | (ids == vocab.mask_id) | (ids == vocab.infill_id)
        return (ids < vocab.n_text) & ~banned
    raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")


def image_segment_allowed(vocab: MultimodalVocab, vocab_size: int, codes_so_far: Tensor) -> Tensor:
    """Allowed ids inside an image segment given how many codes each row has emitted (DESIGN section 3).

    While a row has fewer than ``grid_h * grid_w`` codes only image codes are allowed; once it has exactly that many,
    only the tokens that end a segment (``<break>``, ``<eos>``, sentinels), so every image has the right size.

    Args:
        vocab: the vocabulary.
        vocab_size: the model's (padded) vocabulary size.
        codes_so_far: ``(B,)`` long, codes already emitted in the current image segment of each row.

    Returns:
        ``(B, vocab_size)`` bool.
    """
    ids = torch.arange(vocab_size, device=codes_so_far.device)  # (V,)
    image = (ids >= vocab.n_text) & (ids < vocab.size)
    ends = (ids == vocab.break_id) | (ids == vocab.eos_id) | ((ids >= vocab.sentinel_id(0)) & (ids < vocab.num_special))
    full = (codes_so_far >= vocab.image_tokens)[:, None]  # (B, 1)
    return torch.where(full, ends[None], image[None])


def constrain(logits: Tensor, allowed: Tensor) -> Tensor:
    """Set the logits of ids that are not ``allowed`` (bool, broadcastable to ``logits``) to ``-inf``."""
    return logits.masked_fill(~allowed, NEG_INF)


# ------------------------------------------------------------------------------------------------ sampling
def sample_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Exponential(1) noise for :func:`sample`, drawn from ``generator`` on ``device`` (no host sync)."""
    noise = torch.empty(shape, device=device, dtype=torch.float32).exponential_(1.0, generator=generator)
    return noise.clamp_min_(1e-30)  # exponential_ may return 0 in float32; 0 would divide by zero


def sample(logits: Tensor, noise: Tensor | None) -> Tensor:
    """Draw one token per row from ``softmax(logits)`` with the exponential-race trick, or greedily.

    ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. is an exact sample from ``p`` (equivalent to the Gumbel-max trick),
    and, unlike ``torch.multinomial``, needs no host synchronisation and is reproducible given ``noise``.

    Args:
        logits: ``(..., V)``, ``-inf`` for removed tokens (at least one finite per row).
        noise: ``(..., V)`` from :func:`sample_noise`, or None for greedy (argmax) decoding.

    Returns:
        ``(...)`` long indices into the last dimension.
    """
    if noise is None:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return (probs / noise.to(probs.dtype)).argmax(dim=-1)
