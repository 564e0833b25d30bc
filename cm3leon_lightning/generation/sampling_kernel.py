"""One Triton kernel for the sampling part of a fused decode step: guidance, constraint, temperature, top-p, draw.

:func:`~cm3leon_lightning.generation.decoder.pick_tokens` is ~20 small kernels per step (a cast, the guidance lerp,
the constraint, the division by the temperature, and for top-p a sort, softmax, cumsum, roll, comparison, scatter
and fill, then the softmax, division and argmax of the draw); in a CUDA graph each costs a few microseconds, which
at ~0.5 ms per step is a tenth of the budget. :func:`fused_pick_tokens` does it in one program per output row that
holds the row's logits in registers:

* guidance: ``torch.lerp(uncond, cond, cfg)`` (paper eq. 2) computed the way torch computes it;
* top-p without sorting: the nucleus is ``{i : p_i >= t*}`` with ``t*`` the largest probability whose tokens at or
  above it hold mass ``>= nucleus_mass(top_p)`` (as :func:`~cm3leon_lightning.generation.sampling.top_p_filter`).
  Probabilities are non-negative floats, whose bit patterns order like the floats, so ``t*`` is found by bisection
  over 31 bits (31 masked sums), exactly, with no sort;
* the draw is the exponential race of :func:`~cm3leon_lightning.generation.sampling.sample`, ``argmax(p / E)``
  over the nucleus.

It covers the decoding of images (methods ``greedy``, ``temperature`` and ``top_p``, one or two streams, an optional
constraint, rows of at most :data:`MAX_WIDTH` ids); :func:`fused_pick_tokens` returns None for the rest (CD-K, top-k,
three-stream editing guidance, text-wide rows), which the caller then samples with ``pick_tokens``. Tokens equal
``pick_tokens``' except where two candidates differ by float rounding (the nucleus sum is taken in another order).
Importing this module needs Triton (``TRITON_INTERPRET=1`` before the import runs it on CPU tensors, for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from cm3leon_lightning.generation.sampling import nucleus_mass
from cm3leon_lightning.model.fused_kernels import dependent_launch
from cm3leon_lightning.model.fused_launch import launch_options

if TYPE_CHECKING:  # the decoder imports this module when a fused step first runs
    from cm3leon_lightning.generation.decoder import SamplingSpec

MAX_WIDTH = 16384
"""The widest row (``hi - lo`` ids) one program holds in registers: the image codes of every preset (8192)."""


@triton.jit
def pick_kernel(
    logits_ptr,
    allowed_ptr,
    noise_ptr,
    out_ptr,
    R,
    W,
    lo,
    cfg,
    temperature,
    top_p,
    STREAMS: tl.constexpr,
    ALLOWED: tl.constexpr,
    GREEDY: tl.constexpr,
    TOP_P: tl.constexpr,
    W_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Row ``r``'s token from ``(STREAMS * R, W)`` stream-major logits; see the module docstring."""
    r = tl.program_id(0)
    if PDL:  # programmatic dependent launch, as the fused step's kernels
        dependent_launch()
    cols = tl.arange(0, W_PAD)
    ok = cols < W
    x = tl.load(logits_ptr + r * W + cols, mask=ok, other=0.0).to(tl.float32)
    if STREAMS == 2:  # torch.lerp(uncond, cond, cfg), with torch's two formulas
        u = tl.load(logits_ptr + (R + r) * W + cols, mask=ok, other=0.0).to(tl.float32)
        diff = x - u
        x = tl.where(tl.abs(cfg) < 0.5, u + cfg * diff, x - diff * (1.0 - cfg))
    x = tl.where(ok, x, float("-inf"))  # the padding of the row to a power of two
    if ALLOWED:
        x = tl.where(tl.load(allowed_ptr + cols, mask=ok, other=0) != 0, x, float("-inf"))
    if GREEDY:
        token = tl.argmax(x, axis=0)
    else:
        m = tl.max(x, axis=0)  # as process_logits: each logit's distance to the best, divided (x / T overflows)
        e = tl.exp(tl.where(x == m, 0.0, (x - m) / temperature))
        p = e / tl.sum(e, axis=0)  # (W_PAD,) probabilities, 0 outside the row and the constraint
        if TOP_P:
            bits = p.to(tl.int32, bitcast=True)  # p >= 0: bit patterns order like the values
            low = tl.zeros((), dtype=tl.int32)  # invariant: mass(low) >= top_p > mass(high)
            high = tl.max(bits, axis=0) + 1
            for _ in range(31):
                mid = low + (high - low) // 2
                enough = tl.sum(tl.where(bits >= mid, p, 0.0), axis=0) >= top_p
                low = tl.where(enough, mid, low)
                high = tl.where(enough, high, mid)
            p = tl.where(bits >= low, p, 0.0)  # the nucleus: every token at least as likely as the last one needed
        noise = tl.load(noise_ptr + r * W + cols, mask=ok, other=1.0)
        token = tl.argmax(p / noise, axis=0)
    tl.store(out_ptr + r, token.to(tl.int64) + lo)


def fused_pick_tokens(
    logits: Tensor, spec: SamplingSpec, allowed: Tensor | None, noise: Tensor | None
) -> Tensor | None:
    """``pick_tokens(logits, spec, allowed, noise)`` in one kernel, or None where the kernel does not apply.

    Args:
        logits: ``(S * R, hi - lo)`` stream-major logits of the sampled range.
        spec: the step's :class:`~cm3leon_lightning.generation.decoder.SamplingSpec`.
        allowed: optional ``(hi - lo,)`` bool constraint.
        noise: ``(R, hi - lo)`` exponential noise, or None when greedy.

    Returns:
        ``(R,)`` vocabulary ids, or None for CD-K, top-k, three streams, rows wider than :data:`MAX_WIDTH` or logits
        of the whole vocabulary.
    """
    width = spec.hi - spec.lo
    if (
        spec.method == "cd_k"
        or spec.top_k is not None
        or spec.streams == 3
        or width > MAX_WIDTH
        or logits.shape[-1] != width
        or not logits.is_contiguous()
    ):
        return None
    rows = logits.shape[0] // spec.streams
    if allowed is not None and (allowed.shape != (width,) or not allowed.is_contiguous()):
        raise ValueError(f"fused_pick_tokens: allowed {tuple(allowed.shape)} must be a contiguous ({width},) mask")
    if not spec.greedy and (noise is None or noise.shape != (rows, width) or not noise.is_contiguous()):
        raise ValueError(f"fused_pick_tokens: noise must be a contiguous ({rows}, {width}) tensor when sampling")
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    w_pad = triton.next_power_of_2(width)
    pick_kernel[(rows,)](
        logits, logits if allowed is None else allowed, logits if noise is None else noise, out, rows, width,
        spec.lo, float(spec.cfg), float(spec.temperature) or 1.0, nucleus_mass(spec.top_p),
        STREAMS=spec.streams, ALLOWED=allowed is not None, GREEDY=spec.greedy,
        TOP_P=spec.method == "top_p" and spec.top_p < 1.0, W_PAD=w_pad, num_warps=min(16, max(1, w_pad // 512)),
        **launch_options(logits.device),
    )  # fmt: skip
    return out
