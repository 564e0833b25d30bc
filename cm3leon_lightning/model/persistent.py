"""The persistent decode step: one Triton launch per token for the whole transformer (the ``persistent`` launch
option of the fused step, :mod:`~cm3leon_lightning.model.fused_launch`).

The kernel (:mod:`~cm3leon_lightning.model.persistent_kernel`) runs a fixed set of programs that take *tasks* in
order from a queue; a task is one program's share of a *phase* (the step's input, one projection, one attention,
the head), and waits only for the phase before it. This module plans a step (:func:`step_phases`,
:func:`task_table`: pure, no Triton), holds the tables and buffers a launch reads (:class:`PersistentStep`, one per
KV cache, rows and sampled range, kept as long as the cache) and launches it (:func:`persistent_decode_forward`).

A step is ``1 + 5 * n_layer + 1`` phases::

    EMBED                 one task per row: slot marked valid, token + position embedding -> x0
    per block:
      QKV   LayerNorm(x0) @ W_qkv: queries -> q, keys/values -> the cache slot   one task per column block
      ATTN  attention of q over the filled cache -> y                          one per run of one (row, head)
      OUT   y @ W_out + x0 -> x1                                              one per column block
      UP    act(LayerNorm(x1) @ W_in) -> h                                   one per column block
      DOWN  h @ W_down + x1 -> x0                                             one per split of a column block
    HEAD  LayerNorm(x0) @ W_head[lo:hi] -> logits                             one per column block

This module imports no Lightning, and Triton only when a step is planned.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch
from torch import Tensor

from cm3leon_lightning.model.transformer import CM3Leon

EMBED, QKV, ATTN, OUT, UP, DOWN, HEAD = range(7)
"""The phases' operations (the kernel's copies are Triton constants)."""

OP_NAMES = ("embed", "qkv", "attention", "out", "up", "down", "head")


@dataclasses.dataclass(frozen=True)
class PersistentTiles:
    """How the persistent step cuts its work (defaults for an H100/H200 at 350m; :data:`INTERPRETER_TILES` under
    Triton's interpreter).

    Attributes:
        block_n: output columns per projection task (16: a 32 KB slice of a 1024-wide bf16 weight per task, 64 to
            256 tasks per projection at 350m).
        block_k: ``K`` per loop iteration of a projection task.
        down_split: splits of the down-projection's ``K`` (4096 at 350m: 128 KB per block otherwise).
        attn_splits: runs per (row, head) of the cache; None: enough for rows x heads x runs to give every program a
            task (at most 8).
        attn_block_s: cache slots per attention iteration; None: 8 KB of keys and values (small tiles, so that several
            programs share an SM).
        per_sm: programs per SM; None: as many as the compiled kernel's registers and shared memory allow (at most 8).
        warps: warps per program.
        stages: software-pipelining stages of the loops.
        sleep_ns: back-off between polls of a waiting task (0: none).
    """

    block_n: int = 16
    block_k: int = 128
    down_split: int = 4
    attn_splits: int | None = None
    attn_block_s: int | None = None
    per_sm: int | None = None
    warps: int = 4
    stages: int = 3
    sleep_ns: int = 0

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "attn_block_s"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"PersistentTiles.{name} must be a power of two >= 16, got {value}")
        for name in ("down_split", "attn_splits", "per_sm", "warps", "stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"PersistentTiles.{name} must be >= 1, got {value}")


INTERPRETER_TILES = PersistentTiles(block_n=16, block_k=32, down_split=2, attn_splits=2, attn_block_s=16)
"""Under the interpreter (tests): split down-projections and attention, several cache tiles per run."""

TILES: PersistentTiles | None = None
"""When set, the tiles every persistent step uses (benchmarks, tests); else :data:`INTERPRETER_TILES` under the
interpreter and ``PersistentTiles()`` on a GPU."""

WAIT_TIMEOUT_NS = 500_000_000
"""How long a task waits for the phase it reads before giving up (a step takes about a millisecond): a bug in the
hand-off then ends the launch, with :meth:`PersistentStep.check` raising, instead of hanging the GPU. After one wait
has given up, every other wait gives up at once until the check, so the whole generation pays this once."""

MAX_ROWS = 63
"""The most rows a persistent step takes (its row tile, with the LayerNorm's padding row, is at most 64)."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a step: ``tasks`` tasks of operation ``op`` on block ``layer``, finished when ``outputs`` of
    them have written their outputs (column blocks, rows or (row, head) pairs)."""

    op: int
    layer: int
    tasks: int
    outputs: int


def step_phases(
    n_layer: int, rows: int, heads: int, width: int, ffn: int, head_rows: int, tiles: PersistentTiles, attn_splits: int
) -> list[Phase]:
    """The phases of one persistent step, in order (see the module docstring).

    Args:
        n_layer: blocks.
        rows: cache rows, one token each.
        heads: attention heads.
        width: ``d_model``.
        ffn: the MLP's hidden width.
        head_rows: rows of the LM head computed (the sampled range).
        tiles: the tiling (``block_n``, ``down_split``).
        attn_splits: runs per (row, head).
    """
    blocks = lambda n: -(-n // tiles.block_n)  # noqa: E731
    phases = [Phase(EMBED, 0, rows, rows)]
    for layer in range(n_layer):
        phases += [
            Phase(QKV, layer, blocks(3 * width), blocks(3 * width)),
            Phase(ATTN, layer, rows * heads * attn_splits, rows * heads),
            Phase(OUT, layer, blocks(width), blocks(width)),
            Phase(UP, layer, blocks(ffn), blocks(ffn)),
            Phase(DOWN, layer, blocks(width) * tiles.down_split, blocks(width)),
        ]
    return phases + [Phase(HEAD, 0, blocks(head_rows), blocks(head_rows))]


def task_table(phases: list[Phase]) -> list[list[int]]:
    """The kernel's task table: one row ``[op, layer, index in phase, phase, outputs of the previous phase]`` per
    task in queue order (each phase's tasks together, phases in order), all a task needs in one read."""
    table: list[list[int]] = []
    for p, phase in enumerate(phases):
        need = phases[p - 1].outputs if p else 0
        table += [[phase.op, phase.layer, i, p, need] for i in range(phase.tasks)]
    return table


def default_attn_splits(pairs: int, programs: int) -> int:
    """Runs per (row, head) when :attr:`PersistentTiles.attn_splits` is None: enough for ``pairs`` (rows x heads) to
    give each of ``programs`` a task, between 1 and 8 (one image with CFG at 350m: 32 pairs, 8 runs)."""
    return max(1, min(8, programs // max(1, pairs)))


def attention_tile(d_pad: int, element_size: int, tiles: PersistentTiles) -> int:
    """Cache slots per attention iteration: :attr:`PersistentTiles.attn_block_s`, else 8 KB of keys and values
    (a power of two between 16 and 128)."""
    if tiles.attn_block_s is not None:
        return tiles.attn_block_s
    slots = 8192 // (2 * d_pad * element_size)
    return max(16, min(128, 1 << (slots.bit_length() - 1)))


def programs_per_sm(n_regs: int, shared: int, warps: int, most: int = 8) -> int:
    """How many programs of a compiled kernel fit on one SM (64K registers, 228 KB of shared memory, 2048 threads, as
    on A100/H100/H200), at most ``most``."""
    by_regs = 65536 // max(1, -(-n_regs // 8) * 8 * 32 * warps)
    by_shared = (228 * 1024) // (shared + 1024)
    return max(1, min(most, by_regs, by_shared, 2048 // (32 * warps)))


def persistent_unsupported(model: CM3Leon, rows: int) -> str | None:
    """None when :func:`persistent_decode_forward` can run ``model`` on ``rows`` cache rows, else the reason."""
    from cm3leon_lightning.model.fused import ACTIVATIONS

    if model.config.activation not in ACTIVATIONS:
        return f"the persistent decode step supports activations {tuple(ACTIVATIONS)}, not {model.config.activation!r}"
    if rows > MAX_ROWS:
        return f"the persistent decode step takes at most {MAX_ROWS} rows, not {rows}"
    params = list(model.parameters())  # one pass (this runs at every step outside a CUDA graph)
    if not all(p.is_contiguous() for p in params):  # the kernel reads each weight as rows of K values
        return "the persistent decode step needs contiguous weights"
    dtypes = {p.dtype for p in params}
    cache = model.kv_cache
    if cache is not None:
        k = cache.layer(0)[0]  # (B, H, S, D)
        layouts = {b.stride() for b in cache.buffers() if b.dim() == 4}
        if len(layouts) != 1 or k.stride(3) != 1 or k.stride(2) != k.shape[3]:
            return "the persistent decode step needs contiguous cache buffers of one layout (B, H, S, D)"
    if len(dtypes) != 1 or (cache is not None and cache.dtype not in dtypes):
        return f"the persistent decode step needs one dtype for weights and cache, got {sorted(map(str, dtypes))}"
    return None


def _interpreting() -> bool:
    from cm3leon_lightning.model.fused import interpreting

    return interpreting()


class PersistentStep:
    """The tables and buffers of persistent launches for one KV cache, rows and sampled range: the task table
    (of the :attr:`phases` planned), the layers' addresses, the synchronisation counters, the residual stream and the
    split workspaces. Built once (its tensors keep their addresses, so a CUDA graph can replay the launch) and valid
    while the model's weights and the cache stay where they are (:meth:`key`).

    Args:
        model: a GELU or ReLU model with a KV cache.
        logits_range: ``(lo, hi)`` the head's rows computed.
        tiles: the tiling (default: :data:`TILES`, else per device).
    """

    def __init__(self, model: CM3Leon, logits_range: tuple[int, int], tiles: PersistentTiles | None = None) -> None:
        import triton

        from cm3leon_lightning.model.fused import ACTIVATIONS, linear_weights
        from cm3leon_lightning.model.fused_launch import prefetch_mode

        c, cache = model.config, model.kv_cache
        self.device = cache.device
        self.tiles = tiles or TILES or (INTERPRETER_TILES if _interpreting() else PersistentTiles())
        self.rows, self.lo, self.hi = cache.batch_size, *logits_range
        self.key = self.key_of(model, logits_range)
        B, H, D, C = self.rows, c.n_head, c.d_model // c.n_head, c.d_model
        ffn = model.blocks[0].mlp.fc_in.weight.shape[0]
        dtype = model.wte.weight.dtype
        self.programs = 2 if _interpreting() else self._sms() * (self.tiles.per_sm or 2)
        splits = self.tiles.attn_splits or default_attn_splits(B * H, self.programs)
        phases = step_phases(c.n_layer, B, H, C, ffn, self.hi - self.lo, self.tiles, splits)
        self.phases = phases
        table = task_table(phases)
        self.n_tasks, self.n_phases = len(table), len(phases)
        on = dict(device=self.device, dtype=torch.int32)
        self.tasks = torch.tensor(table, **on)
        blocks_c = -(-C // self.tiles.block_n)
        self.sync = torch.zeros(1 + self.n_phases + blocks_c + B * H, **on)
        self.errors = torch.zeros(1, **on)  # failed waits, over every launch since the plan or the last check()
        weights = linear_weights(model, logits_range)  # per block QKV, out, up, down; then the head
        addresses = [
            [w.data_ptr() for w in weights[4 * i : 4 * i + 4]] + [b.data_ptr() for b in cache.layer(i)]
            for i in range(c.n_layer)
        ]
        self.layers = torch.tensor(addresses, device=self.device, dtype=torch.int64)
        self.head = model.lm_head.weight[self.lo : self.hi]
        k0 = cache.layer(0)[0]
        self.cache_strides = (k0.stride(0), k0.stride(1), k0.stride(2))
        row_bytes = [n * k0.element_size() for n in (C, ffn, *self.cache_strides[:2])]  # where tasks start
        aligned = all(a % 16 == 0 for a in [*sum(addresses, []), self.head.data_ptr(), *row_bytes])
        self.x = torch.zeros(2, B, C, device=self.device, dtype=dtype)
        self.q, self.y = torch.zeros(B, C, device=self.device, dtype=dtype), torch.zeros_like(self.x[0])
        self.h = torch.zeros(B, ffn, device=self.device, dtype=dtype)
        r_pad = max(16, triton.next_power_of_2(B + 1))
        d_pad = max(16, triton.next_power_of_2(D))
        f32 = dict(device=self.device, dtype=torch.float32)  # float32 partial sums, whatever torch's default dtype
        self.part = torch.zeros(self.tiles.down_split * blocks_c * r_pad * self.tiles.block_n, **f32)
        self.attn_part = torch.zeros(B * H * splits * (d_pad + 2), **f32)
        self.ints = (self.n_tasks, self.n_phases, B, C, ffn, self.hi - self.lo, H)
        self.floats = (c.layer_norm_eps, D**-0.5)
        self.constants = dict(
            R_PAD=r_pad, BLOCK_N=self.tiles.block_n, BLOCK_K=self.tiles.block_k, ACT=ACTIVATIONS[c.activation],
            IEEE=dtype == torch.float32, DOWN_SPLIT=self.tiles.down_split, ATTN_SPLITS=splits, HEAD_D=D, D_PAD=d_pad,
            BLOCK_S=attention_tile(d_pad, k0.element_size(), self.tiles), BLOCK_C=min(256, triton.next_power_of_2(C)),
            PREFETCH_L2=0 if _interpreting() else prefetch_mode(self.device, aligned), SPIN=not _interpreting(),
            SLEEP_NS=self.tiles.sleep_ns, TIMEOUT_NS=WAIT_TIMEOUT_NS,
        )  # fmt: skip
        self.wte, self.wpe, self.valid = model.wte.weight, model.wpe.weight, cache.valid
        self.registers: int | None = None  # per thread, of the compiled kernel (GPU only)
        self._fit_programs()

    @staticmethod
    def key_of(model: CM3Leon, logits_range: tuple[int, int]) -> tuple:
        """What a step's tables depend on: the rows, the range, the tiles in force and the address, shape and stride
        of every weight and cache buffer (a moved or re-cast model needs a new plan)."""
        cache = model.kv_cache
        tensors = [*model.parameters(), *(b for i in range(cache.n_layer) for b in cache.layer(i)), cache.valid]
        layout = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in tensors)
        return (cache.batch_size, tuple(logits_range), TILES, _interpreting(), layout)

    def _sms(self) -> int:
        return torch.cuda.get_device_properties(self.device).multi_processor_count

    def _args(self, idx: Tensor, input_pos: Tensor, logits: Tensor) -> tuple:
        return (
            self.tasks, self.sync, self.layers, idx, self.wte, self.wpe, self.valid, input_pos,
            self.head, self.x, self.q, self.y, self.h, logits, self.part, self.attn_part, self.errors, *self.ints,
            idx.stride(0), self.valid.stride(0), *self.cache_strides, *self.floats,
        )  # fmt: skip

    def _fit_programs(self) -> None:
        """On a GPU with ``per_sm`` unset: compile the kernel and launch as many programs per SM as its registers
        and shared memory allow (:attr:`registers` records its registers per thread). Where this Triton cannot say
        (its compiled-kernel API changed), two per SM, with a warning."""
        if _interpreting() or self.tiles.per_sm is not None:
            return
        from cm3leon_lightning.model.persistent_kernel import decode_step_kernel

        idx = torch.zeros(self.rows, 1, dtype=torch.long, device=self.device)
        logits = torch.empty(self.rows, self.hi - self.lo, device=self.device, dtype=self.x.dtype)
        args = self._args(idx, torch.zeros(1, dtype=torch.long, device=self.device), logits)
        try:
            kernel = decode_step_kernel.warmup(
                *args, grid=(1,), **self.constants, num_warps=self.tiles.warps, num_stages=self.tiles.stages
            )
            if hasattr(kernel, "_init_handles"):
                kernel._init_handles()
            self.registers, shared = int(kernel.n_regs), int(kernel.metadata.shared)
        except (AttributeError, TypeError) as err:
            warnings.warn(
                f"persistent decode step: cannot read the kernel's registers ({err}); 2 programs per SM", stacklevel=2
            )
            return
        self.programs = self._sms() * programs_per_sm(self.registers, shared, self.tiles.warps)

    def __call__(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        """``(B, 1, hi - lo)`` logits of one decode step; the cache is updated as the model's forward updates it."""
        from cm3leon_lightning.model.persistent_kernel import decode_step_kernel

        logits = torch.empty(self.rows, self.hi - self.lo, device=self.device, dtype=self.x.dtype)
        self.sync.zero_()
        grid = (min(self.programs, self.n_tasks),)
        decode_step_kernel[grid](
            *self._args(idx, input_pos, logits), **self.constants, num_warps=self.tiles.warps,
            num_stages=self.tiles.stages,
        )  # fmt: skip
        if _interpreting():  # on the CPU the check costs no synchronisation
            self.check()
        return logits.view(self.rows, 1, -1)

    def check(self) -> None:
        """Raise if a wait failed in any launch since the plan was made or last checked (then start counting again):
        under the interpreter a task that ran before the phase it reads had finished, on a GPU a wait longer than
        :data:`WAIT_TIMEOUT_NS`. On a GPU this reads one integer back (a synchronisation): the decoder does it once
        per generation.

        Raises:
            RuntimeError: how many waits failed, and what that means.
        """
        failed = int(self.errors.item())
        if failed:
            self.errors.zero_()
            why = (
                "tasks ran before the phase they read had finished (the task table is out of order)"
                if _interpreting()
                else f"waits gave up (the first after {WAIT_TIMEOUT_NS / 1e9:g} s without the hand-off it waited for, "
                "the others at once after it; the results are wrong)"
            )
            raise RuntimeError(f"persistent decode step: {failed} {why}")


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def persistent_step(model: CM3Leon, logits_range: tuple[int, int]) -> PersistentStep:
    """The :class:`PersistentStep` of ``model``'s KV cache for ``logits_range``, planned on first use and kept as long
    as the cache (a CUDA graph that captured its launch keeps reading its tensors)."""
    steps = _STEPS.setdefault(model.kv_cache, {})
    key = PersistentStep.key_of(model, logits_range)
    if key not in steps:
        steps[key] = PersistentStep(model, logits_range)
    return steps[key]


def check_persistent_steps(model: CM3Leon) -> None:
    """:meth:`PersistentStep.check` for every persistent step planned for ``model``'s KV cache (none planned: nothing
    to do, no synchronisation)."""
    for step in _STEPS.get(model.kv_cache, {}).values() if model.kv_cache is not None else ():
        step.check()


def persistent_decode_forward(model: CM3Leon, idx: Tensor, input_pos: Tensor, logits_range: tuple[int, int]) -> Tensor:
    """The decode-step logits of ``model(idx, input_pos=input_pos, last_only=True, logits_range=logits_range)`` in
    one launch (what :func:`~cm3leon_lightning.model.fused.fused_decode_forward` does with the ``persistent``
    option).

    Args:
        model: a GELU or ReLU model with a KV cache (:meth:`CM3Leon.setup_kv_cache`), in eval mode, weights and cache
            of one dtype, at most :data:`MAX_ROWS` rows.
        idx: ``(B, 1)`` one token per cache row (any strides).
        input_pos: ``(1,)`` long, the cache slot of the tokens.
        logits_range: ``(lo, hi)`` ids whose logits to compute.

    Returns:
        ``(B, 1, hi - lo)`` logits in the model's dtype.

    Raises:
        ValueError: a model or batch the step cannot run (the reason named), inputs the model's forward refuses
            (:func:`~cm3leon_lightning.model.fused.check_step_inputs`) or a range outside the vocabulary.
    """
    cache = model.kv_cache
    if cache is None:
        raise RuntimeError("persistent_decode_forward needs a KV cache; call setup_kv_cache() first")
    from cm3leon_lightning.model.fused import check_logits_range, check_step_inputs

    check_step_inputs(model, idx, input_pos, "persistent_decode_forward")
    check_logits_range(model, logits_range)
    reason = persistent_unsupported(model, cache.batch_size)
    if reason is not None:
        raise ValueError(reason)
    return persistent_step(model, logits_range)(idx, input_pos)
