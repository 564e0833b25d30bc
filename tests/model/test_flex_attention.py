"""FlexAttention over the KV cache: the block mask visits only the filled key blocks and computes SDPA's attention."""

import os

import pytest
import torch
import torch.nn.functional as F

from cm3leon_lightning.model.kv_cache import padding_causal_mask
from cm3leon_lightning.model.transformer import FLEX_BLOCK, cache_block_mask, flex_cached_attention

CUDA = torch.cuda.is_available()
B, H, S, D = 2, 2, 320, 16  # 320 slots: three key blocks of 128, the last one partial


def cache(seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random keys and values, and a validity mask with row 1 left-padded by 3 slots."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, B, H, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False
    return k.to(device), v.to(device), valid.to(device)


@pytest.mark.parametrize(
    "slots,visited",
    [([0], [1]), ([127], [1]), ([128], [2]), ([319], [3]), (list(range(200)), [1, 2]), ([250, 251, 252], [2])],
)
def test_block_mask_visits_the_key_blocks_up_to_each_query_blocks_last_slot(slots, visited):
    """Decode at slots 0/127/128/319, a 200-token prefill (two query blocks) and three forced tokens."""
    _, _, valid = cache(0)
    mask = cache_block_mask(valid, torch.tensor(slots))
    assert FLEX_BLOCK == 128 and mask.kv_num_blocks.flatten().tolist() == visited
    assert mask.seq_lengths == (len(slots), S)


@pytest.mark.parametrize("slots", [[5], [130], [300], list(range(140)), [257, 258]])
def test_flex_cached_attention_equals_sdpa_with_the_padding_causal_mask(slots):
    k, v, valid = cache(1)
    input_pos = torch.tensor(slots)
    q = torch.randn(B, H, len(slots), D, generator=torch.Generator().manual_seed(2))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_causal_mask(valid, input_pos))
    torch.testing.assert_close(flex_cached_attention(q, k, v, cache_block_mask(valid, input_pos)), expected)


@pytest.mark.skipif(
    os.environ.get("CM3LEON_TEST_COMPILE") != "1" and not CUDA,
    reason="FlexAttention skips blocks only compiled (~20 s on 2 CPU cores); set CM3LEON_TEST_COMPILE=1",
)
def test_compiled_flex_attention_never_reads_key_blocks_after_the_query():
    """NaN keys and values after the query's block would poison a dense attention (0 * NaN); the compiled kernel
    skips those blocks, so the output stays finite and equals SDPA over the blocks it reads."""
    device = "cuda" if CUDA else "cpu"
    k, v, valid = cache(3, device)
    k[:, :, 2 * FLEX_BLOCK :], v[:, :, 2 * FLEX_BLOCK :] = float("nan"), float("nan")
    input_pos = torch.tensor([130], device=device)  # block 1: reads blocks 0 and 1 only
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(4)).to(device)
    attend = flex_cached_attention if CUDA else torch.compile(flex_cached_attention, fullgraph=True)
    out = attend(q, k, v, cache_block_mask(valid, input_pos))
    head = slice(0, 2 * FLEX_BLOCK)
    mask = padding_causal_mask(valid[:, head], input_pos)
    expected = F.scaled_dot_product_attention(q, k[:, :, head], v[:, :, head], attn_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_a_forward_builds_each_mask_once_for_all_layers(monkeypatch):
    """With every block on FlexAttention one block mask serves all layers and no SDPA mask is built; mixed blocks get
    both, each the one its implementation reads."""
    import cm3leon_lightning.model.transformer as transformer
    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model import CM3Leon
    from cm3leon_lightning.model.kv_cache import KVCache

    calls = {"block": 0, "bool": 0}
    real_block, real_bool = transformer.cache_block_mask, KVCache.attention_mask

    def count_block(*args, **kwargs):
        calls["block"] += 1
        return real_block(*args, **kwargs)

    def count_bool(self, input_pos):
        calls["bool"] += 1
        return real_bool(self, input_pos)

    monkeypatch.setattr(transformer, "cache_block_mask", count_block)
    monkeypatch.setattr(KVCache, "attention_mask", count_bool)
    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", n_layer=3)).eval()
    idx = torch.randint(0, 512, (2, 5))
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    with torch.no_grad():
        model.set_attention("flex")
        model(idx, input_pos=torch.arange(5))
        assert calls == {"block": 1, "bool": 0}
        model.blocks[1].attn.impl = "sdpa"
        model(idx[:, :1], input_pos=torch.tensor([5]))
    assert calls == {"block": 2, "bool": 1}
