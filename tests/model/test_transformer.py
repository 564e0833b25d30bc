"""CM3Leon: paper section 2.3 initialization, causality, KV-cache equivalence (also left-padded batches),
gradient checkpointing, compile-friendliness of the decode step, and weight-decay groups."""

import math

import pytest
import torch
from torch import nn

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import ATTENTION_IMPLS, CM3Leon, param_groups

V = 512


def random_model(seed: int = 0, **overrides) -> CM3Leon:
    """A tiny model with every weight random: the paper's init zeroes the output layers, so blocks would contribute
    nothing and causality or cache bugs would go unseen."""
    torch.manual_seed(seed)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def test_init_follows_paper_section_2_3():
    cfg = CM3LeonConfig.from_preset("tiny", d_model=128, n_head=4, d_ff=512, vocab_size=1024, tie_embeddings=False)
    torch.manual_seed(0)
    model = CM3Leon(cfg)
    # no biases, no LayerNorm parameters: every parameter is a Linear/Embedding weight matrix
    assert all(name.endswith(".weight") and p.ndim == 2 for name, p in model.named_parameters())
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    zero = {f"blocks.{i}.{n}.weight" for i in range(cfg.n_layer) for n in ("attn.out_proj", "mlp.fc_out")}
    zero.add("lm_head.weight")  # untied
    # the std of N(0, s) truncated at +-3 s is s * sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) = 0.98658 s
    trunc_std = cfg.init_std * math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))
    for name, p in model.named_parameters():
        if name in zero:
            assert torch.count_nonzero(p) == 0, name
        elif name == "wpe.weight":
            assert abs(p.std().item() - cfg.pos_init_std) < 0.03 * cfg.pos_init_std
            assert p.abs().max().item() > 3 * cfg.pos_init_std  # a plain normal, not truncated
        else:
            assert abs(p.std().item() - trunc_std) < 0.04 * trunc_std, name
            assert abs(p.mean().item()) < 0.05 * cfg.init_std, name
            bound = p.abs().max().item()
            assert 2.5 * cfg.init_std < bound <= 3 * cfg.init_std, (name, bound)
    names = {name for name, _ in model.named_parameters()}
    assert zero | {"wpe.weight", "wte.weight"} <= names and len(names) == 3 + 4 * cfg.n_layer  # wte, wpe, lm_head


def test_tied_head_is_the_embedding_and_init_weights_is_reproducible():
    torch.manual_seed(1)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.wte.weight
    assert torch.count_nonzero(model.wte.weight) == model.wte.weight.numel()
    with torch.device("meta"):
        meta = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    meta.to_empty(device="cpu")  # unties the shared weight...
    meta.init_weights()  # ...which init_weights restores
    assert meta.lm_head.weight is meta.wte.weight
    torch.manual_seed(1)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(1)
    model.init_weights()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_changing_token_t_never_changes_earlier_logits(activation):
    model = random_model(activation=activation)
    torch.manual_seed(2)
    idx = torch.randint(0, V, (2, 24))
    base = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])
    # the masked (padding-aware) path is causal too
    mask = torch.ones_like(idx)
    assert torch.allclose(model(idx, attention_mask=mask), base, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_prefill_then_decode_equals_full_forward(activation):
    model = random_model(activation=activation)
    torch.manual_seed(3)
    idx = torch.randint(0, V, (3, 20))
    full = model(idx)  # (3, 20, V)
    model.setup_kv_cache(batch_size=3, max_seq_len=32)
    with torch.no_grad():
        prefill = model(idx[:, :8], input_pos=torch.arange(8))
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(8, 20)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5)
    # a chunked prefill (two chunks) after a reset gives the same logits; last_only returns the last row
    model.reset_kv_cache()
    with torch.no_grad():
        a = model(idx[:, :5], input_pos=torch.arange(5))
        b = model(idx[:, 5:12], input_pos=torch.arange(5, 12), last_only=True)
    assert torch.allclose(a, full[:, :5], atol=1e-5)
    assert b.shape == (3, 1, V) and torch.allclose(b, full[:, 11:12], atol=1e-5)


def test_decode_to_the_last_slot_of_the_papers_4096_context_equals_full_forward():
    """At the paper's context (4096 slots), decoding the last slots (position embedding rows up to 4095) gives the
    full forward's logits at every position; one more step is refused, naming input_pos and the cache's size."""
    model = random_model(seed=8, n_layer=1, max_seq_len=4096)
    torch.manual_seed(8)
    idx = torch.randint(0, V, (1, 4096))
    model.setup_kv_cache(batch_size=1)
    with torch.no_grad():
        full = model(idx)
        prefill = model(idx[:, :4088], input_pos=torch.arange(4088))
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(4088, 4096)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert cached.shape == full.shape == (1, 4096, V)
    assert torch.allclose(cached, full, atol=1e-5)
    with pytest.raises(ValueError, match=r"input_pos slots 4096\.\.4096 must lie in \[0, 4096\)"):
        model(idx[:, :1], input_pos=torch.tensor([4096]))


def test_logits_range_computes_only_those_ids():
    """``logits_range=(lo, hi)`` returns exactly columns lo..hi-1 of the full logits, cached or not; a bad range
    names the argument."""
    model = random_model(seed=6)
    torch.manual_seed(6)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(idx)
        part = model(idx, logits_range=(5, 17))
        model.setup_kv_cache(batch_size=2, max_seq_len=16)
        model(idx[:, :8], input_pos=torch.arange(8))
        step = model(idx[:, 8:], input_pos=torch.tensor([8]), last_only=True, logits_range=(3, V))
    assert part.shape == (2, 9, 12) and torch.equal(part, full[..., 5:17])
    assert step.shape == (2, 1, V - 3) and torch.allclose(step, full[:, 8:, 3:], atol=1e-5)
    for bad in ((4, 4), (-1, 3), (0, V + 1)):
        with pytest.raises(ValueError, match="logits_range"):
            model(idx, logits_range=bad)


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_left_padded_batch_matches_each_row_unpadded(attention):
    """Prompts of lengths 5, 2 and 7 are left-padded to 7; greedy decoding 6 steps in one batch gives every row the
    logits of its own unpadded full forward, prefill and decode alike, with either masked-attention implementation."""
    model = random_model(seed=4)
    model.set_attention(attention)
    assert model.attention == attention and all(b.attn.impl == attention for b in model.blocks)
    torch.manual_seed(5)
    prompts = [torch.randint(1, V, (n,)) for n in (5, 2, 7)]
    P, N = 7, 6
    idx = torch.zeros(3, P, dtype=torch.long)  # 0 = <pad>
    mask = torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, P - len(p) :] = p
        mask[b, P - len(p) :] = 1

    # without a cache: the padding-aware full forward already equals the unpadded one per row
    padded_full = model(idx, attention_mask=mask)
    for b, p in enumerate(prompts):
        assert torch.allclose(padded_full[b, P - len(p) :], model(p[None])[0], atol=1e-5)

    model.setup_kv_cache(batch_size=3, max_seq_len=P + N)
    input_pos = torch.arange(P)
    with torch.no_grad():
        logits = model(idx, input_pos=input_pos, attention_mask=mask)  # (3, P, V)
        assert torch.isfinite(logits).all()  # padding queries attend to themselves: no NaN
        rows = [[logits[b, P - len(p) :]] for b, p in enumerate(prompts)]
        tokens = [[] for _ in prompts]
        input_pos = torch.tensor([P])
        for _ in range(N):
            tok = logits[:, -1].argmax(-1, keepdim=True)  # (3, 1)
            for b in range(3):
                tokens[b].append(tok[b, 0])
            logits = model(tok, input_pos=input_pos)  # (3, 1, V)
            input_pos += 1
            for b in range(3):
                rows[b].append(logits[b])
    for b, p in enumerate(prompts):
        seq = torch.cat([p, torch.stack(tokens[b])])[None]  # (1, len + N)
        expected = model(seq)[0]  # (len + N, V)
        assert torch.allclose(torch.cat(rows[b]), expected, atol=1e-5), b


def test_flex_attention_under_autocast_with_an_fp32_cache(monkeypatch):
    """Under bf16 autocast the queries are bf16 while an fp32 model's cache is fp32: FlexAttention gets one dtype
    (its compiled kernels require it; eager CPU would accept both) and matches SDPA."""
    import cm3leon_lightning.model.transformer as transformer

    real = transformer.flex_attention

    def one_dtype(q, k, v, **kwargs):
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(transformer, "flex_attention", one_dtype)
    model = random_model(seed=9)
    torch.manual_seed(9)
    idx = torch.randint(0, V, (2, 6))
    out = {}
    for impl in ATTENTION_IMPLS:
        model.set_attention(impl)
        model.setup_kv_cache(batch_size=2, max_seq_len=8)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx[:, :5], input_pos=torch.arange(5))
            out[impl] = model(idx[:, 5:], input_pos=torch.tensor([5])).float()
    assert model.kv_cache.dtype == torch.float32
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_a_cache_of_another_dtype_than_the_model_works_without_autocast(attention):
    """``setup_kv_cache(dtype=...)`` may differ from the model's dtype (a bf16 cache for an fp32 model); without
    autocast SDPA refused the mixed dtypes while FlexAttention cast the cache: both now read it in the query's dtype."""
    model = random_model(seed=11)
    model.set_attention(attention)
    torch.manual_seed(11)
    idx = torch.randint(0, V, (2, 6))
    model.setup_kv_cache(batch_size=2, max_seq_len=8, dtype=torch.bfloat16)
    with torch.no_grad():
        full = model(idx)
        model(idx[:, :5], input_pos=torch.arange(5))
        step = model(idx[:, 5:], input_pos=torch.tensor([5]))
    assert model.kv_cache.dtype == torch.bfloat16 and step.dtype == torch.float32
    torch.testing.assert_close(step, full[:, 5:], atol=0.05, rtol=0)  # keys and values rounded to bf16 (max 0.01)


def test_set_attention_rejects_unknown_names_and_mixed_blocks_stay_exact():
    model = random_model(seed=8)
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("flash")
    model.blocks[0].attn.impl = "flex"  # one block by hand: SDPA blocks must still get their cache mask
    assert model.attention == "mixed"
    torch.manual_seed(8)
    idx = torch.randint(0, V, (2, 6))
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    with torch.no_grad():
        full = model(idx)
        model(idx[:, :5], input_pos=torch.arange(5))
        step = model(idx[:, 5:], input_pos=torch.tensor([5]))
    assert torch.allclose(step, full[:, 5:], atol=1e-5)


def test_stale_cache_is_never_read_by_a_new_generation():
    model = random_model(seed=6)
    torch.manual_seed(7)
    first, second = torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 6))
    model.setup_kv_cache(batch_size=2, max_seq_len=16)
    with torch.no_grad():
        model(first, input_pos=torch.arange(12))  # fills slots 0..11; no reset before the next prompt
        out = model(second, input_pos=torch.arange(6))
    assert torch.allclose(out, model(second), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(8))
    results = []
    for flag in (False, True):
        model = random_model(seed=9).train()
        model.gradient_checkpointing = flag
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=0), name


def test_decode_step_compiles_into_one_graph():
    """fullgraph=True fails on any graph break (``.item()``, data-dependent Python branching, ...)."""
    torch._dynamo.reset()
    model = random_model(seed=10)
    idx = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(11))
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        model(idx[:, :5], input_pos=torch.arange(5))
        compiled = step(idx[:, 5:6], input_pos=torch.tensor([5]))
    assert torch.allclose(compiled[:, 0], model(idx)[:, 5], atol=1e-5)


def test_bad_calls_raise_clear_errors():
    model = random_model()
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="got input_pos but no KV cache"):
        model(idx, input_pos=torch.arange(4))
    with pytest.raises(ValueError, match="sequence length 300 exceeds max_seq_len 256"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx holds token ids 0\.\.512, outside \[0, 512\) \(vocab_size"):
        model(torch.tensor([[0, 512]]))
    with pytest.raises(ValueError, match=r"idx holds token ids -1\.\.3, outside \[0, 512\)"):
        model(torch.tensor([[3, -1]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(idx, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[1, 256\], got 512"):
        model.setup_kv_cache(2, 512)
    with pytest.raises(RuntimeError, match="no KV cache"):
        model.reset_kv_cache()
    model.setup_kv_cache(2, 8)
    with pytest.raises(ValueError, match=r"does not fit the KV cache \(batch_size 2, max_seq_len 8\)"):
        model(torch.zeros(3, 1, dtype=torch.long), input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"input_pos must have shape \(4,\)"):
        model(idx, input_pos=torch.arange(3))
    # a decode loop run one step past the cache, or a negative slot, names input_pos and the cache's size
    with pytest.raises(ValueError, match=r"input_pos slots 8\.\.8 must lie in \[0, 8\) \(the KV cache's max_seq_len"):
        model(idx[:, :1], input_pos=torch.tensor([8]))
    with pytest.raises(ValueError, match=r"input_pos slots -1\.\.2 must lie in \[0, 8\)"):
        model(idx, input_pos=torch.tensor([-1, 0, 1, 2]))
    with pytest.raises(ValueError, match="input_pos must be a long tensor, got torch.int32"):
        model(idx, input_pos=torch.arange(4, dtype=torch.int32))
    assert not model.kv_cache.valid.any()  # refused before anything was written
    assert "kv_cache" not in "".join(model.state_dict())  # cache buffers are never checkpointed
    model.clear_kv_cache()
    assert model.kv_cache is None


def test_param_groups_decay_matrices_only_and_count_tied_weights_once():
    model = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == len(list(model.parameters())) == 2 + 4 * 2  # wte (tied), wpe, 4 per block
    assert no_decay["params"] == []  # the paper's model has no biases or norm gains
    other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(other, 0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3)]
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,)]
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(other, -1.0)
