"""The persistent decode step (model/persistent.py) against the model's forward: whole steps, the counters it leaves,
the check that catches a task run before its inputs, and decoding through it. On a GPU the kernel runs natively;
without one in Triton's interpreter (float32, the programs one after another), which must be on before Triton is
first imported: test_fused_interpreter.py runs this file in a subprocess with TRITON_INTERPRET=1."""

import copy
import functools
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_fused_decode import DEVICE, GPU_TILES, random_model  # noqa: E402

from cm3leon_lightning.generation import generate_image, generate_text  # noqa: E402
from cm3leon_lightning.model import fused, persistent  # noqa: E402
from cm3leon_lightning.model.fused_launch import FusedOptions, use_fused_options  # noqa: E402
from cm3leon_lightning.model.persistent import PersistentTiles, persistent_decode_forward  # noqa: E402
from cm3leon_lightning.tokenization.vocab import MultimodalVocab  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 from the start (as test_fused_interpreter.py runs it)",
)

ODD_TILES = PersistentTiles(block_n=32, block_k=32, down_split=3, attn_splits=3, attn_block_s=16, per_sm=2)
"""32-column blocks (the 100-row head slice ends in a partial one), the down-projection's K = 256 split 96 + 96 + 64,
three runs per (row, head) (an empty one early in the cache), 16-slot cache tiles."""


def prefilled(activation: str = "gelu", lengths=(20, 11, 25), slots: int = 40):
    """A random model whose cache holds left-padded prompts of ``lengths`` (so the cache spans two 16-slot tiles
    and row 1 starts with a tile of padding)."""
    model = random_model(activation)
    B, L = len(lengths), max(lengths)
    idx = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        idx[b, L - n :] = torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n))
        mask[b, L - n :] = 1
    model.setup_kv_cache(batch_size=B, max_seq_len=slots)
    with torch.no_grad():
        logits = model(idx.to(DEVICE), input_pos=torch.arange(L, device=DEVICE), attention_mask=mask.to(DEVICE))
    return model, logits[:, -1:].argmax(-1), L


@pytest.mark.parametrize("activation,tiles", [("gelu", None), ("relu", ODD_TILES)], ids=["default", "odd-tiles"])
def test_persistent_steps_equal_the_model_forward(activation, tiles, monkeypatch):
    """Three steps from a cache of left-padded prompts (lengths 20, 11, 25), each run by the model's forward and by
    the persistent step from the same cache: equal logits over a slice of the head, equal caches and slot validity.
    After each launch every phase has counted exactly its outputs, the queue was claimed once per task plus once per
    program (the claim that found it empty), and the split counters are back at zero."""
    monkeypatch.setattr(persistent, "TILES", tiles)
    model, tok, start = prefilled(activation)
    with torch.no_grad():
        for t in range(start, start + 3):
            pos = torch.tensor([t], device=DEVICE)
            reference = copy.deepcopy(model)
            expected = reference(tok, input_pos=pos, last_only=True, logits_range=(100, 200))
            got = persistent_decode_forward(model, tok, pos, (100, 200))
            assert got.shape == (3, 1, 100)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            for i in range(model.config.n_layer):
                for mine, theirs in zip(model.kv_cache.layer(i), reference.kv_cache.layer(i)):
                    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
            assert torch.equal(model.kv_cache.valid, reference.kv_cache.valid)
            step = persistent.persistent_step(model, (100, 200))
            sync = step.sync.cpu()
            assert sync[1 : 1 + step.n_phases].tolist() == [p.outputs for p in step.phases]
            assert int(sync[0]) == step.n_tasks + min(step.programs, step.n_tasks)
            assert not sync[1 + step.n_phases :].any()
            tok = got[:, -1].argmax(-1, keepdim=True) + 100
    assert step.constants["ATTN_SPLITS"] == (tiles.attn_splits if tiles else 2)


@pytest.mark.skipif(CUDA, reason="the check of the interpreter, where the programs run one after another")
def test_a_task_run_before_its_inputs_is_caught():
    """Swap the last QKV task of block 0 with the first attention task: the attention then runs before the phase it
    reads has finished, which the interpreter's check must refuse (the check can fail)."""
    model, tok, start = prefilled()
    step = persistent.persistent_step(model, (0, 64))
    table = step.tasks.tolist()
    first = [row[0] for row in table].index(persistent.ATTN)
    table[first - 1], table[first] = table[first], table[first - 1]
    step.tasks.copy_(torch.tensor(table))
    with pytest.raises(RuntimeError, match="1 tasks ran before the phase they read had finished"):
        step(tok, torch.tensor([start], device=DEVICE))


def test_a_failed_wait_is_reported_once_by_the_decoder(monkeypatch):
    """The decoder checks the persistent steps' failed waits once at the end of a generation (the GPU's timed-out
    waits; here a count set by hand, as the kernel would leave it): the generation raises, naming the count, and the
    count starts again from zero."""
    vocab = MultimodalVocab(n_text=40, n_codes=24, grid_h=1, grid_w=2)
    model = random_model(vocab_size=vocab.padded_size)
    real = persistent.PersistentStep.__call__

    def failing(self, idx, input_pos):
        logits = real(self, idx, input_pos)
        self.errors.fill_(2)  # after the launch's own check, as a GPU launch leaves it
        return logits

    monkeypatch.setattr(persistent.PersistentStep, "__call__", failing)
    with use_fused_options(FusedOptions(persistent=True)):
        with pytest.raises(RuntimeError, match="persistent decode step: 2 "):
            generate_image(model, vocab, [[20, 21]], compile="fused", method="greedy")
    assert all(not step.errors.any() for step in persistent._STEPS[model.kv_cache].values())
    monkeypatch.setattr(persistent.PersistentStep, "__call__", real)
    with use_fused_options(FusedOptions(persistent=True)):
        generate_image(model, vocab, [[20, 21]], compile="fused", method="greedy")  # counted from zero again


def test_the_benchmark_fails_a_tiling_whose_waits_gave_up_while_timed(monkeypatch):
    """benchmarks/persistent_step.py reads the failed-wait counter after checking a tiling and again after timing it:
    a wait that gave up while timed (after which every later wait gives up at once, so wrong steps would time as
    fast ones) fails the tiling instead of giving it a time. The timed launches here leave the counter raised, as
    a GPU's would."""
    if CUDA:
        monkeypatch.setattr(fused, "FIXED_TILES", GPU_TILES)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    import persistent_step as bench

    model, tok, start = prefilled()
    span = (100, 200)
    step = functools.partial(fused.fused_decode_forward, model, tok, torch.tensor([start], device=DEVICE), span)
    with torch.no_grad():
        with use_fused_options(FusedOptions()):
            expected = step().float()
        with use_fused_options(FusedOptions(persistent=True)):
            ms, programs, diff = bench.time_tiling(step, expected, model, span, DEVICE, 1)
            plan = persistent.persistent_step(model, span)
            assert ms > 0 and programs == plan.programs and diff < 1e-4

            def gave_up(fn, device, steps):
                fn()
                plan.errors.fill_(1)
                return 1e-3

            monkeypatch.setattr(bench, "replay_ms", gave_up)
            with pytest.raises(RuntimeError, match="persistent decode step: 1 "):
                bench.time_tiling(step, expected, model, span, DEVICE, 1)
            assert not plan.errors.any()


def test_persistent_step_keeps_float32_partial_sums_whatever_the_default_dtype():
    """The down-projection's split-K and the attention runs' workspaces were allocated in torch's default dtype:
    planned under ``torch.set_default_dtype(torch.float16)``, a float32 model's step lost ~1e-2 to half-precision
    partial sums."""
    model, tok, start = prefilled()  # 25 slots: two 16-slot tiles, the interpreter's two runs per (row, head)
    pos = torch.tensor([start], device=DEVICE)
    with torch.no_grad():
        expected = copy.deepcopy(model)(tok, input_pos=pos, last_only=True, logits_range=(100, 200))
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            got = persistent_decode_forward(model, tok, pos, (100, 200))
            plan = persistent.persistent_step(model, (100, 200))
        finally:
            torch.set_default_dtype(before)
    assert plan.part.dtype == plan.attn_part.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_persistent_step_refuses_a_range_outside_the_vocabulary():
    """``hi`` past the vocabulary (512) used to be planned as that many head rows and read past the head's weight
    (garbage logits, out of bounds on a GPU)."""
    model, tok, start = prefilled()
    with pytest.raises(ValueError, match=r"logits_range \(500, 600\) must satisfy 0 <= lo < hi <= vocab_size 512"):
        persistent_decode_forward(model, tok, torch.tensor([start], device=DEVICE), (500, 600))


def test_one_plan_per_cache_and_range_replanned_when_the_weights_move():
    model, tok, start = prefilled()
    first = persistent.persistent_step(model, (0, 64))
    assert persistent.persistent_step(model, (0, 64)) is first
    assert persistent.persistent_step(model, (0, 32)) is not first
    with torch.no_grad():
        model.blocks[1].mlp.fc_out.weight.data = model.blocks[1].mlp.fc_out.weight.data.clone()  # a new address
    assert persistent.persistent_step(model, (0, 64)) is not first


def test_the_fused_step_runs_persistent_when_asked_and_one_kernel_at_a_time_past_63_rows(monkeypatch):
    if CUDA:  # the kernels one by one with fixed tiles (autotuning each small shape takes minutes)
        monkeypatch.setattr(fused, "FIXED_TILES", GPU_TILES)
    model, tok, start = prefilled(lengths=(4, 2))
    calls = []
    real = persistent.persistent_decode_forward
    monkeypatch.setattr(persistent, "persistent_decode_forward", lambda *a: calls.append(a) or real(*a))
    pos = torch.tensor([start], device=DEVICE)
    with torch.no_grad(), use_fused_options(FusedOptions(persistent=True)):
        expected = copy.deepcopy(model)(tok, input_pos=pos, last_only=True, logits_range=(0, 50))
        torch.testing.assert_close(fused.fused_decode_forward(model, tok, pos, (0, 50)), expected, atol=1e-4, rtol=0)
        assert len(calls) == 1
        monkeypatch.setattr(persistent, "MAX_ROWS", 1)  # 2 rows are now too many: the five kernels per block
        torch.testing.assert_close(fused.fused_decode_forward(model, tok, pos, (0, 50)), expected, atol=1e-4, rtol=0)
        assert len(calls) == 1
        with pytest.raises(ValueError, match="at most 1 rows"):
            persistent_decode_forward(model, tok, pos, (0, 50))


@pytest.mark.parametrize("mode", ["fused", "fused-graph"] if CUDA else ["fused"])
def test_persistent_decoding_gives_the_eager_tokens(mode):
    """generate_image (CFG, two prompts of different lengths, two candidates; greedy and top-p) and generate_text
    in the ``fused`` mode with the persistent step (on a GPU also ``fused-graph``: the launch captured in a CUDA graph
    and replayed at every step): the eager mode's tokens."""
    vocab = MultimodalVocab(n_text=40, n_codes=24, grid_h=2, grid_w=3)
    model = random_model(vocab_size=vocab.padded_size)
    prompts = [[20, 21, 22], [23]]
    for sampling in (dict(method="greedy"), dict(method="top_p", top_p=0.8, seed=3)):
        kwargs = dict(num_samples=2, cfg=3.0, **sampling)
        eager = generate_image(model, vocab, prompts, compile="eager", **kwargs).codes
        with use_fused_options(FusedOptions(persistent=True)):
            assert torch.equal(generate_image(model, vocab, prompts, compile=mode, **kwargs).codes, eager)
    text = dict(max_new_tokens=4, method="greedy")
    with use_fused_options(FusedOptions(persistent=True)):
        persistent_text = generate_text(model, vocab, eager[:, 0], compile=mode, **text)
    assert persistent_text == generate_text(model, vocab, eager[:, 0], compile="eager", **text)
