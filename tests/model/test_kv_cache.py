"""KVCache and the padding-aware positions and masks, checked on exact small examples."""

import pytest
import torch

from cm3leon_lightning.model import KVCache, padding_causal_mask, positions_from_valid

# row 0: three real tokens; row 1: one left pad then two real tokens
VALID = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)


def test_positions_count_real_tokens_before_each_slot():
    assert positions_from_valid(VALID, torch.arange(3)).tolist() == [[0, 1, 2], [0, 0, 1]]
    assert positions_from_valid(VALID, torch.tensor([2])).tolist() == [[2], [1]]


def test_mask_is_causal_skips_padding_and_always_keeps_the_own_slot():
    mask = padding_causal_mask(VALID, torch.arange(3))
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # the pad query (slot 0) sees only itself, so no softmax row is empty; real queries never see the pad
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # a decode query at slot 2 over a 4-slot cache
    valid = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert padding_causal_mask(valid, torch.tensor([2])).int().tolist() == [[[[0, 1, 1, 0]]]]


def test_cache_writes_slots_in_place_and_resets():
    cache = KVCache(n_layer=2, batch_size=2, n_head=1, max_seq_len=4, head_dim=1)
    k_ptr = cache.layer(1)[0].data_ptr()
    k_new = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # (B, H, T=1, D)
    k_all, v_all = cache.update(1, torch.tensor([2]), k_new, -k_new)
    assert k_all.shape == (2, 1, 4, 1)
    assert cache.k[1, :, 0, :, 0].tolist() == [[0, 0, 1, 0], [0, 0, 2, 0]]
    assert cache.v[1, :, 0, :, 0].tolist() == [[0, 0, -1, 0], [0, 0, -2, 0]]
    assert torch.count_nonzero(cache.k[0]) == 0  # other layers untouched
    cache.update_valid(torch.tensor([1, 2]), VALID[:, 1:])
    assert cache.valid.int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    assert cache.positions(torch.tensor([2])).tolist() == [[1], [1]]
    cache.reset()
    assert cache.layer(1)[0].data_ptr() == k_ptr and not cache.k.any() and not cache.v.any() and not cache.valid.any()
    assert (cache.batch_size, cache.max_seq_len) == (2, 4)
    with pytest.raises(ValueError, match="KVCache batch_size must be >= 1, got 0"):
        KVCache(n_layer=1, batch_size=0, n_head=1, max_seq_len=4, head_dim=1)
    for name in ("n_head", "head_dim"):  # an empty cache was allocated silently
        with pytest.raises(ValueError, match=f"KVCache {name} must be >= 1, got 0"):
            KVCache(**{"n_layer": 1, "batch_size": 1, "n_head": 1, "max_seq_len": 4, "head_dim": 1, name: 0})


def test_a_new_cache_is_allocated_after_the_old_one_is_freed(monkeypatch):
    """Serving decodes chunks of different shapes one after another: both caches alive at once doubled the peak."""
    import weakref

    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model import CM3Leon, transformer

    model = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    old = weakref.ref(model.setup_kv_cache(4, 32))
    alive: list[bool] = []
    real = transformer.KVCache

    def spy(*args, **kwargs):
        alive.append(old() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformer, "KVCache", spy)
    model.setup_kv_cache(2, 32)
    assert alive == [False] and model.kv_cache.batch_size == 2
