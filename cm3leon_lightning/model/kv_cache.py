"""Static key/value cache and the padding-aware causal masks used by :class:`~cm3leon_lightning.model.CM3Leon`.

The cache is preallocated for ``max_seq_len`` *slots*; every row of the batch writes the same slots in lockstep
(``input_pos`` is one 1-D tensor shared by the batch), so all shapes are static and a decode step needs no
host-device synchronisation (it can be captured in a CUDA graph or compiled with ``torch.compile``).

Prompts of different lengths are left-padded to a common length. A boolean ``valid`` mask ``(B, S)`` held in the cache
records which slots hold real tokens. From it:

* the position id of a token is the number of real tokens before it in its row (:func:`positions_from_valid`), so
  a left-padded row sees exactly the positions it would see unpadded;
* a query attends to the slots at or before its own that hold real tokens, plus always its own slot, so that
  padding queries (whose outputs are ignored) never have an empty row and never produce NaNs
  (:func:`padding_causal_mask`).

The same two functions serve a full forward with an ``attention_mask`` (``valid`` is then the mask itself and
``input_pos`` is ``arange(T)``), so cached and uncached paths compute identical masks and positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def positions_from_valid(valid: Tensor, input_pos: Tensor) -> Tensor:
    """Position ids of the tokens at slots ``input_pos``: the number of real tokens before each in its row.

    Args:
        valid: ``(B, S)`` bool, True where a slot holds a real (non-padding) token.
        input_pos: ``(T,)`` long, the slots of the current tokens.

    Returns:
        ``(B, T)`` long position ids; padding slots get the position of the last real token before them (or 0).
    """
    pos = valid.long().cumsum(dim=1) - 1  # (B, S)
    return pos.clamp_min(0).index_select(1, input_pos)  # (B, T)


def padding_causal_mask(valid: Tensor, input_pos: Tensor) -> Tensor:
    """Boolean attention mask (True = attend) of queries at slots ``input_pos`` over all ``S`` key slots.

    A query attends to keys at slots ``<=`` its own that are ``valid``, and always to its own slot.

    Args:
        valid: ``(B, S)`` bool, True where a slot holds a real token.
        input_pos: ``(T,)`` long, the slots of the queries.

    Returns:
        ``(B, 1, T, S)`` bool, broadcastable over heads for ``scaled_dot_product_attention``.
    """
    slots = torch.arange(valid.shape[1], device=valid.device)  # (S,)
    causal = slots[None, :] <= input_pos[:, None]  # (T, S)
    own = slots[None, :] == input_pos[:, None]  # (T, S)
    return ((causal[None] & valid[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)


class KVCache(nn.Module):
    """Preallocated keys and values of every layer, plus the slot validity mask.

    Buffers (not saved in ``state_dict``): per layer ``i``, ``k{i}`` and ``v{i}`` of shape ``(B, n_head, S, head_dim)``
    (one buffer per layer, written with ``index_put_``: inductor then updates them in place; one shared 5-D buffer
    written through per-layer views makes a compiled step copy the whole cache every layer), and ``valid`` of shape
    ``(B, S)``. :attr:`k` and :attr:`v` stack the layers ``(n_layer, B, n_head, S, head_dim)`` for inspection.
    Stale contents never leak into a new generation that starts again at slot 0: a query only reads slots at or
    before its own, which the new generation has written. :meth:`reset` is hygiene.

    Args:
        n_layer: number of transformer blocks.
        batch_size: rows B (e.g. prompts x CFG streams x candidates).
        n_head: attention heads.
        max_seq_len: slots S, the longest prompt plus generated tokens.
        head_dim: width of one head.
        device: where to allocate.
        dtype: dtype of keys and values (use the dtype attention runs in, e.g. bfloat16 under autocast).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = (("n_layer", n_layer), ("batch_size", batch_size), ("n_head", n_head), ("max_seq_len", max_seq_len),
                 ("head_dim", head_dim))  # fmt: skip
        for name, value in sizes:
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.n_layer = n_layer
        for i in range(n_layer):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer(
            "valid", torch.zeros(batch_size, max_seq_len, device=device, dtype=torch.bool), persistent=False
        )
        for buf in self.buffers():
            # Fixed addresses: torch.compile(mode="reduce-overhead") then treats the in-place cache writes as static
            # buffer updates instead of skipping CUDA graphs for "mutated inputs".
            torch._dynamo.mark_static_address(buf, guard=False)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, n_head, S, head_dim)`` of layer ``i`` (the buffers themselves)."""
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @property
    def k(self) -> Tensor:
        """All keys stacked, ``(n_layer, B, n_head, S, head_dim)`` (a copy, for inspection)."""
        return torch.stack([self.layer(i)[0] for i in range(self.n_layer)])

    @property
    def v(self) -> Tensor:
        """All values stacked, ``(n_layer, B, n_head, S, head_dim)`` (a copy, for inspection)."""
        return torch.stack([self.layer(i)[1] for i in range(self.n_layer)])

    @property
    def batch_size(self) -> int:
        """Rows B of the cache."""
        return self.valid.shape[0]

    @property
    def max_seq_len(self) -> int:
        """Slots S of the cache."""
        return self.valid.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the keys and values."""
        return self.k0.dtype

    @property
    def device(self) -> torch.device:
        """Where the cache lives."""
        return self.valid.device

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's new keys/values at slots ``input_pos`` and return that layer's full cache.

        Args:
            layer: block index.
            input_pos: ``(T,)`` long slots.
            k: ``(B, n_head, T, head_dim)`` new keys.
            v: ``(B, n_head, T, head_dim)`` new values.

        Returns:
            Keys and values ``(B, n_head, S, head_dim)`` of the layer (its buffers, updated in place).
        """
        k_all, v_all = self.layer(layer)  # (B, H, S, D)
        k_all[:, :, input_pos] = k.to(k_all.dtype)  # index_put_ on the layer's own buffer
        v_all[:, :, input_pos] = v.to(v_all.dtype)
        return k_all, v_all

    def update_valid(self, input_pos: Tensor, mask: Tensor) -> None:
        """Mark slots ``input_pos`` real (True) or padding (False) per row; ``mask`` is ``(B, T)`` bool."""
        self.valid.index_copy_(1, input_pos, mask)

    def positions(self, input_pos: Tensor) -> Tensor:
        """``(B, T)`` position ids of the tokens at ``input_pos`` (see :func:`positions_from_valid`)."""
        return positions_from_valid(self.valid, input_pos)

    def attention_mask(self, input_pos: Tensor) -> Tensor:
        """``(B, 1, T, S)`` attention mask of queries at ``input_pos`` (see :func:`padding_causal_mask`)."""
        return padding_causal_mask(self.valid, input_pos)

    def reset(self) -> None:
        """Zero keys, values and the validity mask in place (buffers keep their addresses for CUDA graphs)."""
        for buf in self.buffers():
            buf.zero_()
