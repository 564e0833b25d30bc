"""The CM3Leon decoder-only transformer (paper section 2.3).

Pre-LayerNorm GPT/OPT-style decoder with the paper's changes: no bias in any layer, no dropout, LayerNorms without
learnable parameters, learned absolute position embeddings initialized N(0, 0.0002), every other weight truncated
normal (mean 0, std 0.006, cut at +-3 std), output layers (each block's attention out-projection and MLP
down-projection, and the LM head when untied) initialized to zero, and a final LayerNorm before the LM head.

One :meth:`CM3Leon.forward` serves training (full causal sequence), prefill and single-token decode with the static
:class:`~cm3leon_lightning.model.kv_cache.KVCache`. This module imports no Lightning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model.kv_cache import KVCache, padding_causal_mask, positions_from_valid

ATTENTION_IMPLS = ("sdpa", "flex")
"""How attention over the KV cache (prefill and decode, i.e. inference) is computed: ``sdpa``
(``F.scaled_dot_product_attention`` with a boolean mask, over every cache slot) or ``flex`` (FlexAttention with a block
mask that visits only the filled cache blocks, :func:`cache_block_mask`; compiled on CUDA, a single-token query runs
its split-KV flash-decoding kernel). Forwards without a cache (training, scoring) always use SDPA."""


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dimension without learnable parameters (paper section 2.3)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


FLEX_BLOCK = 128
"""Query and key block size of the FlexAttention block mask over the KV cache (FlexAttention's default)."""


def cache_block_mask(valid: Tensor, input_pos: Tensor, block: int = FLEX_BLOCK) -> BlockMask:
    """FlexAttention block mask of queries at cache slots ``input_pos`` over the ``S`` slots of ``valid``.

    Each block of ``block`` queries visits only the key blocks up to the one holding its last query's slot, so a
    decode step reads the filled part of the cache, not all of it (the KV cache is static: most of it is empty
    until the end of an image). Inside those blocks the ``mask_mod`` applies
    :func:`~cm3leon_lightning.model.kv_cache.padding_causal_mask`'s rule. Built from tensors only (no host sync),
    so it can be made in every compiled or graph-captured step.

    Args:
        valid: ``(B, S)`` bool, True where a slot holds a real token.
        input_pos: ``(T,)`` long, the slots of the queries.
        block: query and key block size.

    Returns:
        A block mask for ``(B, H, T, D)`` queries over ``(B, H, S, D)`` keys (broadcast over batch and heads).
    """
    T, S = input_pos.shape[0], valid.shape[1]
    n_q, n_kv = -(-T // block), -(-S // block)
    last = F.pad(input_pos, (0, n_q * block - T)).view(n_q, block).amax(dim=1)  # (n_q,) the latest slot per block
    kv_num_blocks = (last // block + 1).to(torch.int32).view(1, 1, n_q)  # key blocks each query block visits
    kv_indices = torch.arange(n_kv, device=valid.device, dtype=torch.int32).expand(1, 1, n_q, n_kv)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        slot = input_pos[q_idx]
        return ((kv_idx <= slot) & valid[b, kv_idx]) | (kv_idx == slot)

    # The transposed (query-per-key-block) indices serve only a backward pass: decoding runs without autograd.
    backward = torch.is_grad_enabled()
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, S), compute_q_blocks=backward
    )


def flex_cached_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """Attention of queries over the KV cache through FlexAttention, masked by :func:`cache_block_mask`.

    The padding-causal mask is computed inside the kernel, so no ``(B, 1, T, S)`` mask is materialised, and key
    blocks after the queries' slots are never read. Build ``block_mask`` once per forward and share it across layers.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` cached keys.
        v: ``(B, H, S, D)`` cached values.
        block_mask: ``cache_block_mask(valid, input_pos)`` of the cache's slot validity and the queries' slots.

    Returns:
        ``(B, H, T, D)``, equal to ``scaled_dot_product_attention(q, k, v, attn_mask=padding_causal_mask(...))``.
    """
    if k.dtype != q.dtype:  # autocast: SDPA casts for itself, FlexAttention needs one dtype (a copy of the cache)
        k, v = k.to(q.dtype), v.to(q.dtype)
    if q.device.type == "cpu":
        q = q.contiguous()  # inductor's CPU flex template cannot read a query that is a view of the QKV matmul
    elif not torch.compiler.is_compiling():
        # Outside torch.compile FlexAttention runs an unfused reference; on CUDA compile just the attention, so the
        # eager and hand-captured (`graph`) decode modes get the fused kernel too.
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)``, created once."""
    return torch.compile(flex_attention, fullgraph=True)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None) -> Tensor:
    """``(B, H, T, D)`` attention of ``q`` over ``k``/``v``: FlexAttention for a :func:`cache_block_mask`, else SDPA
    with a ``(B, 1, T, S)`` bool mask, or plain causal attention (``T == S``) when ``mask`` is None. A KV cache of
    another dtype than the queries (``setup_kv_cache(dtype=...)``) is read in the queries' dtype."""
    if isinstance(mask, BlockMask):
        return flex_cached_attention(q, k, v, mask)
    if k.dtype != q.dtype:  # SDPA refuses mixed dtypes outside autocast (under autocast it casts for itself)
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention`` (or FlexAttention), no biases.

    Args:
        config: the architecture.

    Attributes:
        impl: one of :data:`ATTENTION_IMPLS`, used with a KV cache (set by :meth:`CM3Leon.set_attention`).
    """

    def __init__(self, config: CM3LeonConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.impl = "sdpa"
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: Tensor, mask: Tensor | BlockMask | None, kv_cache: KVCache | None, layer: int, input_pos: Tensor | None
    ) -> Tensor:
        """Attend ``x`` ``(B, T, C)``; ``mask``: ``(B, 1, T, S)`` bool (SDPA), a :func:`cache_block_mask`
        (FlexAttention over the cache) or None for plain causal attention."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, input_pos, k, v)  # (B, H, S, D)
        y = attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network, no biases: GELU, ReLU or SwiGLU.

    Args:
        config: the architecture.
    """

    def __init__(self, config: CM3LeonConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.fc_gate = nn.Linear(config.d_model, config.d_ff, bias=False) if config.activation == "swiglu" else None
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        h = self.fc_in(x)  # (B, T, F)
        if self.fc_gate is not None:
            h = F.silu(self.fc_gate(x)) * h
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h)
        return self.fc_out(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Args:
        config: the architecture.
    """

    def __init__(self, config: CM3LeonConfig) -> None:
        super().__init__()
        self.eps = config.layer_norm_eps
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, mask: Tensor | BlockMask | None, kv_cache: KVCache | None, layer: int, input_pos: Tensor | None
    ) -> Tensor:
        """``(B, T, C) -> (B, T, C)``; see :meth:`CausalSelfAttention.forward` for the other arguments."""
        x = x + self.attn(layer_norm(x, self.eps), mask, kv_cache, layer, input_pos)
        return x + self.mlp(layer_norm(x, self.eps))


class CM3Leon(nn.Module):
    """Decoder-only CM3Leon transformer (paper section 2.3).

    Args:
        config: the architecture.
        gradient_checkpointing: recompute each block in the backward pass (``torch.utils.checkpoint``,
            ``use_reentrant=False``) to save activation memory; applies only in training mode without a KV cache.

    Attributes:
        wte: token embedding ``(vocab_size, d_model)``, shared with ``lm_head`` when ``config.tie_embeddings``.
        wpe: learned absolute position embedding ``(max_seq_len, d_model)``.
        blocks: the ``n_layer`` :class:`Block` s.
        lm_head: ``d_model -> vocab_size`` projection, no bias.
        kv_cache: the static cache set by :meth:`setup_kv_cache`, or None.
    """

    def __init__(self, config: CM3LeonConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.init_weights()  # also ties lm_head to wte

    # ------------------------------------------------------------------------------------------ initialization
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)apply the paper's initialization (section 2.3) to every parameter.

        Position embedding ~ N(0, ``pos_init_std``); every other weight ~ truncated normal(0, ``init_std``) cut at
        +-3 std; each block's ``attn.out_proj`` and ``mlp.fc_out``, and an untied ``lm_head``, set to zero.
        Also (re)ties ``lm_head.weight`` to ``wte.weight`` when ``config.tie_embeddings``: ``Module.to_empty`` unties
        them, so build on the meta device, ``to_empty(device=...)``, then call this.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.lm_head:
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=self.config.pos_init_std)
        for block in self.blocks:
            nn.init.zeros_(block.attn.out_proj.weight)
            nn.init.zeros_(block.mlp.fc_out.weight)
        if not self.config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)  # tied: it is ``wte.weight``, initialized above

    def num_parameters(self) -> int:
        """Unique trainable parameters (a tied embedding counted once), as :meth:`CM3LeonConfig.num_parameters`."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def attention(self) -> str:
        """The implementation of attention over the KV cache in every block (:data:`ATTENTION_IMPLS`), or
        ``"mixed"`` when blocks were set one by one to different ones."""
        impls = {block.attn.impl for block in self.blocks}
        return impls.pop() if len(impls) == 1 else "mixed"

    def set_attention(self, impl: str) -> None:
        """Compute attention over the KV cache (prefill and decode) with ``impl`` of :data:`ATTENTION_IMPLS`; both
        give the same outputs up to float rounding. Forwards without a cache (training) always use SDPA."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
        for block in self.blocks:
            block.attn.impl = impl

    # ------------------------------------------------------------------------------------------ KV cache
    def setup_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Allocate a static KV cache for ``batch_size`` rows and ``max_seq_len`` slots (default: the context).

        ``device`` and ``dtype`` default to those of the token embedding. Replaces any existing cache.
        """
        max_seq_len = self.config.max_seq_len if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= self.config.max_seq_len:
            raise ValueError(f"setup_kv_cache max_seq_len must be in [1, {self.config.max_seq_len}], got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"setup_kv_cache batch_size must be >= 1, got {batch_size}")
        c = self.config
        self.kv_cache = None  # free the old cache first: both at once would double the peak memory
        self.kv_cache = KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            max_seq_len,
            c.head_dim,
            device=self.wte.weight.device if device is None else device,
            dtype=self.wte.weight.dtype if dtype is None else dtype,
        )
        return self.kv_cache

    def reset_kv_cache(self) -> None:
        """Zero the cache in place (keeps its buffers, so captured CUDA graphs stay valid)."""
        if self.kv_cache is None:
            raise RuntimeError("reset_kv_cache: no KV cache; call setup_kv_cache(batch_size, max_seq_len) first")
        self.kv_cache.reset()

    def clear_kv_cache(self) -> None:
        """Drop the cache and free its memory."""
        self.kv_cache = None

    def cache_masks(self, input_pos: Tensor) -> dict[str, Tensor | BlockMask]:
        """The attention masks of queries at cache slots ``input_pos``, by implementation, for the implementations
        the blocks use: ``sdpa``, the ``(B, 1, T, S)`` bool mask; ``flex``, the :func:`cache_block_mask` (its kernel
        computes the mask itself and skips the empty end of the cache). Built once per forward for all layers."""
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("cache_masks: no KV cache; call setup_kv_cache(batch_size, max_seq_len) first")
        impls = {block.attn.impl for block in self.blocks}
        masks: dict[str, Tensor | BlockMask] = {}
        if "sdpa" in impls:
            masks["sdpa"] = cache.attention_mask(input_pos)  # (B, 1, T, S)
        if "flex" in impls:
            masks["flex"] = cache_block_mask(cache.valid, input_pos)
        return masks

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
        logits_range: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits of the next token at every position.

        Three uses, one code path:

        * **training / scoring** (``input_pos=None``): the full causal sequence, positions ``0..T-1``. The KV
          cache, if any, is neither read nor written.
        * **prefill** (``input_pos=torch.arange(T)``, after :meth:`setup_kv_cache`): same logits, and keys/values
          are written to cache slots ``input_pos``.
        * **decode** (``input_pos=torch.tensor([t])``, ``idx`` of shape ``(B, 1)``): one token per row at slot
          ``t``. Only static shapes and tensor ops, no ``.item()`` and no data-dependent Python branch, so the step
          can be wrapped in ``torch.compile`` or a CUDA graph (advance ``input_pos`` in place on the device).

        Batched prompts of different lengths are **left-padded** to a common length and given an
        ``attention_mask`` (1 = real token, 0 = padding). Each row's position ids count only its real tokens and
        no query attends to padding, so every row gets the logits of its own unpadded forward (up to float
        rounding: the matmuls run in other shapes). The cache remembers which slots are padding, so decode steps
        need no mask (every decoded token is real; pass a ``(B, 1)`` mask to mark some rows' tokens as padding).
        Rows move in lockstep through the slots.
        Right-padded training batches may pass ``attention_mask`` too (or none: later pads never affect earlier
        logits).

        Example (two prompts, lengths 3 and 2)::

            idx = torch.tensor([[a, b, c], [PAD, d, e]])
            mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
            model.setup_kv_cache(batch_size=2, max_seq_len=64)
            logits = model(idx, input_pos=torch.arange(3), attention_mask=mask, last_only=True)  # prefill, (2, 1, V)
            input_pos = torch.tensor([3])
            for _ in range(n_new):
                tok = logits[:, -1].argmax(-1, keepdim=True)  # (2, 1)
                logits = model(tok, input_pos=input_pos)  # decode, (2, 1, V)
                input_pos += 1  # in place: a CUDA graph sees the new value

            # row 1's `d` has position 0 and never attends to the PAD slot: its logits equal model([[d, e]])'s.

        Args:
            idx: ``(B, T)`` long token ids in ``[0, vocab_size)`` (checked when ``idx`` is on the CPU, outside
                ``torch.compile``).
            input_pos: ``(T,)`` long cache slots of the tokens (use and update the KV cache), each in
                ``[0, max_seq_len)`` of the cache (checked when ``input_pos`` is on the CPU, outside ``torch.compile``),
                or None.
            attention_mask: ``(B, T)`` bool/int, 1 for real tokens and 0 for padding; None means all real.
            last_only: return logits of the last position only, ``(B, 1, V)`` (saves memory in prefill).
            logits_range: ``(lo, hi)``: compute the logits of ids ``lo..hi-1`` only (the LM head reads just those
                rows of its weight; image decoding needs only the image codes, 1/8 of the 350m vocabulary).

        Returns:
            ``(B, T, vocab_size)`` logits (``(B, 1, vocab_size)`` with ``last_only``; last dimension ``hi - lo``
            with ``logits_range``), in the compute dtype.
        """
        if idx.ndim != 2:
            raise ValueError(f"CM3Leon.forward idx must be (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if idx.numel() and idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())  # no device sync on the CPU (the embedding's own error is bare)
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"CM3Leon.forward idx holds token ids {lo}..{hi}, outside [0, {self.config.vocab_size}) "
                    "(vocab_size: does the data's vocabulary match the model's?)"
                )
        if logits_range is not None and not 0 <= logits_range[0] < logits_range[1] <= self.config.vocab_size:
            raise ValueError(
                f"CM3Leon.forward logits_range {tuple(logits_range)} must satisfy 0 <= lo < hi <= vocab_size "
                f"{self.config.vocab_size}"
            )
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise ValueError(
                f"CM3Leon.forward attention_mask shape {tuple(attention_mask.shape)} must equal idx shape {(B, T)}"
            )
        cache, mask, cache_masks = None, None, {}
        if input_pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"CM3Leon.forward sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            if attention_mask is None:
                pos = torch.arange(T, device=idx.device)[None]  # (1, T); mask None: plain causal, so SDPA can use
                # its flash/efficient kernels
            else:
                valid, slots = attention_mask.bool(), torch.arange(T, device=idx.device)
                pos = positions_from_valid(valid, slots)  # (B, T)
                mask = padding_causal_mask(valid, slots)  # (B, 1, T, T)
        else:
            cache = self.kv_cache
            if cache is None:
                raise RuntimeError("CM3Leon.forward got input_pos but no KV cache; call setup_kv_cache() first")
            if input_pos.shape != (T,):
                raise ValueError(f"CM3Leon.forward input_pos must have shape ({T},), got {tuple(input_pos.shape)}")
            if input_pos.dtype != torch.long:
                raise ValueError(f"CM3Leon.forward input_pos must be a long tensor, got {input_pos.dtype}")
            if T and input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
                # Checked where it costs no device sync (a CUDA or compiled step would have to wait for the value).
                lo, hi = int(input_pos.min()), int(input_pos.max())
                if lo < 0 or hi >= cache.max_seq_len:
                    raise ValueError(
                        f"CM3Leon.forward input_pos slots {lo}..{hi} must lie in [0, {cache.max_seq_len}) "
                        f"(the KV cache's max_seq_len; setup_kv_cache(batch_size, max_seq_len) allocates more)"
                    )
            if B != cache.batch_size or T > cache.max_seq_len:
                raise ValueError(
                    f"CM3Leon.forward idx shape {(B, T)} does not fit the KV cache "
                    f"(batch_size {cache.batch_size}, max_seq_len {cache.max_seq_len})"
                )
            valid = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            cache.update_valid(input_pos, valid)
            pos = cache.positions(input_pos)  # (B, T)
            cache_masks = self.cache_masks(input_pos)  # by implementation, built once for all layers

        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if use_checkpoint:
                x = checkpoint(block, x, mask, None, layer, None, use_reentrant=False)
            else:
                x = block(x, cache_masks.get(block.attn.impl, mask), cache, layer, input_pos)
        x = layer_norm(x, self.config.layer_norm_eps)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if logits_range is not None:
            return F.linear(x, self.lm_head.weight[logits_range[0] : logits_range[1]])  # (B, T, hi - lo)
        return self.lm_head(x)  # (B, T, V)


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts that FSDP, activation-checkpoint wrappers and ``torch.compile`` insert into parameter names."""


def clean_param_name(name: str) -> str:
    """``name`` without the wrapper parts of :data:`WRAPPER_PREFIXES` (the name the unwrapped model gives)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_groups(model: nn.Module, weight_decay: float, ndims: dict[str, int] | None = None) -> list[dict]:
    """nanoGPT-style AdamW groups: decay on parameters with ``ndim >= 2`` (matrices, embeddings), none on the rest.

    Tied parameters appear once. Frozen parameters are left out.

    Args:
        model: any module.
        weight_decay: decay of the first group (e.g. 0.1).
        ndims: each parameter's ``ndim`` as the unwrapped model defines it, by name (``{n: p.ndim for n, p in
            model.named_parameters()}`` recorded before sharding). Needed once FSDP has wrapped the model: its
            parameters are then flat 1-D shards, which would otherwise all escape decay. Names are compared without
            wrapper parts (:func:`clean_param_name`).

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``.
    """
    if weight_decay < 0:
        raise ValueError(f"param_groups weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ndims is None:
            ndim = p.ndim
        else:
            key = clean_param_name(name)
            if key not in ndims:
                raise ValueError(f"param_groups: parameter {key!r} is not in ndims (recorded for another model?)")
            ndim = ndims[key]
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
