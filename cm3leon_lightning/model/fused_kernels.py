"""Triton kernels of the fused single-token decode step (:mod:`cm3leon_lightning.model.fused`) other than the linear
kernel (:mod:`cm3leon_lightning.model.fused_linear_kernel`): attention over the KV cache, the step's input, and
programmatic dependent launch, and the L2 prefetch of the next kernel's weights.

:func:`decode_attention_kernel` is the step's attention: one query per row attends over the cache slots up to its own,
skipping padding, and reads only the slots written so far (the loop ends at ``slot``, read on the device, so a CUDA
graph replays it at every step); with ``SPLITS > 1`` the filled slots are split over several programs per (row, head).
:func:`decode_embed_kernel` forms the step's input.

With ``PDL`` (a GPU of compute capability 9.0 or later, ``CM3LEON_PDL=1``), each kernel starts by
:func:`dependent_launch`.

Importing this module needs Triton; with ``TRITON_INTERPRET=1`` set before the import the kernels run on CPU tensors
(float32), which is how the tests check them without a GPU.
"""

from __future__ import annotations

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


PREFETCH_LINE = 128
"""Bytes one L2 prefetch asks for (a cache line)."""

PREFETCH_CHUNK = tl.constexpr(256)
"""Lines a program asks for per iteration of :func:`prefetch_l2` (two per thread at 4 warps)."""


@triton.jit
def line_share(lines, part, parts):
    """The lines ``[lo, hi)`` of ``lines`` that program ``part`` of ``parts`` prefetches: consecutive shares of
    ``cdiv(lines, parts)`` (the last ones shorter or empty), which together cover every line once."""
    per = tl.cdiv(lines, parts)
    lo = part * per
    return lo, tl.minimum(lo + per, lines)


BULK_LINES = tl.constexpr(256)
"""Lines (32 KB) per bulk prefetch instruction (:func:`prefetch_l2` with ``BULK``)."""


@triton.jit
def prefetch_l2(ptr, lines, part, parts, CHUNK: tl.constexpr, BULK: tl.constexpr):
    """Ask the L2 cache for this program's share (:func:`line_share`) of the ``lines`` 128-byte lines from ``ptr``.
    Nothing waits for them, no register holds them, no result changes. Inline PTX: CUDA only, never under the
    interpreter.

    ``BULK`` (sm_90, ``ptr`` 16-byte aligned): thread 0 hands the share to the copy engine, 32 KB per
    ``cp.async.bulk.prefetch.L2`` instruction, leaving the load/store units to the kernel's own loads; else every
    thread asks for ``CHUNK / threads`` lines per iteration with ``prefetch.global.L2`` (sm_80 and later)."""
    lo, hi = line_share(lines, part, parts)
    base = ptr.to(tl.pointer_type(tl.int8))
    if BULK:
        for l0 in range(lo, hi, BULK_LINES):
            tl.inline_asm_elementwise(
                "{ .reg .u32 t; .reg .pred p; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
                "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
                "=r,l,r",
                [base + l0.to(tl.int64) * 128, tl.minimum(hi - l0, BULK_LINES) * 128],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
    else:
        for l0 in range(lo, hi, CHUNK):
            line = l0 + tl.arange(0, CHUNK)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                "=r,l,r",
                [base + line.to(tl.int64) * 128, (line < hi).to(tl.int32)],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )


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
    nk_ptr,
    nv_ptr,
    next_lines,
    HEAD_D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr = False,
    SPLITS: tl.constexpr = 1,
    PREFETCH_NEXT: tl.constexpr = 0,
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

    With ``PREFETCH_NEXT`` (1: line by line, 2: in bulk; :func:`prefetch_l2`) the programs of ``(b, h)`` first ask
    L2 for the next layer's keys and values of the same row and head (``nk_ptr``, ``nv_ptr``, laid out as ``k``),
    slots ``0..slot``, at most ``next_lines`` 128-byte lines of each (slots contiguous: ``stride_cs == HEAD_D``).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        dependent_launch()
    if PREFETCH_NEXT:  # the next layer's cache of this (row, head), read by its attention a few kernels later
        filled = (tl.load(slot_ptr) + 1) * HEAD_D * (nk_ptr.dtype.element_ty.primitive_bitwidth // 8)
        lines = tl.minimum(tl.cdiv(filled, 128), next_lines)
        pair = b * stride_cb + h * stride_ch
        prefetch_l2(nk_ptr + pair, lines, split, SPLITS, PREFETCH_CHUNK, PREFETCH_NEXT == 2)
        prefetch_l2(nv_ptr + pair, lines, split, SPLITS, PREFETCH_CHUNK, PREFETCH_NEXT == 2)
    attention_run(q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr, part_ptr, count_ptr, b, h, split,
                  tl.num_programs(1), C, stride_cb, stride_ch, stride_cs, stride_vb, scale, HEAD_D, D_PAD, BLOCK_S,
                  IEEE, SPLITS)  # fmt: skip


@triton.jit
def attention_run(
    q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr, part_ptr, count_ptr, b, h, split, H, C, stride_cb, stride_ch,
    stride_cs, stride_vb, scale, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr,
    SPLITS: tl.constexpr, LOAD: tl.constexpr = "",
):  # fmt: skip
    """The work of program ``(b, h, split)`` of :func:`decode_attention_kernel` (``H`` heads) once the query and
    the cache slot are written. ``LOAD``: the cache modifier of the loads of the query, the validity and the cache
    (``".cg"`` where another program of the same launch wrote them). Returns whether this program wrote ``out`` for
    ``(b, h)``: the only run, or the last of several to arrive."""
    rows = tl.arange(0, 16)
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_D
    first = rows[:, None] == 0
    q_at = q_ptr + b * C + h * HEAD_D + rows[:, None] * 0 + dims[None, :]
    q = tl.load(q_at, mask=first & d_ok[None, :], other=0.0, cache_modifier=LOAD)
    q = q.to(k_ptr.dtype.element_ty)  # (16, D_PAD), row 0 the query
    slot = tl.load(slot_ptr)
    tiles = tl.cdiv(slot + 1, BLOCK_S)
    if SPLITS == 1:  # one run, known when compiling (no hand-off compiled in)
        per = tiles
        runs = 1
    else:
        per = tl.cdiv(tiles, SPLITS)  # whole tiles per run
        runs = tl.cdiv(tiles, per)  # runs holding slots: fewer than SPLITS early in the cache (the others idle)
    wrote = tl.full((), 0, tl.int1)
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
            valid = tl.load(valid_ptr + b * stride_vb + s, mask=s_ok, other=0, cache_modifier=LOAD)
            keep = (s_ok & (valid != 0)) | (s == slot)
            where = s[:, None] * stride_cs + dims[None, :]
            tile_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(kv + where, mask=tile_ok, other=0.0, cache_modifier=LOAD)  # (BLOCK_S, D_PAD)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (16, BLOCK_S)
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(keep[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            rescale = tl.exp(m - m_new)
            v = tl.load(vv + where, mask=tile_ok, other=0.0, cache_modifier=LOAD)
            total = total * rescale + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = out_ptr + b * C + h * HEAD_D + rows[:, None] * 0 + dims[None, :]
        if runs == 1:
            wrote = tl.full((), 1, tl.int1)
            tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=first & d_ok[None, :])
        else:
            pair = b * H + h
            run = part_ptr + (pair * SPLITS + split) * (D_PAD + 2)  # [max, sum, output (D_PAD)] of this run
            tl.store(run + rows * 0, m, mask=rows == 0)
            tl.store(run + 1 + rows * 0, total, mask=rows == 0)
            tl.store(run + 2 + rows[:, None] * 0 + dims[None, :], acc, mask=first)
            tl.debug_barrier()  # every thread's stores before the count is raised (the release covers them)
            arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel")
            wrote = arrived == runs - 1
            if wrote:  # the last run of this (row, head) to finish: combine them in split order
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
    return wrote


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
    embed_row(idx_ptr, wte_ptr, wpe_ptr, valid_ptr, slot_ptr, x_ptr, b, C, stride_ib, stride_vb, BLOCK_S, BLOCK_C)


@triton.jit
def embed_row(
    idx_ptr, wte_ptr, wpe_ptr, valid_ptr, slot_ptr, x_ptr, b, C, stride_ib, stride_vb, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The work of program ``b`` of :func:`decode_embed_kernel`."""
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
    (between 32 and 128 slots). At one image with CFG only B x H = 32 (row, head) pairs run, so each program must
    keep many bytes in flight (and the pairs are split over the cache too); larger tiles would take so much shared
    memory that 16 rows no longer fit on the GPU at once. Not autotuned: the work grows with the step, so timing the
    first step would choose for all of them."""
    return max(32, min(128, ATTENTION_TILE_BYTES // (2 * d_pad * element_size)))
