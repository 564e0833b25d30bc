"""Triton kernels of the fused single-token decode step (:mod:`cm3leon_lightning.model.fused`).

One kernel, :func:`decode_linear_kernel`, computes ``out = epilogue(prologue(x) @ W^T)`` for the few rows of a decode
step (one token per row: ``x`` is ``(R, K)`` with R the streams x candidates, at most a few dozen), specialised by
compile-time flags:

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

:func:`decode_attention_kernel` is the step's attention: one query per row attends over the cache slots up to its own,
skipping padding, and reads only the slots written so far (the loop ends at ``slot``, read on the device, so a CUDA
graph replays it at every step).

With ``PDL`` (a GPU of compute capability 9.0 or later), each kernel starts by :func:`dependent_launch`; the linear
kernel may first load its first weight tile (``PREFETCH``), which does not depend on the previous kernel.

Importing this module needs Triton; with ``TRITON_INTERPRET=1`` set before the import the kernels run on CPU tensors
(float32), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import triton
import triton.language as tl


@triton.jit
def dependent_launch():
    """Programmatic dependent launch (sm_90+, kernels launched with ``launch_pdl=True``): wait until the previous
    kernel in the stream has finished and its writes are visible, then let the next one be scheduled. Called first
    thing by every kernel here (with ``PDL``): nothing is read or written before the wait, and the next kernel's
    launch and set-up (its prefetched weight tile) overlap this one's work. Signalling before the wait (the first
    version) let every later kernel of the step launch at once, each waiting on the one before: 0.24 ms per step
    slower on an H200 than no PDL at all."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def accumulate_tile(
    acc, s1, s2, x_ptr, w, rows, R, ks, k_hi, K, mean, rstd, NORM: tl.constexpr, STATS: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """``acc + prologue(x[:, ks]) @ w^T`` for one ``(BLOCK_N, BLOCK_K)`` weight tile ``w`` at columns ``ks < k_hi``
    of ``x`` (``R`` rows of ``K``), and the running row sums ``s1``, ``s2`` of ``x`` and ``x**2``.

    ``NORM`` without ``STATS``: ``x`` is normalised with the given ``mean`` and ``rstd`` first. ``STATS`` (the
    LayerNorm in one pass): raw ``x`` is multiplied, its row sums are accumulated, and row ``R`` (padding) is ones,
    so that row ``R`` of the result accumulates the row sums of ``W``: :func:`normalise_after` then applies
    ``LN(x) @ W^T = rstd * (x @ W^T - mean * rowsum(W))``."""
    xk = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < R)[:, None] & (ks[None, :] < k_hi), other=0.0)
    if STATS:
        xf = xk.to(tl.float32)
        s1 += tl.sum(xf, axis=1)
        s2 += tl.sum(xf * xf, axis=1)
        xk = tl.where((rows == R)[:, None] & (ks[None, :] < k_hi), 1.0, xf)
    elif NORM:
        xk = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None]
    xk = xk.to(w.dtype)  # as eager: the normalised activations are rounded to the weights' dtype
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
    stride_cs, ACT: tl.constexpr, RESIDUAL: tl.constexpr, CACHE: tl.constexpr,
):  # fmt: skip
    """The epilogue of :func:`decode_linear_kernel` on the ``(R_PAD, BLOCK_N)`` float32 sums ``acc``: activation,
    residual, and the stores (queries to ``out`` and keys/values to the cache slot with ``CACHE``)."""
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
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
):
    """``out[R, N] = epilogue(prologue(x[R, K]) @ w[N, K]^T)``; see the module docstring for the flags.

    Program ``(pid, split)`` computes columns ``[pid * BLOCK_N, (pid + 1) * BLOCK_N)`` over its share of ``K``
    (all of it when ``SPLIT_K == 1``). With ``SPLIT_K > 1``, ``part_ptr`` is a float32 workspace of
    ``SPLIT_K * cdiv(N, BLOCK_N) * R_PAD * BLOCK_N`` and ``count_ptr`` one int32 per column block, zero before the
    launch (and left zero after it)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, R_PAD)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole tiles per split
    k_lo = split * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    if PREFETCH:  # the first weight tile, loaded before the wait: weights never depend on the previous kernel
        first = k_lo + tl.arange(0, BLOCK_K)
        first_ok = col_ok[:, None] & (first[None, :] < k_hi)
        w_first = tl.load(w_ptr + cols[:, None] * K + first[None, :], mask=first_ok, other=0.0)
    if PDL:
        dependent_launch()
    s1 = tl.zeros((R_PAD,), dtype=tl.float32)
    s2 = tl.zeros((R_PAD,), dtype=tl.float32)
    STATS: tl.constexpr = NORM and SPLIT_K == 1  # the LayerNorm's statistics gathered in the main loop
    if NORM and not STATS:  # a split sees part of K: row statistics of x over all of it first (x is small, in L2)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
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
        acc, s1, s2 = accumulate_tile(acc, s1, s2, x_ptr, w_first, rows, R, first, k_hi, K, mean, rstd, NORM, STATS,
                                      IEEE)  # fmt: skip
    for k0 in range(k_lo + BLOCK_K if PREFETCH else k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < k_hi), other=0.0)
        acc, s1, s2 = accumulate_tile(acc, s1, s2, x_ptr, w, rows, R, ks, k_hi, K, mean, rstd, NORM, STATS, IEEE)
    if STATS:
        acc = normalise_after(acc, s1, s2, rows, R, K, eps)
    if SPLIT_K == 1:
        finish_linear(acc, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, rows, cols, row_ok, col_ok, N, C, D,
                      stride_cb, stride_ch, stride_cs, ACT, RESIDUAL, CACHE)  # fmt: skip
    else:
        blocks = tl.num_programs(0)
        tile = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (R_PAD, BLOCK_N) offsets in one partial
        tl.store(part_ptr + (split * blocks + pid) * R_PAD * BLOCK_N + tile, acc)
        tl.debug_barrier()  # every thread's partial stored before the count is raised (release covers them)
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split of this column block: sum the partials in split order
            total = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + (j * blocks + pid) * R_PAD * BLOCK_N + tile, cache_modifier=".cg")
            tl.store(count_ptr + pid, 0)  # ready for the next launch (a CUDA graph replays this one)
            finish_linear(total, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, rows, cols, row_ok, col_ok, N, C, D,
                          stride_cb, stride_ch, stride_cs, ACT, RESIDUAL, CACHE)  # fmt: skip


@triton.jit
def decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    slot_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    C,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_vb,
    scale,
    HEAD_D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr = False,
    SPLITS: tl.constexpr = 1,
):
    """``out[b, h*D:(h+1)*D] = softmax(q k^T * scale) v`` for one query per row (programs ``(b, h, split)``).

    ``q`` and ``out`` are ``(B, C)`` (heads side by side, as the QKV kernel writes the queries and the out-projection
    reads them); keys and values are the cache buffers ``(B, H, S, D)``; the query at slot ``slot`` attends to the slots
    ``<= slot`` whose ``valid[b, s]`` is set, and always to its own (``padding_causal_mask``). Online softmax over
    ``BLOCK_S`` slots at a time in float32; slots after ``slot`` are never read. The query is row 0 of a 16-row tile
    (the other rows are zeros, computed and dropped) so that both products are ``tl.dot``: Triton then pipelines the
    key and value loads (asynchronous copies several tiles ahead), which it does not do for loads feeding reductions.

    With ``SPLITS > 1`` (flash-decoding) the filled slots are split into at most ``SPLITS`` runs of whole tiles, one
    per program (``runs`` of them hold slots; early in the cache fewer, and one run writes ``out`` itself); each
    writes its running max, sum and unnormalised output (``D_PAD + 2`` floats at ``part_ptr``) and raises the counter
    of its ``(b, h)`` in ``count_ptr`` (zero before the launch and after it); the last to arrive combines the runs in
    split order and writes ``out``.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        dependent_launch()
    rows = tl.arange(0, 16)
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_D
    first = rows[:, None] == 0
    q = tl.load(q_ptr + b * C + h * HEAD_D + rows[:, None] * 0 + dims[None, :], mask=first & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)  # (16, D_PAD), row 0 the query
    slot = tl.load(slot_ptr)
    tiles = tl.cdiv(slot + 1, BLOCK_S)
    if SPLITS == 1:  # one run, known when compiling (no hand-off compiled in)
        per = tiles
        runs = 1
    else:
        per = tl.cdiv(tiles, SPLITS)  # whole tiles per run
        runs = tl.cdiv(tiles, per)  # runs holding slots: fewer than SPLITS early in the cache (the others idle)
    if split < runs:
        s_lo = split * per * BLOCK_S
        s_hi = tl.minimum(s_lo + per * BLOCK_S, slot + 1)
        kv = k_ptr + b * stride_cb + h * stride_ch  # this row's and head's keys; values at the same offsets
        vv = v_ptr + b * stride_cb + h * stride_ch
        m = tl.full((16,), -1.0e30, tl.float32)  # running max (finite: a tile of padding must not give inf - inf)
        total = tl.zeros((16,), dtype=tl.float32)  # running sum of exp(score - m)
        acc = tl.zeros((16, D_PAD), dtype=tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < s_hi
            keep = (s_ok & (tl.load(valid_ptr + b * stride_vb + s, mask=s_ok, other=0) != 0)) | (s == slot)
            where = s[:, None] * stride_cs + dims[None, :]
            tile_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(kv + where, mask=tile_ok, other=0.0)  # (BLOCK_S, D_PAD)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (16, BLOCK_S)
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(keep[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            rescale = tl.exp(m - m_new)
            v = tl.load(vv + where, mask=tile_ok, other=0.0)
            total = total * rescale + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = out_ptr + b * C + h * HEAD_D + rows[:, None] * 0 + dims[None, :]
        if runs == 1:
            tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=first & d_ok[None, :])
        else:
            pair = b * tl.num_programs(1) + h
            run = part_ptr + (pair * SPLITS + split) * (D_PAD + 2)  # [max, sum, output (D_PAD)] of this run
            tl.store(run + rows * 0, m, mask=rows == 0)
            tl.store(run + 1 + rows * 0, total, mask=rows == 0)
            tl.store(run + 2 + rows[:, None] * 0 + dims[None, :], acc, mask=first)
            tl.debug_barrier()  # every thread's stores before the count is raised (the release covers them)
            arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel")
            if arrived == runs - 1:  # the last run of this (row, head) to finish: combine them in split order
                base = part_ptr + pair * SPLITS * (D_PAD + 2)
                m_all = tl.full((), -1.0e30, tl.float32)
                for j in tl.static_range(SPLITS):
                    m_j = tl.load(base + j * (D_PAD + 2), mask=j < runs, other=-1.0e30, cache_modifier=".cg")
                    m_all = tl.maximum(m_all, m_j)
                num = tl.zeros((D_PAD,), dtype=tl.float32)
                den = tl.zeros((), dtype=tl.float32)
                for j in tl.static_range(SPLITS):
                    run_j = base + j * (D_PAD + 2)
                    m_j = tl.load(run_j, mask=j < runs, other=-1.0e30, cache_modifier=".cg")
                    weight = tl.exp(m_j - m_all)  # 0 for a run of padding only
                    den += weight * tl.load(run_j + 1, mask=j < runs, other=0.0, cache_modifier=".cg")
                    num += weight * tl.load(run_j + 2 + dims, mask=j < runs, other=0.0, cache_modifier=".cg")
                tl.store(count_ptr + pair, 0)  # ready for the next launch (a CUDA graph replays this one)
                tl.store(out_ptr + b * C + h * HEAD_D + dims, (num / den).to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def decode_embed_kernel(
    idx_ptr,
    wte_ptr,
    wpe_ptr,
    valid_ptr,
    slot_ptr,
    x_ptr,
    C,
    stride_ib,
    stride_vb,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The input of a decode step for row ``b``: mark slot ``slot`` valid, count the valid slots before it (the
    token's position, as ``positions_from_valid``), and write ``x[b] = wte[idx[b]] + wpe[position]``."""
    b = tl.program_id(0)
    if PDL:
        dependent_launch()
    slot = tl.load(slot_ptr)
    row = valid_ptr + b * stride_vb
    tl.store(row + slot, tl.full((), 1, tl.int1))
    count = tl.zeros((), dtype=tl.int32)
    for s0 in range(0, slot, BLOCK_S):  # slots before this one only: no program reads what another writes
        s = s0 + tl.arange(0, BLOCK_S)
        count += tl.sum(tl.load(row + s, mask=s < slot, other=0).to(tl.int32), axis=0)
    token = tl.load(idx_ptr + b * stride_ib)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = cs < C
        tok = tl.load(wte_ptr + token * C + cs, mask=ok, other=0.0).to(tl.float32)
        pos = tl.load(wpe_ptr + count * C + cs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + b * C + cs, (tok + pos).to(x_ptr.dtype.element_ty), mask=ok)


ATTENTION_TILE_BYTES = 32 * 1024
"""Bytes of keys plus values that :func:`decode_attention_kernel` loads per iteration (3 iterations in flight)."""


def attention_block_s(d_pad: int, element_size: int) -> int:
    """Cache slots per iteration of :func:`decode_attention_kernel`: :data:`ATTENTION_TILE_BYTES` of keys and values
    (between 32 and 128 slots). At one image with CFG only B x H = 32 programs run, so each must keep many bytes in
    flight; larger tiles would take so much shared memory that 16 rows no longer fit on the GPU at once. Not
    autotuned: the work grows with the step, so timing the first step would choose for all of them."""
    return max(32, min(128, ATTENTION_TILE_BYTES // (2 * d_pad * element_size)))


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

CONFIGS = UNSPLIT_CONFIGS + SPLIT_CONFIGS
"""What the autotuner tries on a GPU, once per shape and flags, before a CUDA graph captures the step (each costs a
compilation, ~0.4 s, cached on disk by Triton, and a 25 ms timing per shape)."""

PDL_CONFIGS = CONFIGS + [
    triton.Config({**c.kwargs, "PREFETCH": True}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in CONFIGS
    if c.kwargs["BLOCK_K"] == 128
]
"""With programmatic dependent launch, the tile sizes also with ``PREFETCH``: the first weight tile loaded before
waiting for the previous kernel (it overlaps that kernel's tail, at the cost of registers held across the wait; with
256-wide tiles that is up to 128 registers a thread, so only the 128-wide ones)."""

MAX_SPLIT = max(c.kwargs.get("SPLIT_K", 1) for c in PDL_CONFIGS)
"""The largest ``SPLIT_K`` tried (the workspace is sized for it)."""

SPLIT_MAX_BLOCKS = 1024
"""Split-K is tried only when ``N`` has at most this many 16-column blocks (``N <= 16384``): wider outputs (the LM
head over the text vocabulary) have programs enough, and this bounds the workspace and the counters."""


def split_allowed(n: int) -> bool:
    """Whether split-K configurations are tried (and a workspace allocated) for an output of ``n`` columns."""
    return triton.cdiv(n, 16) <= SPLIT_MAX_BLOCKS


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: drop split-K configurations where :func:`split_allowed` is false or
    a split would get no ``K`` at all (``K`` too short for ``SPLIT_K`` tiles)."""
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


tuned_decode_linear_kernel = autotuned(CONFIGS)
""":func:`decode_linear_kernel` with its tile sizes chosen by timing :data:`CONFIGS` on the device."""

tuned_pdl_decode_linear_kernel = autotuned(PDL_CONFIGS)
""":func:`decode_linear_kernel` launched with PDL, its tiles and prefetching chosen among :data:`PDL_CONFIGS`."""
