"""The CM3Leon transformer and its static KV cache (no Lightning imports)."""

from cm3leon_lightning.model.kv_cache import KVCache, padding_causal_mask, positions_from_valid
from cm3leon_lightning.model.transformer import ATTENTION_IMPLS, CM3Leon, param_groups

__all__ = ["ATTENTION_IMPLS", "CM3Leon", "KVCache", "padding_causal_mask", "param_groups", "positions_from_valid"]
