"""The batched, KV-cached decode step and its runner (paper section 3.1), eager or compiled.

All rows of a generation (guidance streams x prompts x candidates) go through the transformer together: the
left-padded prompts are prefilled in one forward, then :func:`decode_step` runs one forward per token for every row,
combines the guidance streams (:func:`process_logits`), samples with device-side noise and feeds the same token back
to every stream of a candidate. The step has static shapes and no host sync, so it can run compiled and/or replayed
from a captured CUDA graph (:mod:`~cm3leon_lightning.generation.graphs`). This module imports no Lightning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cm3leon_lightning.generation.graphs import (
    FUSED_MODES,
    GRAPH_MODES,
    TREE_MODES,
    GraphedStep,
    compiled,
    graphed_step,
    resolve_mode,
)
from cm3leon_lightning.generation.sampling import (
    cdk_logits,
    cfg_logits,
    constrain,
    dual_cfg_logits,
    sample,
    sample_noise,
    top_k_filter,
    top_p_filter,
)
from cm3leon_lightning.model import CM3Leon, fused_launch

METHODS = ("greedy", "temperature", "top_p", "cd_k")


@dataclass(frozen=True)
class SamplingSpec:
    """How one decode step turns the logits of its guidance streams into one token per output row.

    Attributes:
        method: ``greedy`` (argmax), ``temperature``, ``top_p`` or ``cd_k`` (paper section 3.1).
        streams: guidance streams per output row: 1 (none), 2 (conditional, unconditional: CFG or CD-K) or 3
            (full, image only, none: separate text and image guidance, section 4.1).
        cfg: CFG scale ``alpha_c`` of equation (2) (2 streams) or the text scale (3 streams).
        image_cfg: the image scale (3 streams only).
        temperature: softmax temperature; 0 means greedy for every method.
        top_p: nucleus mass for ``top_p``.
        top_k: optional top-k filter applied before sampling (any method but greedy).
        cdk_k: ``k`` of CD-K (equation (3)).
        cdk_alpha: ``alpha`` of CD-K (equation (3)).
        lo: first vocabulary id sampled from (the logits are sliced to ``[lo, hi)``; image decoding samples only the
            image-code range this way).
        hi: one past the last id sampled from.
    """

    method: str = "top_p"
    streams: int = 2
    cfg: float = 3.0
    image_cfg: float = 1.5
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int | None = None
    cdk_k: int = 8
    cdk_alpha: float = 0.5
    lo: int = 0
    hi: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.streams not in (1, 2, 3):
            raise ValueError(f"streams must be 1, 2 or 3, got {self.streams}")
        if self.method == "cd_k" and self.streams != 2:
            raise ValueError("method 'cd_k' contrasts a conditional and an unconditional stream: it needs streams=2")
        if not 0 <= self.temperature < float("inf"):  # inf: -inf / inf is NaN, and NaN won every draw
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not (abs(self.cfg) < float("inf") and abs(self.image_cfg) < float("inf")):  # NaN fails the comparison too
            raise ValueError(f"cfg and image_cfg must be finite, got {self.cfg} and {self.image_cfg}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.cdk_k < 1 or not 0 <= self.cdk_alpha <= 1:
            raise ValueError(f"cdk_k must be >= 1 and cdk_alpha in [0, 1], got {self.cdk_k} and {self.cdk_alpha}")
        if not 0 <= self.lo < self.hi:
            raise ValueError(f"the sampled id range [lo, hi) must be non-empty, got [{self.lo}, {self.hi})")

    @property
    def greedy(self) -> bool:
        """Whether the step takes an argmax (no noise needed)."""
        return self.method == "greedy" or self.temperature == 0

    @property
    def width(self) -> int:
        """Number of ids sampled from: ``hi - lo``."""
        return self.hi - self.lo


def process_logits(logits: Tensor, spec: SamplingSpec, allowed: Tensor | None = None) -> Tensor:
    """Guidance, constraints and filters: ``(S * R, V)`` stream logits -> ``(R, hi - lo)`` sampling logits.

    Rows are stream-major: rows ``[s * R, (s + 1) * R)`` are stream ``s`` (0 = conditional / full).

    Args:
        logits: ``(S * R, V)`` next-token logits of every stream, or ``(S * R, hi - lo)``: those of the sampled
            range only (``model(..., logits_range=(lo, hi))``, what the decoder computes).
        spec: the sampling rule.
        allowed: optional ``(hi - lo,)`` bool mask of ids that may be sampled (applied after guidance, so two
            ``-inf`` logits never meet in a subtraction).
    """
    x = logits if logits.shape[-1] == spec.width else logits[:, spec.lo : spec.hi]  # (S*R, W)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32, float64 stays
    x = x.view(spec.streams, -1, x.shape[-1])  # (S, R, W)
    if spec.method == "cd_k":
        cond, uncond = (x[0], x[1]) if allowed is None else (constrain(x[0], allowed), constrain(x[1], allowed))
        scores = cdk_logits(cond, uncond, spec.cdk_k, spec.cdk_alpha)
    elif spec.streams == 1:
        scores = x[0]
    elif spec.streams == 2:
        scores = cfg_logits(x[0], x[1], spec.cfg)
    else:
        scores = dual_cfg_logits(x[0], x[1], x[2], spec.cfg, spec.image_cfg)
    if allowed is not None:
        scores = constrain(scores, allowed)  # (R, W)
    if spec.greedy:
        return scores
    if spec.temperature != 1.0:
        # Divide each logit's distance to its row's best: ``scores / T`` overflows to inf for a tiny T (below ~1e-38
        # in float32), inf - inf is NaN in the softmax, and the draw then returned the range's first id (<pad> for
        # text). Here the best logit maps to 0 and the rest stay below it (or -inf): the same distribution.
        top = scores.amax(dim=-1, keepdim=True)
        scores = torch.where(scores == top, 0.0, (scores - top) / spec.temperature)  # 0/0 when T rounds to 0
    if spec.top_k is not None:
        scores = top_k_filter(scores, spec.top_k)
    if spec.method == "top_p":
        scores = top_p_filter(scores, spec.top_p)
    return scores


def pick_tokens(logits: Tensor, spec: SamplingSpec, allowed: Tensor | None, noise: Tensor | None) -> Tensor:
    """``(S * R, V)`` or ``(S * R, hi - lo)`` logits -> ``(R,)`` sampled vocabulary ids (see :func:`process_logits`
    and :func:`sample`)."""
    return sample(process_logits(logits, spec, allowed), noise) + spec.lo


def decode_step(
    model: CM3Leon,
    feed: Tensor,
    input_pos: Tensor,
    noise: Tensor | None,
    spec: SamplingSpec,
    allowed: Tensor | None,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """One KV-cached decode step for every row: forward, guidance, filters, sampling. Compile-friendly.

    Args:
        model: the transformer, with a KV cache of ``S * R`` rows.
        feed: ``(S * R, 1)`` the previous token of every stream row.
        input_pos: ``(1,)`` the cache slot of ``feed`` (the caller advances it in place).
        noise: ``(R, hi - lo)`` exponential noise, or None when greedy.
        spec: the sampling rule.
        allowed: optional ``(hi - lo,)`` bool constraint.
        fused: run the transformer through the Triton kernels of :mod:`cm3leon_lightning.model.fused`, and the
            sampling through :func:`~cm3leon_lightning.generation.sampling_kernel.fused_pick_tokens` where it applies.

    Returns:
        ``(R,)`` the new token of each output row, and ``(S * R, 1)`` the same token for every stream (next feed).
    """
    span = (spec.lo, spec.hi)
    if fused:
        from cm3leon_lightning.generation.sampling_kernel import fused_pick_tokens
        from cm3leon_lightning.model.fused import fused_decode_forward

        logits = fused_decode_forward(model, feed, input_pos, span)[:, -1]  # (S*R, W)
        picked = fused_pick_tokens(logits, spec, allowed, noise)  # (R,), or None for rules the kernel lacks
        if picked is None:
            picked = pick_tokens(logits, spec, allowed, noise)
    else:
        logits = model(feed, input_pos=input_pos, last_only=True, logits_range=span)[:, -1]  # (S*R, W)
        picked = pick_tokens(logits, spec, allowed, noise)  # (R,)
    return picked, picked.repeat(spec.streams)[:, None]


# ------------------------------------------------------------------------------------------------ the runner
def _device(model: CM3Leon) -> torch.device:
    return model.wte.weight.device


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad id lists into ``(B, L)`` ids and a ``(B, L)`` bool attention mask (True = real token)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, length - len(r) :] = True
    return ids.to(device), mask.to(device)


class Decoder:
    """Prefill a left-padded batch, then run :func:`decode_step` (eager or compiled) one token at a time.

    Args:
        model: the transformer (its KV cache is (re)allocated as needed and reused when the shape matches).
        spec: the sampling rule.
        rows: prompt ids of every stream row, stream-major (``S * R`` lists).
        max_new_tokens: the most tokens this decoder will produce (sizes the cache).
        seed: seed of the device-side ``torch.Generator`` (None: nondeterministic).
        allowed: optional ``(hi - lo,)`` bool constraint.
        compile: how the decode step runs (:func:`~cm3leon_lightning.generation.graphs.resolve_mode`): None means
            compiled on CUDA and eager elsewhere; True compiled; False eager; or a mode name of
            :data:`~cm3leon_lightning.generation.graphs.MODES`. Every mode gives the eager step's tokens.
    """

    def __init__(
        self,
        model: CM3Leon,
        spec: SamplingSpec,
        rows: Sequence[Sequence[int]],
        max_new_tokens: int,
        seed: int | None = None,
        allowed: Tensor | None = None,
        compile: bool | str | None = None,
    ) -> None:
        if max_new_tokens < 1:  # was an IndexError in run(), or a prefill whose token had no slot
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(rows) % spec.streams:
            raise ValueError(f"{len(rows)} prompt rows do not split into {spec.streams} guidance streams")
        self.model, self.spec = model, spec
        self.device = _device(model)
        self.rows = len(rows) // spec.streams
        self.ids, self.mask = left_pad(rows, 0, self.device)  # (S*R, L)
        self.prompt_len = self.ids.shape[1]
        # The whole document (prompt and new tokens) must fit the context, as in training, although the last new
        # token is never fed: the serving and CLI checks count positions the same way.
        need = self.prompt_len + max_new_tokens
        if need > model.config.max_seq_len:
            raise ValueError(
                f"prompt of {self.prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's context "
                f"max_seq_len={model.config.max_seq_len}"
            )
        # Round the cache up to a multiple of 64 slots, so prompts of similar lengths share one compiled step.
        slots = min(model.config.max_seq_len, -(-need // 64) * 64)
        cache = model.kv_cache
        weight = model.wte.weight
        stale = (
            cache is None
            or cache.batch_size != len(rows)
            or cache.max_seq_len != slots
            or cache.device != weight.device
            or cache.dtype != weight.dtype
            # A cache made under torch.inference_mode (e.g. inside trainer.validate) cannot be updated outside it.
            or cache.valid.is_inference() != torch.is_inference_mode_enabled()
        )
        del cache  # no reference of ours keeps the old cache alive while the new one is allocated
        if stale:
            model.setup_kv_cache(len(rows), slots)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.mode = resolve_mode(compile, self.device, model)
        if self.mode in FUSED_MODES:
            self.step_fn: Callable[..., Any] = functools.partial(decode_step, fused=True)
        elif self.mode in ("eager", "graph"):
            self.step_fn = decode_step
        else:
            self.step_fn = compiled(decode_step, self.mode)
        self.graph: GraphedStep | None = None
        # the fused kernels' launch options, fixed when a graph captures them (None for the other modes)
        self.fused_options = fused_launch.fused_options() if self.mode in FUSED_MODES else None
        self.allowed = allowed  # selects the captured graph in the graph modes
        self.input_pos = torch.tensor([self.prompt_len], device=self.device)

    @property
    def allowed(self) -> Tensor | None:
        """The ``(hi - lo,)`` bool constraint of the sampled ids (None: all allowed); settable between tokens."""
        return self._allowed

    @allowed.setter
    def allowed(self, value: Tensor | None) -> None:
        self._allowed = value
        if self.mode in GRAPH_MODES:  # one captured graph per cache, mode, spec, rows, constraint, attention, autocast
            mask = None if value is None else value.cpu().numpy().tobytes()  # (, fused options)
            attention = tuple(block.attn.impl for block in self.model.blocks)
            kind = self.device.type
            autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            key = (self.mode, self.spec, len(self.ids), mask, attention, autocast, self.fused_options)
            self.graph = graphed_step(self.model.kv_cache, key, self.step_fn, self.spec, value)

    def _noise(self) -> Tensor | None:
        if self.spec.greedy:
            return None
        return sample_noise((self.rows, self.spec.width), self.generator, self.device)

    def _last_logits(self, ids: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(S * R, hi - lo)`` logits of the sampled range after the last of ``ids`` (written at slots ``pos``)."""
        span = (self.spec.lo, self.spec.hi)
        return self.model(ids, input_pos=pos, attention_mask=mask, last_only=True, logits_range=span)[:, -1]

    def prefill(self) -> tuple[Tensor, Tensor]:
        """Run the prompts; returns the first new token ``(R,)`` and the next feed ``(S * R, 1)``."""
        pos = torch.arange(self.prompt_len, device=self.device)
        picked = pick_tokens(self._last_logits(self.ids, pos, self.mask), self.spec, self.allowed, self._noise())
        self.input_pos = torch.tensor([self.prompt_len], device=self.device)
        return picked, picked.repeat(self.spec.streams)[:, None]

    def feed_prompt(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Feed forced tokens ``(S * R, T)`` at the current slots (e.g. the next sentinel when infilling) and sample
        the token after them; advances the slot by ``T``. ``mask`` ``(S * R, T)``, False where a row's token is
        padding (its slot stays invalid: not attended to, not counted in positions); the last column must be real."""
        T = tokens.shape[1]
        pos = self.input_pos + torch.arange(T, device=self.device)
        picked = pick_tokens(self._last_logits(tokens, pos, mask), self.spec, self.allowed, self._noise())
        self.input_pos += T
        return picked, picked.repeat(self.spec.streams)[:, None]

    def step(self, feed: Tensor) -> tuple[Tensor, Tensor]:
        """Feed ``(S * R, 1)`` at the current slot, advance it, and return the next token and feed."""
        noise = self._noise()
        if self.graph is not None:
            picked, nxt = self.graph(self.model, feed, self.input_pos, noise)
        else:
            if self.mode in TREE_MODES:
                torch.compiler.cudagraph_mark_step_begin()
            picked, nxt = self.step_fn(self.model, feed, self.input_pos, noise, self.spec, self.allowed)
        self.input_pos += 1
        if self.mode not in GRAPH_MODES + TREE_MODES:
            return picked, nxt
        return picked.clone(), nxt.clone()  # CUDA-graph outputs are overwritten by the next replay

    def run(
        self, first: tuple[Tensor, Tensor], steps: int, stop_ids: Sequence[int] = (), check_every: int = 8
    ) -> Tensor:
        """Produce ``steps`` tokens starting from ``first`` (the output of :meth:`prefill`), ``(R, n)`` long.

        With ``stop_ids``, every ``check_every`` steps one host sync checks whether every row has produced a stop
        token and ends early; the caller cuts each row at its first stop. With the persistent step (the ``persistent``
        fused option), one more sync at the end checks that none of its waits failed.

        Raises:
            RuntimeError: a persistent step's wait failed (its results are wrong).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (the first token is the prefill's), got {steps}")
        picked, feed = first
        out = torch.empty((self.rows, steps), dtype=torch.long, device=self.device)
        out[:, 0] = picked
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        stopped = torch.isin(picked, stops)  # (R,)
        n = steps
        for i in range(1, steps):
            if len(stop_ids) and i % check_every == 0 and bool(stopped.all()):
                n = i
                break
            picked, feed = self.step(feed)
            out[:, i] = picked
            if len(stop_ids):
                stopped |= torch.isin(picked, stops)
        self.last_feed = feed
        if self.fused_options is not None and self.fused_options.persistent:
            from cm3leon_lightning.model.persistent import check_persistent_steps

            check_persistent_steps(self.model)
        return out[:, :n]
