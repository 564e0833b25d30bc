"""The fused decode step's linear kernel (:mod:`cm3leon_lightning.model.fused`) and its autotuning.

:func:`decode_linear_kernel` computes ``out = epilogue(prologue(x) @ W^T)`` for the few rows of a decode step (one
token per row: ``x`` is ``(R, K)`` with R the streams x candidates, at most a few dozen), specialised by compile-time
flags:

* ``NORM``: LayerNorm without parameters over each row of ``x`` first (paper section 2.3), computed in the kernel:
  in one pass over ``x`` (raw ``x`` multiplied, its statistics gathered alongside, the result corrected after the
  loop; ``R_PAD > R``, one padding row computes ``W``'s row sums), or, with split-K, statistics first;
* ``ACT``: 0 none, 1 exact GELU, 2 ReLU on the result;
* ``RESIDUAL``: add ``res`` (the residual stream) to the result;
* ``CACHE``: the columns ``[C, 3C)`` of a QKV projection are keys and values: write them into the KV cache slot
  ``slot`` (layout ``(B, H, S, D)``) instead of ``out``, which receives only the queries ``[0, C)``.

Each program owns ``BLOCK_N`` output columns for all rows and streams its ``BLOCK_N x K`` slice of ``W`` once; the rows
are padded to ``R_PAD >= 16`` for ``tl.dot``. With ``SPLIT_K > 1`` the ``K`` axis is split over ``SPLIT_K`` programs per
column block (more programs, more weight bytes in flight: at 350m a 1024-wide projection is only 64 blocks of 16
columns for 132 SMs); each writes its float32 partial sums to a workspace, and the last to finish (counted with an
atomic) adds them in split order, applies the epilogue and resets the counter for the next launch.

With ``PDL`` the kernel starts by :func:`~cm3leon_lightning.model.fused_kernels.dependent_launch`, and may first load
its first weight tile (``PREFETCH``), which does not depend on the previous kernel. With ``PREFETCH_NEXT`` (1: line
by line, 2: in bulk) every program first asks the L2 cache for its share of ``next_lines`` 128-byte lines from
``next_ptr`` (the next linear kernel's weights; :func:`~cm3leon_lightning.model.fused_kernels.prefetch_l2`). The tile
sizes are autotuned on the GPU (:func:`tuned_kernel` over :func:`configs_for`).

Importing this module needs Triton; with ``TRITON_INTERPRET=1`` set before the import the kernel runs on CPU tensors
(float32), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import triton
import triton.language as tl

from cm3leon_lightning.model.fused_kernels import PREFETCH_CHUNK, dependent_launch, prefetch_l2


@triton.jit
def accumulate_tile(
    acc, s1, s2, x_ptr, w, rows, R, ks, k_hi, K, mean, rstd, NORM: tl.constexpr, STATS: tl.constexpr,
    IEEE: tl.constexpr, LOAD: tl.constexpr = "",
):  # fmt: skip
    """``acc + prologue(x[:, ks]) @ w^T`` for one ``(BLOCK_N, BLOCK_K)`` weight tile ``w`` at columns ``ks < k_hi``
    of ``x`` (``R`` rows of ``K``), and the running row sums ``s1``, ``s2`` of ``x`` and ``x**2``.

    ``NORM`` without ``STATS``: ``x`` is normalised with the given ``mean`` and ``rstd`` first. ``STATS`` (the
    LayerNorm in one pass): raw ``x`` is multiplied, its row sums are accumulated, and row ``R`` (padding) is ones,
    so that row ``R`` of the result accumulates the row sums of ``W``: :func:`normalise_after` then applies
    ``LN(x) @ W^T = rstd * (x @ W^T - mean * rowsum(W))``. ``LOAD``: the cache modifier of the loads of ``x``
    (``".cg"`` where another program of the same launch wrote it)."""
    x_ok = (rows < R)[:, None] & (ks[None, :] < k_hi)
    xk = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_ok, other=0.0, cache_modifier=LOAD)
    if STATS:
        xf = xk.to(tl.float32)
        s1 += tl.sum(xf, axis=1)
        s2 += tl.sum(xf * xf, axis=1)
        xk = tl.where((rows == R)[:, None] & (ks[None, :] < k_hi), 1.0, xf)
    elif NORM:
        xk = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None]
    xk = xk.to(w.dtype)  # the product in the weights' dtype (eager rounds the normalised activations so too)
    if IEEE:  # float32 weights: full-precision products, as torch's float32 matmul (no TF32)
        return acc + tl.dot(xk, tl.trans(w), input_precision="ieee"), s1, s2
    return acc + tl.dot(xk, tl.trans(w)), s1, s2


@triton.jit
def normalise_after(acc, s1, s2, rows, R, K, eps):
    """The one-pass LayerNorm's correction (see :func:`accumulate_tile`): ``rstd * (acc - mean * rowsum(W))``, with
    ``rowsum(W)`` read from row ``R`` of ``acc`` and the statistics from the row sums of ``x`` over all of ``K``."""
    mean = s1 / K
    rstd = tl.math.rsqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
    w_sums = tl.sum(tl.where((rows == R)[:, None], acc, 0.0), axis=0)  # (BLOCK_N,)
    return (acc - mean[:, None] * w_sums[None, :]) * rstd[:, None]


@triton.jit
def finish_linear(
    acc, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, rows, cols, row_ok, col_ok, N, C, D, stride_cb, stride_ch,
    stride_cs, ACT: tl.constexpr, RESIDUAL: tl.constexpr, CACHE: tl.constexpr, LOAD: tl.constexpr = "",
):  # fmt: skip
    """The epilogue of :func:`decode_linear_kernel` on the ``(R_PAD, BLOCK_N)`` float32 sums ``acc``: activation,
    residual (loaded with the cache modifier ``LOAD``), and the stores (queries to ``out`` and keys/values to the
    cache slot with ``CACHE``)."""
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    if RESIDUAL:
        res_ok = row_ok[:, None] & col_ok[None, :]
        res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=res_ok, other=0.0, cache_modifier=LOAD)
        acc += res.to(tl.float32)
    if CACHE:
        slot = tl.load(slot_ptr)
        is_k = (cols >= C) & (cols < 2 * C)
        is_v = (cols >= 2 * C) & col_ok
        kv_col = tl.where(is_v, cols - 2 * C, cols - C)
        head, dim = kv_col // D, kv_col % D
        where = rows[:, None] * stride_cb + head[None, :] * stride_ch + slot * stride_cs + dim[None, :]
        tl.store(k_ptr + where, acc.to(k_ptr.dtype.element_ty), mask=row_ok[:, None] & is_k[None, :])
        tl.store(v_ptr + where, acc.to(v_ptr.dtype.element_ty), mask=row_ok[:, None] & is_v[None, :])
        out_cols, out_ok = C, cols < C
    else:
        out_cols, out_ok = N, col_ok
    out = out_ptr + rows[:, None] * out_cols + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def block_span(pid, split, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The output columns ``cols`` (and ``cols < N``) of column block ``pid`` and the ``[k_lo, k_hi)`` share of ``K``
    of its split ``split`` (whole tiles per split; all of ``K`` when ``SPLIT_K == 1``)."""
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole tiles per split
    k_lo = split * k_per
    return cols, cols < N, k_lo, tl.minimum(k_lo + k_per, K)


@triton.jit
def weight_tile(w_ptr, cols, col_ok, k0, k_hi, K, BLOCK_K: tl.constexpr):
    """The ``(BLOCK_N, BLOCK_K)`` tile of ``W`` at rows ``cols`` and columns from ``k0`` (zeros past ``k_hi``)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < k_hi), other=0.0)


@triton.jit
def linear_block(
    x_ptr, w_ptr, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, part_ptr, count_ptr, R, N, K, C, D, stride_cb, stride_ch,
    stride_cs, eps, pid, split, blocks, w_first, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, CACHE: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr, SPLIT_K: tl.constexpr, LOAD: tl.constexpr = "",
):  # fmt: skip
    """The work of program ``(pid, split)`` of :func:`decode_linear_kernel` once its inputs are ready, ``blocks``
    column blocks in all; with ``PREFETCH``, ``w_first`` is its first weight tile, loaded already
    (:func:`weight_tile`). ``LOAD``: the cache modifier of the loads of ``x`` and the residual. Returns whether this
    program wrote the block's outputs (always without split-K; with it, the last split to arrive)."""
    rows = tl.arange(0, R_PAD)
    cols, col_ok, k_lo, k_hi = block_span(pid, split, N, K, BLOCK_N, BLOCK_K, SPLIT_K)
    row_ok = rows < R
    s1 = tl.zeros((R_PAD,), dtype=tl.float32)
    s2 = tl.zeros((R_PAD,), dtype=tl.float32)
    STATS: tl.constexpr = NORM and SPLIT_K == 1  # the LayerNorm's statistics gathered in the main loop
    if NORM and not STATS:  # a split sees part of K: row statistics of x over all of it first (x is small, in L2)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_ok = row_ok[:, None] & (ks[None, :] < K)
            xk = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=x_ok, other=0.0, cache_modifier=LOAD)
            xk = xk.to(tl.float32)
            s1 += tl.sum(xk, axis=1)
            s2 += tl.sum(xk * xk, axis=1)
        mean = s1 / K
        rstd = tl.math.rsqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
    else:
        mean = tl.zeros((R_PAD,), dtype=tl.float32)  # unused
        rstd = mean
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        first = k_lo + tl.arange(0, BLOCK_K)
        acc, s1, s2 = accumulate_tile(acc, s1, s2, x_ptr, w_first, rows, R, first, k_hi, K, mean, rstd, NORM, STATS,
                                      IEEE, LOAD)  # fmt: skip
    for k0 in range(k_lo + BLOCK_K if PREFETCH else k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < k_hi), other=0.0)
        acc, s1, s2 = accumulate_tile(acc, s1, s2, x_ptr, w, rows, R, ks, k_hi, K, mean, rstd, NORM, STATS, IEEE,
                                      LOAD)  # fmt: skip
    if STATS:
        acc = normalise_after(acc, s1, s2, rows, R, K, eps)
    wrote = tl.full((), 1, tl.int1)
    if SPLIT_K == 1:
        finish_linear(acc, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, rows, cols, row_ok, col_ok, N, C, D,
                      stride_cb, stride_ch, stride_cs, ACT, RESIDUAL, CACHE, LOAD)  # fmt: skip
    else:
        tile = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (R_PAD, BLOCK_N) offsets in one partial
        tl.store(part_ptr + (split * blocks + pid) * R_PAD * BLOCK_N + tile, acc)
        tl.debug_barrier()  # every thread's partial stored before the count is raised (release covers them)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        wrote = arrived == SPLIT_K - 1
        if wrote:  # the last split of this column block: sum the partials in split order
            total = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + (j * blocks + pid) * R_PAD * BLOCK_N + tile, cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)  # ready for the next launch (a CUDA graph replays this one)
            finish_linear(total, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, rows, cols, row_ok, col_ok, N, C, D,
                          stride_cb, stride_ch, stride_cs, ACT, RESIDUAL, CACHE, LOAD)  # fmt: skip
    return wrote


@triton.jit
def decode_linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    part_ptr,
    count_ptr,
    R,
    N,
    K,
    C,
    D,
    stride_cb,
    stride_ch,
    stride_cs,
    eps,
    next_ptr,
    next_lines,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    ACT: tl.constexpr,
    RESIDUAL: tl.constexpr,
    CACHE: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
    SPLIT_K: tl.constexpr = 1,
    PREFETCH_NEXT: tl.constexpr = 0,
):
    """``out[R, N] = epilogue(prologue(x[R, K]) @ w[N, K]^T)``; see the module docstring for the flags.

    Program ``(pid, split)`` computes columns ``[pid * BLOCK_N, (pid + 1) * BLOCK_N)`` over its share of ``K``
    (all of it when ``SPLIT_K == 1``; :func:`linear_block`). With ``SPLIT_K > 1``, ``part_ptr`` is a float32
    workspace of ``SPLIT_K * cdiv(N, BLOCK_N) * R_PAD * BLOCK_N`` and ``count_ptr`` one int32 per column block, zero
    before the launch (and left zero after it)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if PREFETCH_NEXT:  # the next kernel's weights depend on nothing: on their way to L2 while this one works
        programs = tl.num_programs(0)
        prefetch_l2(
            next_ptr, next_lines, split * programs + pid, programs * SPLIT_K, PREFETCH_CHUNK, PREFETCH_NEXT == 2
        )
    if PREFETCH:  # the first weight tile, loaded before the wait: weights never depend on the previous kernel
        cols, col_ok, k_lo, k_hi = block_span(pid, split, N, K, BLOCK_N, BLOCK_K, SPLIT_K)
        w_first = weight_tile(w_ptr, cols, col_ok, k_lo, k_hi, K, BLOCK_K)
    else:
        w_first = tl.zeros((BLOCK_N, BLOCK_K), dtype=w_ptr.dtype.element_ty)  # unused
    if PDL:
        dependent_launch()
    linear_block(x_ptr, w_ptr, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, part_ptr, count_ptr, R, N, K, C, D,
                 stride_cb, stride_ch, stride_cs, eps, pid, split, tl.num_programs(0), w_first, R_PAD, BLOCK_N,
                 BLOCK_K, NORM, ACT, RESIDUAL, CACHE, IEEE, PREFETCH, SPLIT_K)  # fmt: skip


UNSPLIT_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=3) for n in (16, 32, 64) for k in (128, 256)
]
"""Tile sizes with the whole ``K`` per program: enough columns per program to fill the machine (``BLOCK_N``) and
long enough copies to hide latency (``BLOCK_K``)."""

SPLIT_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": 128, "SPLIT_K": k}, num_warps=4, num_stages=3)
    for k in (2, 4, 8)
    for n in (16, 32)
]
"""Split-K tile sizes, for the narrow projections (``N`` = 1024 at 350m: 64 programs of 16 columns, each streaming
a 32 KB slice of ``W`` with ~24 KB in flight, for 132 SMs; the first GPU profile found the linear kernel at about
1 TB/s). Tried only where :func:`split_allowed`."""

PREFETCHING_CONFIGS = [
    triton.Config({**c.kwargs, "PREFETCH": True}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in UNSPLIT_CONFIGS + SPLIT_CONFIGS
    if c.kwargs["BLOCK_K"] == 128
]
"""With programmatic dependent launch, the 128-wide tile sizes also with ``PREFETCH``: the first weight tile loaded
before waiting for the previous kernel (it overlaps that kernel's tail, at the cost of registers held across the wait;
with 256-wide tiles that is up to 128 registers a thread)."""


def configs_for(pdl: bool, splits: bool) -> list[triton.Config]:
    """What the autotuner tries for launches with (``pdl``) or without programmatic dependent launch, with or
    without the split-K configurations (``splits``): :data:`UNSPLIT_CONFIGS`, then :data:`SPLIT_CONFIGS`, then the
    prefetching versions of those of them that have 128-wide tiles."""
    plain = UNSPLIT_CONFIGS + (SPLIT_CONFIGS if splits else [])
    return plain + [c for c in PREFETCHING_CONFIGS if pdl and (splits or c.kwargs.get("SPLIT_K", 1) == 1)]


CONFIGS = configs_for(pdl=False, splits=True)
"""Every configuration without PDL (each costs a compilation on the GPU, ~0.4 s, cached on disk by Triton, and a
25 ms timing per shape)."""

PDL_CONFIGS = configs_for(pdl=True, splits=True)
"""Every configuration the kernel may run with (the compile tests build them all; they size the split-K
workspace)."""


def workspace_size(n: int, r_pad: int, tiles: list[dict]) -> int:
    """Float32 elements of split-K workspace the largest of ``tiles`` (configurations' keyword arguments) needs for
    ``n`` output columns and ``r_pad`` rows: ``SPLIT_K`` partial ``(r_pad, BLOCK_N)`` tiles per column block."""
    return max(t.get("SPLIT_K", 1) * triton.cdiv(n, t["BLOCK_N"]) * t["BLOCK_N"] * r_pad for t in tiles)


SPLIT_MAX_BLOCKS = 1024
"""Split-K is tried only when ``N`` has at most this many 16-column blocks (``N <= 16384``): wider outputs (the LM
head over the text vocabulary) have programs enough, and this bounds the workspace and the counters."""


def split_allowed(n: int) -> bool:
    """Whether split-K configurations are tried (and a workspace allocated) for an output of ``n`` columns."""
    return triton.cdiv(n, 16) <= SPLIT_MAX_BLOCKS


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: drop split-K configurations where :func:`split_allowed` is false or a
    split would get no ``K`` at all (``K`` too short for ``SPLIT_K`` tiles)."""
    n, k = named_args["N"], named_args["K"]

    def useful(c: triton.Config) -> bool:
        split, block_k = c.kwargs.get("SPLIT_K", 1), c.kwargs["BLOCK_K"]
        per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        return split == 1 or (split_allowed(n) and (split - 1) * per < k)

    return [c for c in configs if useful(c)]


KEY = ["N", "K", "R_PAD", "NORM", "ACT", "RESIDUAL", "CACHE"]


def quick_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """The autotuner's timing, shortened (5 ms warm-up, 20 ms of repeats instead of 25 + 100): a decode step's
    kernels take microseconds, and every configuration of every launch shape is timed while the step warms up."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotuned(configs: list[triton.Config]) -> triton.runtime.Autotuner:
    """:func:`decode_linear_kernel` autotuned over ``configs`` per :data:`KEY`, pruned by :func:`prune_configs`,
    timed by :func:`quick_bench`, and the timings kept in Triton's cache directory (``~/.triton/cache``; delete it to
    tune again) so that a later process starts decoding without tuning, where this Triton's ``autotune`` takes a
    benchmark function and caches results."""
    parameters = inspect.signature(triton.autotune).parameters
    options = {"do_bench": quick_bench} if "do_bench" in parameters else {}
    if "cache_results" in parameters:
        options["cache_results"] = True
    prune = {"early_config_prune": prune_configs}
    return triton.autotune(configs=configs, key=KEY, prune_configs_by=prune, **options)(decode_linear_kernel)


@functools.cache
def tuned_kernel(pdl: bool, splits: bool) -> triton.runtime.Autotuner:
    """:func:`decode_linear_kernel` with its tiles chosen by timing :func:`configs_for` ``(pdl, splits)`` on the
    device: one autotuner per choice, so that switching the options in one process tunes each set once (Triton's disk
    cache keys the timings by the configurations tried)."""
    return autotuned(configs_for(pdl, splits))
