"""A fused single-token decode step: five Triton kernels per block instead of ~10, one for the input.

At decode time each row feeds one token, so every matmul is a matrix-vector product over a few rows and a step is
a chain of small kernels whose count, not their arithmetic, sets the time (docs/benchmarks.md: ~10 kernels per
layer x 24 layers at 350m, ~1.2 ms per token on an H200 against ~0.2 ms to read the weights once). Here the input
is one kernel, ``x = decode_embed(idx, cache)`` (slot marked valid, token + position embedding), and a block is::

    q        = decode_linear(x, W_qkv, norm, cache)     # LayerNorm + QKV; keys/values written into the cache slot
    y        = decode_attention(q, cache)                # over the filled slots only
    x        = decode_linear(y, W_out, residual=x)       # out-projection + residual
    h        = decode_linear(x, W_in, norm, act)         # LayerNorm + up-projection + GELU/ReLU
    x        = decode_linear(h, W_down, residual=x)      # down-projection + residual

and the final LayerNorm is fused into the (sliced) LM head. With the ``prefetch_next`` launch option each linear
kernel is handed the next one's weight, and each attention kernel the next layer's cache, to ask into L2
(:mod:`~cm3leon_lightning.model.fused_launch` holds the options: PDL, the split kernels, this prefetch).
:func:`fused_decode_forward` gives the logits of ``model(idx, input_pos=input_pos, last_only=True,
logits_range=...)`` for ``(B, 1)`` tokens (equal up to float rounding: the tests compare them on CPU through
Triton's interpreter in float32). The decode modes ``fused`` and
``fused-graph`` of :mod:`~cm3leon_lightning.generation.graphs` use it. Triton is imported only when a fused step runs.
This module imports no Lightning.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from cm3leon_lightning.model.fused_launch import (
    FusedOptions,
    attention_splits,
    fused_options,
    launch_options,
    prefetch_mode,
    prefetches_next,
    split_counters,
)
from cm3leon_lightning.model.transformer import CM3Leon

ACTIVATIONS = {"gelu": 1, "relu": 2}
"""MLP activations the fused step supports (the kernel's ``ACT`` codes); SwiGLU models decode unfused."""


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``, for tests): Triton's own
    reading of the variable where Triton is installed (it also takes ``true``, ``on``, ``yes``), so that the kernels
    are never launched with the GPU-only choices (inline PTX, spinning waits, autotuning) while Triton interprets
    them."""
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one that reads only "1" (before its knobs)
        return os.environ.get("TRITON_INTERPRET") == "1"
    interpret = getattr(getattr(knobs, "runtime", None), "interpret", None)
    return os.environ.get("TRITON_INTERPRET") == "1" if interpret is None else bool(interpret)


def fused_available(device: torch.device) -> str | None:
    """None when the fused step can run on ``device``, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the fused decode step needs Triton (installed with torch's CUDA builds on Linux)"
    if device.type != "cuda" and not interpreting():
        return f"the fused decode step runs Triton kernels on CUDA (or on CPU with TRITON_INTERPRET=1); got {device}"
    return None


def fused_unsupported(model: CM3Leon, device: torch.device) -> str | None:
    """None when :func:`fused_decode_forward` can run ``model`` on ``device``, else the reason it cannot (no Triton,
    a CPU without the interpreter, an activation other than GELU/ReLU)."""
    return fused_available(device) or _activation_unsupported(model)


def _activation_unsupported(model: CM3Leon) -> str | None:
    """None when the fused kernels have the model's MLP activation, else the reason."""
    if model.config.activation in ACTIVATIONS:
        return None
    return f"the fused decode step supports activations {tuple(ACTIVATIONS)}, not {model.config.activation!r}"


INTERPRETER_TILES = {"BLOCK_N": 64, "BLOCK_K": 32, "PREFETCH": True}
"""The linear kernel's configuration under Triton's interpreter (tests): K = 48 then takes the prefetched first tile
and one partial tile of the loop."""

MAX_ROW_TILE = 64
"""The most rows (padded to a power of two, one more with LayerNorm) the linear kernel takes in one tile: every tile
configuration fits in shared memory up to here (~210 KB at most). With more rows (e.g. 8 prompts x 8 candidates with
CFG) a step's projections are real matrix products, done by cuBLAS (:func:`_unfused_linear`); the other fused kernels
take any number of rows."""

FIXED_TILES: dict[str, int | bool] | None = None
"""When set (e.g. ``{"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 4}``), the linear kernel runs with these tiles
instead of autotuning (the GPU tests, which would otherwise tune every small shape; reproducing one configuration).
Under the interpreter, :data:`INTERPRETER_TILES` apply unless this is set."""

PREFETCH_MAX_BYTES = 16 << 20
"""The most bytes a kernel prefetches into L2 (the ``prefetch_next`` option): all of the next weight of a 350m-760m
block (at most 8 MB bf16) or of the image-code head (16 MB), the first 16 MB of a text head (115 MB would only evict
itself from the 40-50 MB L2 of an A100/H100/H200); the next layer's cache in full at 2 rows (at most 8 MB at 350m), its
first slots at 16 (the first 256 of each row and head)."""


def decode_linear(
    x: Tensor,
    weight: Tensor,
    *,
    norm_eps: float | None = None,
    act: int = 0,
    residual: Tensor | None = None,
    cache: tuple[Tensor, Tensor, Tensor] | None = None,
    prefetch: Tensor | None = None,
) -> Tensor:
    """``epilogue(prologue(x) @ weight^T)`` for the ``(R, K)`` rows of one decode step, in one kernel.

    Args:
        x: ``(R, K)`` activations (contiguous).
        weight: ``(N, K)`` weight (a ``Linear``'s, or rows of one).
        norm_eps: apply the parameter-free LayerNorm to ``x`` first, with this epsilon.
        act: 0 none, 1 exact GELU, 2 ReLU.
        residual: ``(R, N)`` added to the result.
        cache: ``(k, v, input_pos)``: ``weight`` is a QKV projection (``N = 3C``); keys and values go to the cache
            buffers ``(R, H, S, D)`` at slot ``input_pos[0]`` and only the queries ``(R, C)`` are returned.
        prefetch: the next linear kernel's weight (contiguous): with the ``prefetch_next`` option on CUDA
            (:func:`~cm3leon_lightning.model.fused_launch.prefetches_next`), its first :data:`PREFETCH_MAX_BYTES` are
            asked into L2 as this kernel starts; otherwise ignored.

    Returns:
        ``(R, N)`` (``(R, C)`` with ``cache``) in ``x``'s dtype.
    """
    import triton

    from cm3leon_lightning.model import fused_linear_kernel as lk

    R, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or not x.is_contiguous() or weight.stride(1) != 1 or (N > 1 and weight.stride(0) != K):
        raise ValueError(
            f"decode_linear: x {tuple(x.shape)} must be contiguous and match weight {tuple(weight.shape)} (rows of "
            f"{K} contiguous values; strides {weight.stride()})"
        )
    if cache is None:
        k_buf = v_buf = slot = x  # unused by the kernel
        C = D = stride_b = stride_h = stride_s = 1
        out = torch.empty(R, N, device=x.device, dtype=x.dtype)
    else:
        k_buf, v_buf, slot = cache
        C, D = N // 3, k_buf.shape[-1]
        if (
            N % 3
            or k_buf.shape != v_buf.shape
            or k_buf.shape[0] != R
            or k_buf.shape[1] * D != C  # heads x head_dim: else keys of the last heads land in other rows' slots
            or k_buf.stride(3) != 1
            or v_buf.stride() != k_buf.stride()
        ):
            raise ValueError(f"decode_linear: cache buffers {tuple(k_buf.shape)} do not fit a QKV weight of {N} rows")
        stride_b, stride_h, stride_s = k_buf.stride(0), k_buf.stride(1), k_buf.stride(2)
        out = torch.empty(R, C, device=x.device, dtype=x.dtype)
    res = residual if residual is not None else x
    if residual is not None and (residual.shape != (R, N) or not residual.is_contiguous()):
        raise ValueError(f"decode_linear: residual {tuple(residual.shape)} must be a contiguous ({R}, {N})")
    norm = norm_eps is not None
    if max(16, triton.next_power_of_2(R + norm)) > MAX_ROW_TILE:
        return _unfused_linear(x, weight, norm_eps, act, residual, cache)
    flags = dict(
        R_PAD=max(16, triton.next_power_of_2(R + norm)),  # with NORM a padding row computes the row sums of W
        NORM=norm, ACT=act, RESIDUAL=residual is not None, CACHE=cache is not None, IEEE=weight.dtype == torch.float32,
    )  # fmt: skip
    tiles = FIXED_TILES if FIXED_TILES is not None else INTERPRETER_TILES if interpreting() else None
    options = fused_options()  # read once per launch
    launch, splits = launch_options(x.device, options), options.splits
    split = tiles.get("SPLIT_K", 1) > 1 if tiles is not None else splits and lk.split_allowed(N)
    if split and not lk.split_allowed(N):
        raise ValueError(
            f"decode_linear: split-K tiles {tiles} for {N} output columns (at most {16 * lk.SPLIT_MAX_BLOCKS})"
        )
    if split:  # float32 partial sums for the largest split tried, and the arrival counters
        size = (
            lk.workspace_size(N, flags["R_PAD"], [tiles]) if tiles is not None else _tuned_workspace(N, flags["R_PAD"])
        )
        part = torch.empty(size, device=x.device, dtype=torch.float32)  # whatever torch's default dtype
        counters = split_counters(x.device)
    else:
        part = counters = x  # unused by the kernel
    nxt, lines, mode = _next_weight(x, prefetch, options)
    args = (x, weight, out, res, k_buf, v_buf, slot, part, counters, R, N, K, C, D, stride_b, stride_h, stride_s,
            norm_eps or 0.0, nxt, lines)  # fmt: skip
    flags["PREFETCH_NEXT"] = mode
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))  # noqa: E731
    if tiles is not None:  # fixed tiles (the interpreter cannot time configurations)
        lk.decode_linear_kernel[grid(tiles)](*args, **tiles, **flags, **launch)
    else:
        lk.tuned_kernel(bool(launch), splits)[grid](*args, **flags, **launch)
    return out


def _next_weight(x: Tensor, prefetch: Tensor | None, options: FusedOptions | None = None) -> tuple[Tensor, int, int]:
    """``(weight, lines, mode)`` for :func:`decode_linear`'s prefetch: the 128-byte lines of the next weight to ask
    for (its first :data:`PREFETCH_MAX_BYTES`) and the kernel's ``PREFETCH_NEXT``; ``(x, 0, 0)`` (``x`` unused) when
    not prefetching."""
    if prefetch is None or not prefetches_next(x.device, options):
        return x, 0, 0
    if not prefetch.is_contiguous():
        raise ValueError(f"decode_linear: the weight to prefetch {tuple(prefetch.shape)} must be contiguous")
    lines = min(prefetch.numel() * prefetch.element_size(), PREFETCH_MAX_BYTES) // 128
    return prefetch, lines, prefetch_mode(x.device, aligned=prefetch.data_ptr() % 16 == 0) if lines else 0


@functools.cache
def _tuned_workspace(n: int, r_pad: int) -> int:
    """The split-K workspace any tuning configuration needs for ``n`` columns and ``r_pad`` rows (computed once per
    shape: it is asked at every launch)."""
    from cm3leon_lightning.model import fused_linear_kernel as lk

    return lk.workspace_size(n, r_pad, [c.kwargs for c in lk.PDL_CONFIGS])


def _unfused_linear(
    x: Tensor,
    weight: Tensor,
    norm_eps: float | None,
    act: int,
    residual: Tensor | None,
    cache: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """What :func:`decode_linear` computes, in torch ops (cuBLAS), for more rows than :data:`MAX_ROW_TILE` holds."""
    h = F.layer_norm(x, (x.shape[1],), eps=norm_eps) if norm_eps is not None else x
    y = F.linear(h, weight)
    y = F.gelu(y) if act == 1 else F.relu(y) if act == 2 else y
    y = y + residual if residual is not None else y
    if cache is None:
        return y
    k_buf, v_buf, slot = cache
    R, H, _, D = k_buf.shape
    C = weight.shape[0] // 3
    k_buf.index_copy_(2, slot, y[:, C : 2 * C].reshape(R, H, 1, D))
    v_buf.index_copy_(2, slot, y[:, 2 * C :].reshape(R, H, 1, D))
    return y[:, :C].contiguous()


def decode_embed(idx: Tensor, wte: Tensor, wpe: Tensor, valid: Tensor, input_pos: Tensor) -> Tensor:
    """The input of a decode step in one kernel: what ``cache.update_valid``, ``cache.positions`` and
    ``wte(idx) + wpe(pos)`` do in the model's forward (five to eight small kernels there).

    Args:
        idx: ``(B, 1)`` one token per row (any strides, e.g. the last column of the prompts).
        wte: ``(V, C)`` token embedding weight.
        wpe: ``(P, C)`` position embedding weight.
        valid: ``(B, S)`` bool, the cache's slot validity; slot ``input_pos[0]`` is set True in place.
        input_pos: ``(1,)`` the slot of the tokens.

    Returns:
        ``(B, C)`` embeddings in ``wte``'s dtype.
    """
    from cm3leon_lightning.model import fused_kernels as fk

    B, C = idx.shape[0], wte.shape[1]
    if (
        idx.shape != (B, 1)
        or not wte.is_contiguous()
        or not wpe.is_contiguous()
        or wpe.shape[1] != C
        or valid.shape[0] != B
        or valid.stride(1) != 1
    ):
        raise ValueError(
            f"decode_embed: tokens {tuple(idx.shape)}, embeddings {tuple(wte.shape)} / {tuple(wpe.shape)} and "
            f"validity {tuple(valid.shape)} do not fit (one token per row, contiguous weights of one width, slots "
            "contiguous)"
        )
    x = torch.empty(B, C, device=wte.device, dtype=wte.dtype)
    fk.decode_embed_kernel[(B,)](
        idx, wte, wpe, valid, input_pos, x, C, idx.stride(0), valid.stride(0),
        BLOCK_S=256, BLOCK_C=256, **launch_options(x.device),
    )  # fmt: skip
    return x


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Tensor,
    input_pos: Tensor,
    splits: int | None = None,
    prefetch: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Attention of one query per row over the KV cache, in one kernel that reads only the slots written so far.

    Same mask as :func:`~cm3leon_lightning.model.kv_cache.padding_causal_mask`: the query at slot ``input_pos[0]``
    sees the valid slots at or before its own, and always its own.

    Args:
        q: ``(B, C)`` queries, heads side by side (what the QKV kernel returns).
        k: ``(B, H, S, D)`` cached keys of the layer (``C = H * D``).
        v: ``(B, H, S, D)`` cached values, same strides as ``k``.
        valid: ``(B, S)`` bool, the cache's slot validity.
        input_pos: ``(1,)`` the slot of the queries.
        splits: programs per (row, head), each over a run of the filled slots, combined by the last to finish
            (flash-decoding); default :func:`~cm3leon_lightning.model.fused_launch.attention_splits` (1 unless the
            ``splits`` option is on; then one image with CFG at 350m: 32 pairs, 8 splits).
        prefetch: the next layer's key and value buffers (``k``'s shape and strides): with the ``prefetch_next``
            option on CUDA, their filled slots are asked into L2 (at most :data:`PREFETCH_MAX_BYTES` in all);
            otherwise ignored.

    Returns:
        ``(B, C)`` attention outputs, heads side by side (what the out-projection reads), in ``q``'s dtype.
    """
    import triton

    from cm3leon_lightning.model import fused_kernels as fk

    B, H, S, D = k.shape
    if (
        q.shape != (B, H * D)
        or not q.is_contiguous()
        or v.shape != k.shape
        or v.stride() != k.stride()
        or k.stride(3) != 1
        or valid.shape != (B, S)
        or valid.stride(1) != 1
    ):
        raise ValueError(
            f"decode_attention: queries {tuple(q.shape)} and validity {tuple(valid.shape)} do not fit the cache "
            f"{tuple(k.shape)} (keys/values must share strides, contiguous over head_dim)"
        )
    options = fused_options()  # read once per launch
    splits = attention_splits(B * H, q.device, options) if splits is None else splits
    if splits < 1:
        raise ValueError(f"decode_attention: splits must be at least 1, got {splits}")
    out = torch.empty_like(q)
    d_pad = max(16, triton.next_power_of_2(D))
    part = torch.empty(B * H * splits * (d_pad + 2), device=q.device, dtype=torch.float32) if splits > 1 else out
    counters = split_counters(q.device, B * H) if splits > 1 else out
    next_k, next_v, lines, mode = _next_cache(k, prefetch, options)
    fk.decode_attention_kernel[(B, H, splits)](
        q, k, v, valid, input_pos, out, part, counters, H * D, k.stride(0), k.stride(1), k.stride(2), valid.stride(0),
        D**-0.5, next_k, next_v, lines, HEAD_D=D, D_PAD=d_pad, BLOCK_S=fk.attention_block_s(d_pad, k.element_size()),
        IEEE=k.dtype == torch.float32, SPLITS=splits, PREFETCH_NEXT=mode, num_warps=4, num_stages=3,
        **launch_options(q.device, options),
    )  # fmt: skip
    return out


def _next_cache(
    k: Tensor, prefetch: tuple[Tensor, Tensor] | None, options: FusedOptions | None = None
) -> tuple[Tensor, Tensor, int, int]:
    """``(next_k, next_v, lines, mode)`` for :func:`decode_attention`'s prefetch: the lines of each (row, head)'s keys
    and of its values to ask for at most, and the kernel's ``PREFETCH_NEXT``; ``(k, k, 0, 0)`` when not
    prefetching."""
    if prefetch is None or not prefetches_next(k.device, options):
        return k, k, 0, 0
    next_k, next_v = prefetch
    B, H, _, D = k.shape
    if next_k.shape != k.shape or next_k.stride() != k.stride() or next_v.stride() != k.stride() or k.stride(2) != D:
        raise ValueError(f"decode_attention: the cache to prefetch {tuple(next_k.shape)} must be laid out as this one")
    lines = PREFETCH_MAX_BYTES // (2 * B * H * 128)
    rows = [next_k.data_ptr(), next_v.data_ptr(), k.stride(0) * k.element_size(), k.stride(1) * k.element_size()]
    return next_k, next_v, lines, prefetch_mode(k.device, aligned=all(a % 16 == 0 for a in rows)) if lines else 0


def fused_decode_forward(model: CM3Leon, idx: Tensor, input_pos: Tensor, logits_range: tuple[int, int]) -> Tensor:
    """The decode-step logits of ``model(idx, input_pos=input_pos, last_only=True, logits_range=logits_range)``.

    Args:
        model: a GELU or ReLU model with a KV cache (:meth:`CM3Leon.setup_kv_cache`), in eval mode.
        idx: ``(B, 1)`` one token per cache row.
        input_pos: ``(1,)`` long, the cache slot of the tokens.
        logits_range: ``(lo, hi)`` ids whose logits to compute.

    Returns:
        ``(B, 1, hi - lo)`` logits in the model's dtype; the cache is updated as the model's forward updates it.

    Raises:
        ValueError: a SwiGLU model, inputs the model's forward refuses (:func:`check_step_inputs`) or a range outside
            the vocabulary, before anything is written.
    """
    c, cache = model.config, model.kv_cache
    if cache is None:
        raise RuntimeError("fused_decode_forward needs a KV cache; call setup_kv_cache() first")
    reason = _activation_unsupported(model)
    if reason is not None:
        raise ValueError(reason)
    check_step_inputs(model, idx, input_pos, "fused_decode_forward")
    check_logits_range(model, logits_range)
    B = idx.shape[0]
    if fused_options().persistent:
        from cm3leon_lightning.model import persistent

        if persistent.persistent_unsupported(model, B) is None:  # else (over 63 rows) the kernels one by one
            return persistent.persistent_decode_forward(model, idx, input_pos, logits_range)
    x = decode_embed(idx, model.wte.weight, model.wpe.weight, cache.valid, input_pos)  # (B, C); marks the slot valid
    eps, act = c.layer_norm_eps, ACTIVATIONS[c.activation]
    lo, hi = logits_range
    weights = linear_weights(model, logits_range)  # in launch order: each kernel may prefetch the next one's
    nxt = iter(weights[1:] + weights[:1])  # the head prefetches the first block's QKV for the next step
    for layer, block in enumerate(model.blocks):
        k_all, v_all = cache.layer(layer)  # (B, H, S, D)
        cache_slot = (k_all, v_all, input_pos)
        q = decode_linear(x, block.attn.qkv.weight, norm_eps=eps, cache=cache_slot, prefetch=next(nxt))  # (B, C)
        next_cache = cache.layer((layer + 1) % len(model.blocks))  # its filled slots may be prefetched
        y = decode_attention(q, k_all, v_all, cache.valid, input_pos, prefetch=next_cache)  # (B, C), any attn.impl
        x = decode_linear(y, block.attn.out_proj.weight, residual=x, prefetch=next(nxt))
        h = decode_linear(x, block.mlp.fc_in.weight, norm_eps=eps, act=act, prefetch=next(nxt))  # (B, F)
        x = decode_linear(h, block.mlp.fc_out.weight, residual=x, prefetch=next(nxt))
    return decode_linear(x, weights[-1], norm_eps=eps, prefetch=next(nxt)).view(B, 1, hi - lo)


def check_step_inputs(model: CM3Leon, idx: Tensor, input_pos: Tensor, name: str) -> None:
    """Refuse the step inputs the model's forward refuses: ``idx`` not ``(B, 1)`` for the cache's ``B`` rows,
    ``input_pos`` not a ``(1,)`` long tensor, or (where it costs no device sync: on the CPU, i.e. under the
    interpreter) a slot outside the cache. The kernels read the slot on the device: a slot past the cache wrote
    keys, values and validity into other rows' memory (under the interpreter it corrupted the process's heap), a
    float one failed deep in Triton.

    Raises:
        ValueError: naming ``name`` (the function called), the argument and what it got.
    """
    B, S = model.kv_cache.batch_size, model.kv_cache.max_seq_len
    if idx.shape != (B, 1) or input_pos.shape != (1,):
        raise ValueError(
            f"{name} takes one token per cache row: idx {tuple(idx.shape)} must be ({B}, 1) and input_pos "
            f"{tuple(input_pos.shape)} must be (1,)"
        )
    if input_pos.dtype != torch.long:
        raise ValueError(f"{name}: input_pos must be a long tensor, got {input_pos.dtype}")
    if input_pos.device.type == "cpu" and not 0 <= int(input_pos) < S:
        raise ValueError(
            f"{name}: input_pos slot {int(input_pos)} must lie in [0, {S}) (the KV cache's max_seq_len; "
            "setup_kv_cache(batch_size, max_seq_len) allocates more)"
        )


def check_logits_range(model: CM3Leon, logits_range: tuple[int, int]) -> None:
    """Refuse a sampled range the model's forward refuses (the head's rows ``[lo, hi)`` are read by the kernels as
    ``hi - lo`` rows: past the vocabulary they would be read out of bounds, an empty range would give empty logits).

    Raises:
        ValueError: not ``0 <= lo < hi <= vocab_size``.
    """
    lo, hi = logits_range
    if not 0 <= lo < hi <= model.config.vocab_size:
        raise ValueError(
            f"fused decode step: logits_range {tuple(logits_range)} must satisfy 0 <= lo < hi <= vocab_size "
            f"{model.config.vocab_size}"
        )


def linear_weights(model: CM3Leon, logits_range: tuple[int, int]) -> list[Tensor]:
    """The weights :func:`fused_decode_forward` multiplies by, in launch order: per block QKV, out-projection,
    up-projection, down-projection, then the LM head's rows ``[lo, hi)``."""
    lo, hi = logits_range
    weights = []
    for block in model.blocks:
        weights += [block.attn.qkv.weight, block.attn.out_proj.weight, block.mlp.fc_in.weight, block.mlp.fc_out.weight]
    return weights + [model.lm_head.weight[lo:hi]]
