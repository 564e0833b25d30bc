"""The fused decode step (model/fused.py): every kernel flag against torch, and whole decode steps against the
model's forward. On a GPU the kernels run natively; without one, in Triton's interpreter (float32), which must be
switched on before Triton is first imported: test_fused_interpreter.py runs this file in a subprocess with
TRITON_INTERPRET=1."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from cm3leon_lightning.config import CM3LeonConfig  # noqa: E402
from cm3leon_lightning.generation import generate_image, generate_text, infill  # noqa: E402
from cm3leon_lightning.model import CM3Leon, fused  # noqa: E402
from cm3leon_lightning.model.fused import (  # noqa: E402
    decode_attention,
    decode_embed,
    decode_linear,
    fused_decode_forward,
)
from cm3leon_lightning.model.fused_kernels import attention_block_s, line_share  # noqa: E402
from cm3leon_lightning.model.fused_launch import FusedOptions, use_fused_options  # noqa: E402
from cm3leon_lightning.model.kv_cache import padding_causal_mask, positions_from_valid  # noqa: E402
from cm3leon_lightning.tokenization.vocab import MultimodalVocab  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 from the start (as test_fused_interpreter.py runs it)",
)


GPU_TILES = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}
"""The linear kernel's tiles in these tests on a GPU (split-K, so whole steps and CUDA graph replays exercise it):
autotuning every small shape and flag combination here took minutes. Autotuning itself is tested by the fused-graph
cases of tests/generation/test_generate.py and the unsplit case of test_decode_linear_flags_match_torch."""


@pytest.fixture(autouse=True)
def fixed_tiles_on_gpu(monkeypatch):
    if CUDA:
        monkeypatch.setattr(fused, "FIXED_TILES", GPU_TILES)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("norm,act,residual", [(False, 0, False), (True, 0, False), (True, 1, False), (False, 2, True),
                                               (False, 0, True), (True, 2, True)])  # fmt: skip
@pytest.mark.parametrize("prefetch,split", [(True, 1), (False, 1), (True, 2), (False, 3)])
def test_decode_linear_flags_match_torch(norm, act, residual, prefetch, split, monkeypatch):
    """3 rows, K=48 and N=40 (neither a multiple of the tile sizes): LayerNorm prologue, GELU/ReLU, residual; with
    the first weight tile loaded ahead (then one partial tile in the loop) or all tiles in the loop; K whole, split
    in two (32 + 16) or in three (32 + 16 + an empty split). Split-K leaves its counters at zero."""
    tiles = {**fused.INTERPRETER_TILES, "PREFETCH": prefetch, "SPLIT_K": split}
    autotuned = CUDA and split == 1 and not prefetch  # on a GPU one case goes through the autotuner instead
    monkeypatch.setattr(fused, "FIXED_TILES", None if autotuned else tiles)
    x, w, res = rand(3, 48, seed=1) * 2 + 0.5, rand(40, 48, seed=2) * 0.2, rand(3, 40, seed=3)
    got = decode_linear(x, w, norm_eps=1e-5 if norm else None, act=act, residual=res if residual else None)
    h = F.linear(F.layer_norm(x, (48,), eps=1e-5) if norm else x, w)
    h = {0: h, 1: F.gelu(h), 2: F.relu(h)}[act]
    torch.testing.assert_close(got, h + res if residual else h, atol=1e-5, rtol=1e-5)
    assert not fused.split_counters(x.device).any()


@pytest.mark.parametrize("split", [1, 2])
def test_layernorm_prologue_for_a_full_tile_of_rows_and_an_offset_residual_stream(split, monkeypatch):
    """16 rows (the one-pass LayerNorm's row of ones then needs a 32-row tile) of a residual stream whose mean (20)
    dwarfs its spread (1): ``rstd * (x @ W^T - mean * rowsum(W))`` must not lose the result to cancellation."""
    monkeypatch.setattr(fused, "FIXED_TILES", {**fused.INTERPRETER_TILES, "SPLIT_K": split} if not CUDA else None)
    x, w = rand(16, 48, seed=12) + 20.0, rand(40, 48, seed=13) * 0.2
    got = decode_linear(x, w, norm_eps=1e-5, act=1)
    expected = F.gelu(F.linear(F.layer_norm(x, (48,), eps=1e-5), w))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "norm,act,residual,cache", [(True, 0, False, True), (False, 0, True, False), (True, 1, False, False)]
)
def test_more_rows_than_a_tile_holds_give_the_kernels_results(norm, act, residual, cache):
    """70 rows (a 128-row tile with LayerNorm, beyond MAX_ROW_TILE) go through cuBLAS: the same results, and the same
    cache writes, as the kernel gives the first 5 rows."""
    R, H, D, S, slot = 70, 2, 8, 10, 6
    C = H * D
    x, res = rand(R, C, seed=14) * 2 + 0.5, rand(R, 3 * C if cache else C, seed=15)
    w = rand(3 * C if cache else C, C, seed=16) * 0.2
    pos = torch.tensor([slot], device=DEVICE)
    outs, caches = [], []
    for rows in (R, 5):
        kv = torch.zeros(2, rows, H, S, D, device=DEVICE)
        kwargs = dict(norm_eps=1e-5 if norm else None, act=act, residual=res[:rows] if residual else None,
                      cache=(kv[0], kv[1], pos) if cache else None)  # fmt: skip
        outs.append(decode_linear(x[:rows], w, **kwargs))
        caches.append(kv)
    assert fused.MAX_ROW_TILE == 64 and outs[0].shape == (R, C)
    torch.testing.assert_close(outs[0][:5], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0][:, :5], caches[1], atol=1e-5, rtol=1e-5)
    assert caches[0][:, :, :, slot].abs().sum() > 0 if cache else not caches[0].any()


@pytest.mark.skipif(not CUDA, reason="the autotuning configurations, native on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tuning_configuration_matches_torch_when_replayed_in_a_cuda_graph(dtype, monkeypatch):
    """The down-projection shape of 350m with 16 rows (64 programs of 16 columns, K = 4096), launched under each
    configuration the autotuner may pick (bf16; one split configuration in float32), captured in a CUDA graph and
    replayed five times with new inputs: every replay equals torch (split-K's hand-off between programs and its
    counter reset are real here, not in the interpreter)."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    R, N, K = 16, 1024, 4096
    w = rand(N, K, seed=11).to(dtype) * 0.02
    x, res = torch.zeros(R, K, device=DEVICE, dtype=dtype), torch.zeros(R, N, device=DEVICE, dtype=dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    configs = [c.kwargs for c in fk.PDL_CONFIGS] if dtype == torch.bfloat16 else [GPU_TILES]  # ~1 s compile each
    for config in configs:
        monkeypatch.setattr(fused, "FIXED_TILES", config)
        decode_linear(x, w, residual=res)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_linear(x, w, residual=res)
        for seed in range(5):
            x.copy_(rand(R, K, seed=20 + seed))
            res.copy_(rand(R, N, seed=30 + seed))
            graph.replay()
            expected = (F.linear(x.float(), w.float()) + res.float()).to(dtype)
            torch.testing.assert_close(out, expected, **tol, msg=lambda m, c=config: f"{c}: {m}")
        assert not fused.split_counters(x.device).any(), config


@pytest.fixture
def half_default_dtype():
    """torch's default dtype float16 (as set by code that builds models in half precision) for one test."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    yield
    torch.set_default_dtype(before)


def test_split_partial_sums_stay_float32_whatever_the_default_dtype(half_default_dtype, monkeypatch):
    """The split kernels' workspaces (split-K's partial sums; the attention runs' max, sum and output) were allocated
    in torch's default dtype: under ``torch.set_default_dtype(torch.float16)`` (or bfloat16) the partial sums were
    rounded to half precision before being combined, errors of 1e-2 on float32 inputs."""
    monkeypatch.setattr(fused, "FIXED_TILES", {**fused.INTERPRETER_TILES, "SPLIT_K": 2})
    x, w = rand(3, 64, seed=40).float() * 3, rand(40, 64, seed=41).float()
    torch.testing.assert_close(decode_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-5)
    B, H, S, D, slot = 2, 2, 300, 16, 290  # three 128-slot tiles: three runs to combine
    k, v = rand(B, H, S, D, seed=42).float() * 3, rand(B, H, S, D, seed=43).float()
    q, valid = rand(B, H * D, seed=44).float() * 3, torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    pos = torch.tensor([slot], device=DEVICE)
    q4 = q.view(B, 1, H, D).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q4, k, v, attn_mask=padding_causal_mask(valid, pos))
    got = decode_attention(q, k, v, valid, pos, splits=3)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(B, H * D), atol=1e-5, rtol=1e-5)


def test_a_weight_whose_rows_are_not_contiguous_is_refused():
    """The kernel reads row ``n`` of the weight at ``n * K``: a column slice of a wider matrix (row stride 64 for
    K = 48) used to be multiplied as if its rows were packed, silently wrong."""
    x, wide = rand(3, 48, seed=45), rand(40, 64, seed=46)
    with pytest.raises(ValueError, match="rows of 48 contiguous values; strides \\(64, 1\\)"):
        decode_linear(x, wide[:, :48])
    torch.testing.assert_close(decode_linear(x, wide[:, :48].contiguous()), x @ wide[:, :48].T, atol=1e-5, rtol=1e-5)


def test_decode_linear_writes_keys_and_values_into_the_cache_slot():
    R, H, D, S, slot = 3, 4, 8, 10, 6
    C = H * D
    x, w = rand(R, C, seed=4), rand(3 * C, C, seed=5) * 0.2
    k_cache, v_cache = torch.zeros(2, R, H, S, D, device=DEVICE)
    q = decode_linear(x, w, norm_eps=1e-5, cache=(k_cache, v_cache, torch.tensor([slot], device=DEVICE)))
    qkv = F.linear(F.layer_norm(x, (C,), eps=1e-5), w)  # (R, 3C)
    torch.testing.assert_close(q, qkv[:, :C], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :, slot], qkv[:, C : 2 * C].view(R, H, D), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[:, :, slot], qkv[:, 2 * C :].view(R, H, D), atol=1e-5, rtol=1e-5)
    others = [s for s in range(S) if s != slot]
    assert not k_cache[:, :, others].any() and not v_cache[:, :, others].any()
    with pytest.raises(ValueError, match="do not fit a QKV weight"):
        decode_linear(x, w[:-1], cache=(k_cache, v_cache, torch.tensor([slot], device=DEVICE)))  # 3C - 1 rows
    with pytest.raises(ValueError, match="do not fit a QKV weight"):
        decode_linear(x, w, cache=(k_cache[:2], v_cache[:2], torch.tensor([slot], device=DEVICE)))  # 2 of 3 rows
    # 2 of the 4 heads (strides of 4): the keys of heads 2 and 3 used to be written, silently, into the other heads
    with pytest.raises(ValueError, match="do not fit a QKV weight"):
        decode_linear(x, w, cache=(k_cache[:, :2], v_cache[:, :2], torch.tensor([slot], device=DEVICE)))
    assert not k_cache[:, :, others].any() and not v_cache[:, :, others].any()


@pytest.mark.parametrize("slot", [0, 63, 127, 128, 149])
@pytest.mark.parametrize("splits", [None, 2, 3])
def test_decode_attention_equals_sdpa_and_reads_only_written_slots(slot, splits):
    """Three rows over 150 slots (head_dim 24, padded to 32 in the kernel, so 128-slot tiles): row 0 all valid, row 1
    left-padded over 140 slots (a whole tile of padding before its tokens), row 2 with a hole. Slots after ``slot``
    hold NaN, which the kernel must never load; it equals SDPA with ``padding_causal_mask`` on the clean cache. The
    filled slots in one run (the default; with CM3LEON_FUSED_SPLITS=1 on a GPU 12 pairs are split 8 ways), or split
    over programs combined by the last: 2 runs (one of padding only in row 1 at slot 149), 3 (empty runs)."""
    B, H, S, D = 3, 4, 150, 24
    assert attention_block_s(32, 4) == 128  # the tiles the docstring assumes
    k, v, q = rand(B, H, S, D, seed=6), rand(B, H, S, D, seed=7), rand(B, H * D, seed=8)
    valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    valid[1, :140] = False
    valid[2, 5:9] = False
    pos = torch.tensor([slot], device=DEVICE)
    q4 = q.view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
    expected = F.scaled_dot_product_attention(q4, k, v, attn_mask=padding_causal_mask(valid, pos))
    k_dirty, v_dirty = k.clone(), v.clone()
    k_dirty[:, :, slot + 1 :] = float("nan")
    v_dirty[:, :, slot + 1 :] = float("nan")
    got = decode_attention(q, k_dirty, v_dirty, valid, pos, splits=splits)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(B, H * D), atol=1e-5, rtol=1e-5)
    assert not fused.split_counters(q.device).any()
    if slot >= 140:  # row 1 sees slots 140..slot only: changing a padding slot changes nothing
        k_dirty[1, :, 3] += 5.0
        torch.testing.assert_close(decode_attention(q, k_dirty, v_dirty, valid, pos, splits=splits)[1], got[1])
    with pytest.raises(ValueError, match="do not fit the cache"):
        decode_attention(q[:, :-1], k, v, valid, pos)
    with pytest.raises(ValueError, match="do not fit the cache"):
        decode_attention(q, k, v[:2], valid, pos)
    with pytest.raises(ValueError, match="splits must be at least 1"):
        decode_attention(q, k, v, valid, pos, splits=0)


@pytest.mark.parametrize("slot", [0, 5, 300])
def test_decode_embed_marks_the_slot_and_adds_the_position_of_the_token(slot):
    """Three rows over 320 slots (two counting tiles): row 1 left-padded, row 2 with holes. The slot becomes valid in
    every row, nothing else changes, and each row gets its token's embedding plus that of its position."""
    B, S, C = 3, 320, 40  # C not a multiple of the kernel's 256-wide tiles
    valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    valid[1, :260] = False
    valid[2, 2:4] = valid[2, 290:295] = False
    valid[:, slot:] = False  # as in a cache that has not reached this slot yet
    before = valid.clone()
    wte, wpe = rand(50, C, seed=9), rand(S, C, seed=10)
    idx = torch.tensor([[3], [49], [0]], device=DEVICE)
    pos = torch.tensor([slot], device=DEVICE)
    x = decode_embed(idx, wte, wpe, valid, pos)
    before[:, slot] = True
    assert torch.equal(valid, before)
    positions = positions_from_valid(valid, pos)  # (B, 1)
    assert torch.equal(x, wte[idx[:, 0]] + wpe[positions[:, 0]])
    column = torch.tensor([[7, 3], [8, 49], [9, 0]], device=DEVICE)[:, 1:]  # the last column of prompts: strided
    assert torch.equal(decode_embed(column, wte, wpe, valid, pos), x)
    with pytest.raises(ValueError, match="do not fit"):
        decode_embed(idx[:2], wte, wpe, valid, pos)  # 2 tokens, 3 rows
    with pytest.raises(ValueError, match="do not fit"):
        decode_embed(idx, wte, wpe[:, :-1], valid, pos)


def random_model(activation: str = "gelu", vocab_size: int = 512) -> CM3Leon:
    """Every weight random: the paper's init zeroes the output layers, which would hide errors in blocks."""
    torch.manual_seed(0)
    config = CM3LeonConfig.from_preset("tiny", activation=activation, vocab_size=vocab_size, max_seq_len=64)
    model = CM3Leon(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.to(DEVICE)


ALL_ON = "pdl+splits+prefetch"


@pytest.mark.parametrize(
    "activation,attention,options",
    [("gelu", "sdpa", "base"), ("gelu", "flex", "base"), ("relu", "sdpa", "base"), ("gelu", "sdpa", ALL_ON)],
)
def test_fused_steps_equal_the_model_forward_for_left_padded_rows(activation, attention, options):
    """Prompts of lengths 5, 2 and 7, left-padded and prefilled; then three decode steps, each run by the model's
    forward and by the fused step from the same cache: equal logits over a slice of the head, equal caches. With every
    launch option on (on a GPU: PDL, split attention, the next weights prefetched; the interpreter runs none of them)
    too."""
    with use_fused_options(FusedOptions.parse(options)):
        fused_steps_equal_the_model_forward(activation, attention)


def fused_steps_equal_the_model_forward(activation, attention):
    model = random_model(activation)
    model.set_attention(attention)
    prompts = [torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 2, 7)]
    idx = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, 7 - len(p) :], mask[b, 7 - len(p) :] = p, 1
    model.setup_kv_cache(batch_size=3, max_seq_len=16)
    with torch.no_grad():
        logits = model(idx.to(DEVICE), input_pos=torch.arange(7, device=DEVICE), attention_mask=mask.to(DEVICE))
        tok = logits[:, -1:].argmax(-1)  # (3, 1)
        for t in range(7, 10):
            pos = torch.tensor([t], device=DEVICE)
            reference = copy.deepcopy(model)  # the same cache, stepped by the plain forward
            expected = reference(tok, input_pos=pos, last_only=True, logits_range=(100, 260))
            got = fused_decode_forward(model, tok, pos, (100, 260))
            assert got.shape == (3, 1, 160)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            for i in range(model.config.n_layer):
                for mine, theirs in zip(model.kv_cache.layer(i), reference.kv_cache.layer(i)):
                    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
            assert torch.equal(model.kv_cache.valid, reference.kv_cache.valid)
            tok = got[:, -1].argmax(-1, keepdim=True) + 100


@pytest.mark.skipif(not CUDA, reason="bfloat16 kernels: the interpreter computes in float32 only")
@pytest.mark.parametrize("options", ["base", ALL_ON])
def test_bf16_steps_stay_close_to_the_model_forward(options):
    with use_fused_options(FusedOptions.parse(options)):
        bf16_steps_stay_close_to_the_model_forward()


def bf16_steps_stay_close_to_the_model_forward():
    model = random_model().to(torch.bfloat16)
    model.setup_kv_cache(batch_size=4, max_seq_len=16)
    idx = torch.randint(1, 512, (4, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        model(idx, input_pos=torch.arange(6, device=DEVICE))
        tok, pos = idx[:, -1:], torch.tensor([6], device=DEVICE)
        expected = copy.deepcopy(model)(tok, input_pos=pos, last_only=True, logits_range=(0, 512)).float()
        got = fused_decode_forward(model, tok, pos, (0, 512)).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_fused_mode_decodes_the_eager_tokens():
    """generate_image (CFG, two prompts of different lengths, two candidates; greedy, top-p and CD-K), generate_text
    and infill (greedy): the ``fused`` decode mode produces the eager mode's tokens."""
    vocab = MultimodalVocab(n_text=40, n_codes=24, grid_h=2, grid_w=3)
    model = random_model(vocab_size=vocab.padded_size)
    prompts = [[20, 21, 22], [23]]
    kwargs = dict(num_samples=2, method="greedy", cfg=3.0)
    eager = generate_image(model, vocab, prompts, compile="eager", **kwargs).codes
    fused = generate_image(model, vocab, prompts, compile="fused", **kwargs).codes
    assert torch.equal(fused, eager)
    for method in ("top_p", "cd_k"):  # sampled through the sampling kernel, and through pick_tokens (CD-K)
        sampled = dict(num_samples=2, method=method, cfg=3.0, top_p=0.8, seed=3)
        expected = generate_image(model, vocab, prompts, compile="eager", **sampled).codes
        assert torch.equal(generate_image(model, vocab, prompts, compile="fused", **sampled).codes, expected)
    text = dict(max_new_tokens=5, method="greedy")
    assert generate_text(model, vocab, eager[:, 0], compile="fused", **text) == generate_text(
        model, vocab, eager[:, 0], compile="eager", **text
    )
    # infilling: a text span, then (after forced tokens through the plain forward) an image span
    body = [vocab.eos_id, 20, vocab.sentinel_id(0), 22, vocab.break_id, 40, 41, vocab.sentinel_id(1), 45]
    assert infill(model, vocab, body, compile="fused").spans == infill(model, vocab, body, compile="eager").spans


def test_each_kernel_is_given_what_the_next_one_reads_to_prefetch(monkeypatch):
    """The prefetch chain of a step: QKV -> out-projection -> up -> down -> next block's QKV ... -> the head's rows
    of the sampled range -> the first block's QKV (for the next step), each handed to the linear launch before; and
    each layer's attention is handed the next layer's cache (the last layer's: the first's, for the next step)."""
    model = random_model()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    calls, caches, real, real_attention = [], [], fused.decode_linear, fused.decode_attention

    def recording(x, w, **kw):
        calls.append((w, kw["prefetch"]))
        return real(x, w, **kw)

    def recording_attention(q, k, v, valid, pos, **kw):
        caches.append((k, kw["prefetch"]))
        return real_attention(q, k, v, valid, pos, **kw)

    monkeypatch.setattr(fused, "decode_linear", recording)
    monkeypatch.setattr(fused, "decode_attention", recording_attention)
    with torch.no_grad():
        fused_decode_forward(
            model, torch.ones(2, 1, dtype=torch.long, device=DEVICE), torch.tensor([0], device=DEVICE), (100, 260)
        )
    weights = [w for w, _ in calls]
    b0 = model.blocks[0]
    assert len(calls) == 4 * model.config.n_layer + 1
    assert weights[:4] == [b0.attn.qkv.weight, b0.attn.out_proj.weight, b0.mlp.fc_in.weight, b0.mlp.fc_out.weight]
    head = weights[-1]
    assert head.shape == (160, model.config.d_model) and head.data_ptr() == model.lm_head.weight[100].data_ptr()
    assert all(p is w for (_, p), w in zip(calls, weights[1:] + weights[:1]))
    layers = [model.kv_cache.layer(i) for i in range(model.config.n_layer)]
    assert [k for k, _ in caches] == [k for k, _ in layers]
    assert [p for _, p in caches] == layers[1:] + layers[:1]


@triton.jit
def shares_kernel(out_ptr, lines):
    part = tl.program_id(0)
    lo, hi = line_share(lines, part, tl.num_programs(0))
    tl.store(out_ptr + 2 * part, lo)
    tl.store(out_ptr + 2 * part + 1, hi)


@pytest.mark.parametrize("lines,parts", [(1000, 7), (5, 8), (131072, 64), (0, 3), (256, 1)])
def test_prefetch_shares_cover_every_line_once(lines, parts):
    """The programs of a kernel split the next weights' lines between them: every line asked for once, none past
    the end (some programs get none when there are more programs than lines)."""
    out = torch.zeros(2 * parts, dtype=torch.int32, device=DEVICE)
    shares_kernel[(parts,)](out, lines)
    asked = [line for lo, hi in out.view(parts, 2).tolist() for line in range(lo, hi)]
    assert asked == list(range(lines))


@pytest.mark.parametrize("logits_range", [(500, 600), (5, 5), (-1, 10)])
def test_a_sampled_range_outside_the_vocabulary_is_refused_as_the_forward_refuses_it(logits_range):
    """The head's rows ``[lo, hi)`` past the vocabulary (512) used to end in a reshape error (or, with the persistent
    step, in reading past the head's weight), an empty range in empty logits."""
    model = random_model()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    one, pos = torch.ones(2, 1, dtype=torch.long, device=DEVICE), torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match=r"logits_range .* must satisfy 0 <= lo < hi <= vocab_size 512"):
        fused_decode_forward(model, one, pos, logits_range)
    with pytest.raises(ValueError, match=r"logits_range .* must satisfy 0 <= lo < hi <= vocab_size 512"):
        model(one, input_pos=pos, logits_range=logits_range)
    assert not model.kv_cache.valid.any()  # refused before anything was written


@pytest.mark.parametrize("persistent", [False, True], ids=["fused", "persistent"])
def test_step_inputs_the_forward_refuses_are_refused_before_anything_is_written(persistent):
    """An int32 or float ``input_pos`` (refused by the model's forward; a float one failed deep in Triton), a slot
    past the cache (on the CPU, where it costs no sync: the kernels wrote keys, values and validity into other rows'
    memory and corrupted the interpreter's heap), a wrong ``input_pos`` shape (the message blamed ``idx``)."""
    from cm3leon_lightning.model.persistent import persistent_decode_forward

    step = persistent_decode_forward if persistent else fused_decode_forward
    name = step.__name__
    model = random_model()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    one = torch.ones(2, 1, dtype=torch.long, device=DEVICE)
    cases = [
        (torch.tensor([3], dtype=torch.int32), "input_pos must be a long tensor, got torch.int32"),
        (torch.tensor([3.0]), "input_pos must be a long tensor, got torch.float32"),
        (torch.tensor([3, 4]), r"idx \(2, 1\) must be \(2, 1\) and input_pos \(2,\) must be \(1,\)"),
    ]
    if not CUDA:  # read on the device without a sync on a GPU
        cases += [(torch.tensor([8]), r"input_pos slot 8 must lie in \[0, 8\)"), (torch.tensor([-1]), "slot -1")]
    for pos, message in cases:
        with pytest.raises(ValueError, match=f"{name}.*{message}"):
            step(model, one, pos.to(DEVICE), (0, 10))
    assert not model.kv_cache.valid.any() and not any(b.any() for b in model.kv_cache.buffers())
    assert step(model, one, torch.tensor([7], device=DEVICE), (0, 10)).shape == (2, 1, 10)  # the last slot


def test_swiglu_models_and_wrong_shapes_are_refused():
    model = random_model("swiglu")
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    one = torch.ones(2, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="supports activations"):
        fused_decode_forward(model, one, torch.tensor([0], device=DEVICE), (0, 10))
    model = random_model()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    with pytest.raises(ValueError, match="one token per cache row"):
        fused_decode_forward(model, torch.ones(2, 2, dtype=torch.long, device=DEVICE), torch.arange(2), (0, 10))
