"""The persistent decode step: a whole transformer step in one Triton launch (host side:
:mod:`cm3leon_lightning.model.persistent`).

The fused step (:mod:`cm3leon_lightning.model.fused`) is ~120 kernels per token at 350m; on an H200 its weight stream
ran at ~1 TB/s, each 2-8 MB kernel paying for its launch, for filling its memory pipeline from cold and for its last
programs, and ~0.27 ms of a 0.99 ms step went to the gaps between kernels (docs/benchmarks.md). Here a fixed number of
programs (a few per SM) stays resident for the whole step and takes *tasks* from a queue in order:

* a task is one program's share of one *phase*: one row of the input (``EMBED``), one column block of a projection
  (``QKV``, ``OUT``, ``UP``, ``DOWN``, ``HEAD``; ``DOWN`` also split over ``K``), one run of one (row, head)'s cache
  (``ATTN``). Phase ``p`` reads what phase ``p - 1`` wrote, so its tasks wait until ``done[p - 1]`` (``sync[p]``)
  reaches the phase's count of finished outputs;
* before waiting, a task asks the L2 cache for its own weights (or its cache run) and loads its first weight tile:
  none of that depends on the previous phase, so the memory stream goes on while the last tasks of the previous
  phase finish, instead of stopping at every kernel boundary;
* tasks are claimed with an atomic counter in increasing order, and a task waits only on smaller ones, so the step
  cannot deadlock whatever the number of programs resident (the smallest unfinished task always has its inputs and
  a program working on it); under Triton's interpreter, which runs the programs one after another, program 0 takes
  every task in order and each wait is an assertion instead.

The hand-off between programs is the split kernels' (:func:`~cm3leon_lightning.model.fused_linear_kernel.linear_block`):
stores, a CTA barrier, then one release atomic; the consumer spins on volatile loads, then an acquire atomic and a
barrier, and reads what other programs wrote past L1 (``.cg``). The residual stream alternates between two buffers
(``OUT`` reads ``x0`` and writes ``x1``, ``DOWN`` reads ``x1`` and writes ``x0``).

No buffer is overwritten while read: a phase starts when the previous one has counted all its outputs, a task counts
its output after reading its inputs, and a split task arrives after reading (the last to arrive counts), so every
phase that writes a buffer comes after the last phase that reads its old contents has finished: ``q`` (written by
``QKV``, read by ``ATTN``), ``y`` (``ATTN`` / ``OUT``), ``h`` (``UP`` / ``DOWN``), ``x1`` (``OUT`` / ``UP``,
``DOWN``), ``x0`` (``EMBED``, ``DOWN`` / ``QKV``, ``OUT``, ``HEAD``), the split workspaces and counters (reused by
the same phase of the next block; each counter reset by the last task of its block or pair before it counts).

Importing this module needs Triton; with ``TRITON_INTERPRET=1`` set before the import the kernel runs on CPU tensors
(float32), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cm3leon_lightning.model import persistent as plan
from cm3leon_lightning.model.fused_kernels import PREFETCH_CHUNK, attention_run, embed_row, prefetch_l2
from cm3leon_lightning.model.fused_linear_kernel import block_span, linear_block, weight_tile

EMBED = tl.constexpr(plan.EMBED)
QKV = tl.constexpr(plan.QKV)
ATTN = tl.constexpr(plan.ATTN)
OUT = tl.constexpr(plan.OUT)
UP = tl.constexpr(plan.UP)
DOWN = tl.constexpr(plan.DOWN)
"""The phases' operations (the ``op`` column of the task table; the rest is ``HEAD``)."""

LAYER_FIELDS = tl.constexpr(6)
"""Addresses per layer in the layer table: QKV, out-projection, up- and down-projection weights, keys, values."""

TASK_FIELDS = tl.constexpr(5)
"""Columns of the task table: operation, layer, index in the phase, phase, outputs of the previous phase."""


@triton.jit
def nanoseconds(like):
    """The GPU's global timer in nanoseconds (``%globaltimer``; ``like``: any int32 scalar, for the shape)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [like], dtype=tl.int64, is_pure=False,
                                     pack=1)  # fmt: skip


@triton.jit
def any_thread(flag):
    """1 in every thread of the program if ``flag`` (an int32 scalar, which may differ between its threads) is nonzero
    in any of them, else 0: a CTA barrier with an OR reduction (``barrier.red.or.pred``), which every thread of the
    program must reach."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.ne.s32 q, $1, 0; barrier.red.or.pred p, 0, q; selp.s32 $0, 1, 0, p; }", "=r,r",
        [flag], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def wait_for(done_ptr, need, error_ptr, SPIN: tl.constexpr, SLEEP_NS: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Block until ``*done_ptr >= need`` (another program's release atomics raise it); then this program's later
    loads see what those programs wrote. A wait longer than ``TIMEOUT_NS`` gives up and raises ``*error_ptr``, and
    once ``*error_ptr`` is raised every wait gives up at once (this launch's and later ones', until the host reads and
    resets it): a bug in the hand-off then costs one timeout, not one per phase and step, and ends the generation
    with an error the host reads instead of hanging the GPU. Without ``SPIN`` (the interpreter, programs run one after
    another) the count must already be there, else ``*error_ptr`` is raised (the interpreter ignores
    ``tl.device_assert``).

    Each thread polls on its own, and its clock may read differently from its neighbours', so the decision to give up
    is taken for the whole program (:func:`any_thread`): the program leaves the wait as one, and the barriers of the
    acquire and of the task after it stay paired."""
    if SPIN:
        start = nanoseconds(need)
        # the acquire is the loop's condition: an atomic whose result went unused was compiled away. Its value is the
        # same in every thread (one thread loads it, shared memory hands it to the others), and so is ``late``.
        ready = tl.atomic_add(done_ptr, 0, sem="acquire")
        late = ready * 0
        while (ready < need) & (late == 0):
            seen = tl.load(done_ptr, volatile=True)  # poll without atomics, then acquire once more
            gave_up = seen * 0
            while (seen < need) & (gave_up == 0):
                if SLEEP_NS > 0:  # back off: hundreds of programs may poll the same counter
                    tl.inline_asm_elementwise(
                        "{ nanosleep.u32 $1; mov.b32 $0, 0; }", "=r,r", [seen * 0 + SLEEP_NS], dtype=tl.int32,
                        is_pure=False, pack=1,
                    )  # fmt: skip
                seen = tl.load(done_ptr, volatile=True)
                timed_out = nanoseconds(seen) - start > TIMEOUT_NS
                gave_up = (timed_out | (tl.load(error_ptr, volatile=True) > 0)).to(tl.int32)
            late = any_thread(gave_up)
            ready = tl.atomic_add(done_ptr, 0, sem="acquire")
        if (late != 0) & (ready < need):  # gave up and the count never came (it may have come at the last moment)
            tl.atomic_add(error_ptr, 1)
        tl.debug_barrier()  # every thread of this program waits for the acquire
    elif tl.load(done_ptr) < need:
        tl.atomic_add(error_ptr, 1)


@triton.jit(noinline=True)  # a real call: the task loop cannot hoist its values and keep them live
def linear_task(
    x_ptr, w_ptr, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, part_ptr, count_ptr, done_ptr, need, error_ptr, i, R, N,
    K, C, D,
    stride_cb, stride_ch, stride_cs, eps, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, CACHE: tl.constexpr, IEEE: tl.constexpr,
    SPLIT_K: tl.constexpr, PREFETCH_L2: tl.constexpr, SPIN: tl.constexpr, SLEEP_NS: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    """Task ``i`` of a projection phase: column block ``i // SPLIT_K``, split ``i % SPLIT_K``. Its weights (the
    block's ``BLOCK_N`` rows of ``W``, shared out between the block's splits) are asked into L2 and its first tile
    loaded before waiting for the previous phase. Returns whether it wrote the block's outputs."""
    pid = i // SPLIT_K
    split = i % SPLIT_K
    if PREFETCH_L2:
        lines = tl.minimum(BLOCK_N, N - pid * BLOCK_N) * K * (w_ptr.dtype.element_ty.primitive_bitwidth // 8) // 128
        prefetch_l2(w_ptr + pid * BLOCK_N * K, lines, split, SPLIT_K, PREFETCH_CHUNK, PREFETCH_L2 == 2)
    cols, col_ok, k_lo, k_hi = block_span(pid, split, N, K, BLOCK_N, BLOCK_K, SPLIT_K)
    w_first = weight_tile(w_ptr, cols, col_ok, k_lo, k_hi, K, BLOCK_K)
    wait_for(done_ptr, need, error_ptr, SPIN, SLEEP_NS, TIMEOUT_NS)
    return linear_block(x_ptr, w_ptr, out_ptr, res_ptr, k_ptr, v_ptr, slot_ptr, part_ptr, count_ptr, R, N, K, C, D,
                        stride_cb, stride_ch, stride_cs, eps, pid, split, tl.cdiv(N, BLOCK_N), w_first, R_PAD, BLOCK_N,
                        BLOCK_K, NORM, ACT, RESIDUAL, CACHE, IEEE, True, SPLIT_K, ".cg")  # fmt: skip


@triton.jit(noinline=True)  # a real call, as linear_task
def attention_task(
    q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr, part_ptr, count_ptr, done_ptr, need, error_ptr, i, H, C,
    stride_cb,
    stride_ch, stride_cs, stride_vb, scale, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    IEEE: tl.constexpr, SPLITS: tl.constexpr, PREFETCH_L2: tl.constexpr, SPIN: tl.constexpr, SLEEP_NS: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
):  # fmt: skip
    """Task ``i`` of an attention phase: run ``i % SPLITS`` of pair ``i // SPLITS`` = (row, head). The pair's cache
    before this step's slot (written by earlier steps) is asked into L2 before waiting for the QKV phase. Returns
    whether it wrote the pair's output."""
    pair = i // SPLITS
    b = pair // H
    h = pair % H
    split = i % SPLITS
    if PREFETCH_L2:
        lines = tl.load(slot_ptr) * HEAD_D * (k_ptr.dtype.element_ty.primitive_bitwidth // 8) // 128
        at = b * stride_cb + h * stride_ch
        prefetch_l2(k_ptr + at, lines, split, SPLITS, PREFETCH_CHUNK, PREFETCH_L2 == 2)
        prefetch_l2(v_ptr + at, lines, split, SPLITS, PREFETCH_CHUNK, PREFETCH_L2 == 2)
    wait_for(done_ptr, need, error_ptr, SPIN, SLEEP_NS, TIMEOUT_NS)
    return attention_run(q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, out_ptr, part_ptr, count_ptr, b, h, split, H, C,
                         stride_cb, stride_ch, stride_cs, stride_vb, scale, HEAD_D, D_PAD, BLOCK_S, IEEE, SPLITS,
                         ".cg")  # fmt: skip


@triton.jit
def layer_pointer(layers_ptr, layer, field, like):
    """Address ``field`` of ``layer`` in the layer table, as a pointer of ``like``'s type."""
    return tl.load(layers_ptr + layer * LAYER_FIELDS + field).to(like.dtype)


@triton.jit
def decode_step_kernel(
    tasks_ptr,
    sync_ptr,
    layers_ptr,
    idx_ptr,
    wte_ptr,
    wpe_ptr,
    valid_ptr,
    slot_ptr,
    head_ptr,
    x_ptr,
    q_ptr,
    y_ptr,
    h_ptr,
    logits_ptr,
    part_ptr,
    attn_part_ptr,
    error_ptr,
    T,
    P,
    R,
    C,
    F,
    NH,
    H,
    stride_ib,
    stride_vb,
    stride_cb,
    stride_ch,
    stride_cs,
    eps,
    scale,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    DOWN_SPLIT: tl.constexpr,
    ATTN_SPLITS: tl.constexpr,
    HEAD_D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PREFETCH_L2: tl.constexpr,
    SPIN: tl.constexpr,
    SLEEP_NS: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
):
    """One decode step of ``R`` rows (one token each) through every block and the head's ``NH`` rows.

    ``tasks_ptr``: the ``T`` tasks, :data:`TASK_FIELDS` int32 each, of ``P`` phases; ``sync_ptr``: int32, zero at
    launch: ``[0]`` the task queue, ``[1 + p]`` the outputs phase ``p`` has finished, then the down-projection's split-K
    counters (one per column block) and the attention's (one per (row, head)); ``error_ptr``: int32, the waits that
    failed (timed out on a GPU, found their inputs missing in the interpreter), never reset here; ``layers_ptr``:
    :data:`LAYER_FIELDS` int64 addresses per layer. ``x_ptr``: the ``(2, R, C)`` residual stream; ``q``, ``y`` ``(R,
    C)``, ``h`` ``(R, F)``; ``logits`` ``(R, NH)``; ``part_ptr`` / ``attn_part_ptr`` float32 split workspaces. The
    weights, cache and buffers share ``x_ptr``'s dtype."""
    x1_ptr = x_ptr + R * C
    down_counts = sync_ptr + 1 + P
    attn_counts = down_counts + tl.cdiv(C, BLOCK_N)
    t = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    while t < T:
        nxt = tl.atomic_add(sync_ptr, 1, sem="relaxed")  # claimed now, its latency hidden behind this task
        row = tasks_ptr + t * TASK_FIELDS  # five independent loads: one round trip
        op = tl.load(row)
        layer = tl.load(row + 1)
        i = tl.load(row + 2)
        p = tl.load(row + 3)
        need = tl.load(row + 4)  # outputs of the previous phase
        done = sync_ptr + p  # done[p - 1]
        wrote = tl.full((), 1, tl.int1)
        if op == EMBED:
            embed_row(idx_ptr, wte_ptr, wpe_ptr, valid_ptr, slot_ptr, x_ptr, i, C, stride_ib, stride_vb, 256, BLOCK_C)
        elif op == ATTN:
            k_ptr = layer_pointer(layers_ptr, layer, 4, x_ptr)
            v_ptr = layer_pointer(layers_ptr, layer, 5, x_ptr)
            wrote = attention_task(q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, y_ptr, attn_part_ptr, attn_counts, done,
                                   need, error_ptr, i, H, C, stride_cb, stride_ch, stride_cs, stride_vb, scale, HEAD_D,
                                   D_PAD, BLOCK_S, IEEE, ATTN_SPLITS, PREFETCH_L2, SPIN, SLEEP_NS,
                                   TIMEOUT_NS)  # fmt: skip
        else:  # a projection: input, weight, output, residual, shape and flags of the phase's operation
            k_ptr = layer_pointer(layers_ptr, layer, 4, x_ptr)  # the cache (QKV only)
            v_ptr = layer_pointer(layers_ptr, layer, 5, x_ptr)
            if op == QKV:
                wrote = linear_task(x_ptr, layer_pointer(layers_ptr, layer, 0, x_ptr), q_ptr, x_ptr, k_ptr, v_ptr,
                                    slot_ptr, part_ptr, down_counts, done, need, error_ptr, i, R, 3 * C, C, C, HEAD_D,
                                    stride_cb, stride_ch, stride_cs, eps, R_PAD, BLOCK_N, BLOCK_K, True, 0, False,
                                    True, IEEE, 1, PREFETCH_L2, SPIN, SLEEP_NS, TIMEOUT_NS)  # fmt: skip
            elif op == OUT:  # x1 = x0 + y @ W_out^T
                wrote = linear_task(y_ptr, layer_pointer(layers_ptr, layer, 1, x_ptr), x1_ptr, x_ptr, k_ptr, v_ptr,
                                    slot_ptr, part_ptr, down_counts, done, need, error_ptr, i, R, C, C, C, HEAD_D,
                                    stride_cb, stride_ch, stride_cs, eps, R_PAD, BLOCK_N, BLOCK_K, False, 0, True,
                                    False, IEEE, 1, PREFETCH_L2, SPIN, SLEEP_NS, TIMEOUT_NS)  # fmt: skip
            elif op == UP:  # h = act(LayerNorm(x1) @ W_in^T)
                wrote = linear_task(x1_ptr, layer_pointer(layers_ptr, layer, 2, x_ptr), h_ptr, x_ptr, k_ptr, v_ptr,
                                    slot_ptr, part_ptr, down_counts, done, need, error_ptr, i, R, F, C, C, HEAD_D,
                                    stride_cb, stride_ch, stride_cs, eps, R_PAD, BLOCK_N, BLOCK_K, True, ACT, False,
                                    False, IEEE, 1, PREFETCH_L2, SPIN, SLEEP_NS, TIMEOUT_NS)  # fmt: skip
            elif op == DOWN:  # x0 = x1 + h @ W_down^T, split over K
                wrote = linear_task(h_ptr, layer_pointer(layers_ptr, layer, 3, x_ptr), x_ptr, x1_ptr, k_ptr, v_ptr,
                                    slot_ptr, part_ptr, down_counts, done, need, error_ptr, i, R, C, F, C, HEAD_D,
                                    stride_cb, stride_ch, stride_cs, eps, R_PAD, BLOCK_N, BLOCK_K, False, 0, True,
                                    False, IEEE, DOWN_SPLIT, PREFETCH_L2, SPIN, SLEEP_NS, TIMEOUT_NS)  # fmt: skip
            else:  # HEAD: the final LayerNorm and the head's sampled rows
                wrote = linear_task(x_ptr, head_ptr, logits_ptr, x_ptr, k_ptr, v_ptr, slot_ptr, part_ptr, down_counts,
                                    done, need, error_ptr, i, R, NH, C, C, HEAD_D, stride_cb, stride_ch, stride_cs, eps,
                                    R_PAD, BLOCK_N, BLOCK_K, True, 0, False, False, IEEE, 1, PREFETCH_L2, SPIN,
                                    SLEEP_NS, TIMEOUT_NS)  # fmt: skip
        tl.debug_barrier()  # every thread's outputs stored before the count is raised (the release covers them)
        if wrote:
            tl.atomic_add(sync_ptr + 1 + p, 1, sem="release")
        t = nxt
