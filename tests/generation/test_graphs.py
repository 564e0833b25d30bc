"""Decode-step modes: what ``compile`` resolves to on each device, and clear errors for modes a device lacks.
(The CUDA modes' equality with eager is tested in test_generate.py on a GPU.)"""

import pytest
import torch

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.graphs import (
    CUDA_ONLY,
    DEFAULT_CUDA_MODE,
    FALLBACK_CUDA_MODE,
    MODES,
    TREE_MODES,
    resolve_mode,
)
from cm3leon_lightning.model import CM3Leon, fused
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def tiny(activation: str = "gelu") -> CM3Leon:
    return CM3Leon(CM3LeonConfig.from_preset("tiny", activation=activation, vocab_size=128, max_seq_len=32))


def test_resolve_mode_defaults_per_device():
    assert resolve_mode(None, CPU) == "eager" and resolve_mode(None, CUDA) == FALLBACK_CUDA_MODE  # model unknown
    assert resolve_mode(True, CPU) == "inductor" and resolve_mode(True, CUDA) == FALLBACK_CUDA_MODE
    assert resolve_mode(False, CUDA) == "eager"
    assert all(resolve_mode(m, CUDA) == m for m in MODES)
    assert {DEFAULT_CUDA_MODE, FALLBACK_CUDA_MODE} <= set(CUDA_ONLY)
    assert set(TREE_MODES) <= set(CUDA_ONLY) <= set(MODES)


@pytest.mark.parametrize("compile", [None, True])
def test_the_cuda_default_is_the_fused_step_where_the_model_allows_it(compile, monkeypatch):
    """GELU and ReLU models decode through the fused step (the fastest measured) on Ampere or newer NVIDIA GPUs;
    SwiGLU models, any model without Triton, ROCm and older GPUs through torch.compile's CUDA graphs. On a CPU
    nothing changes."""
    pytest.importorskip("triton")
    capability = {"cuda": (9, 0)}  # an H100 as far as the choice goes
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cuda"])
    assert DEFAULT_CUDA_MODE == "fused-graph" and FALLBACK_CUDA_MODE == "reduce-overhead"
    assert resolve_mode(compile, CUDA, tiny("gelu")) == "fused-graph"
    assert resolve_mode(compile, CUDA, tiny("relu")) == "fused-graph"
    assert resolve_mode(compile, CUDA, tiny("swiglu")) == "reduce-overhead"
    assert resolve_mode(compile, CPU, tiny("gelu")) == ("eager" if compile is None else "inductor")
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm: the fused kernels were only ever run on NVIDIA GPUs
    assert resolve_mode(compile, CUDA, tiny("gelu")) == "reduce-overhead"
    assert resolve_mode("fused-graph", CUDA, tiny("gelu")) == "fused-graph"  # asked for by name: allowed
    monkeypatch.setattr(torch.version, "hip", None)
    capability["cuda"] = (7, 5)  # a T4: no bfloat16 tensor cores, never run there
    assert resolve_mode(compile, CUDA, tiny("gelu")) == "reduce-overhead"
    capability["cuda"] = (8, 0)  # an A100: compiled for sm_80 in the tests
    assert resolve_mode(compile, CUDA, tiny("gelu")) == "fused-graph"
    monkeypatch.setattr(fused, "fused_available", lambda device: "the fused decode step needs Triton")
    assert resolve_mode(compile, CUDA, tiny("gelu")) == "reduce-overhead"


def test_a_fused_mode_for_a_model_it_cannot_run_is_refused_with_the_reason():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="compile='fused-graph': the fused decode step supports activations"):
        resolve_mode("fused-graph", CUDA, tiny("swiglu"))
    assert resolve_mode("fused-graph", CUDA, tiny("relu")) == "fused-graph"


@pytest.mark.parametrize("mode", CUDA_ONLY)
def test_cuda_modes_on_cpu_are_refused_by_name(mode):
    with pytest.raises(ValueError, match=f"compile={mode!r} needs a CUDA device"):
        resolve_mode(mode, CPU)
    vocab = MultimodalVocab(n_text=40, n_codes=24, grid_h=2, grid_w=3)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=vocab.padded_size, max_seq_len=32))
        generate_image(model, vocab, [[20]], compile=mode)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="compile must be None, a bool or one of"):
        resolve_mode("fast", CPU)


def test_fused_mode_on_cpu_needs_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="compile='fused': .*CUDA \\(or on CPU with TRITON_INTERPRET=1\\)"):
        resolve_mode("fused", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_mode("fused", CPU) == "fused"


def test_captured_steps_per_cache_are_capped_least_recently_used_first(monkeypatch):
    """The graph key holds the float sampling settings: a server whose clients swept ``temperature`` kept one captured
    graph (and its memory pool) per value for as long as the KV cache lived. At most MAX_GRAPHS_PER_CACHE are kept."""
    from cm3leon_lightning.generation import graphs

    made = []

    class Captured:  # a GraphedStep needs CUDA; what is kept does not depend on it
        def __init__(self, step_fn, *args):
            made.append(args)

    class Cache:
        pass

    monkeypatch.setattr(graphs, "GraphedStep", Captured)
    cache, cap = Cache(), graphs.MAX_GRAPHS_PER_CACHE
    first = graphs.graphed_step(cache, ("t", 0), None, 0)
    for t in range(1, cap):
        graphs.graphed_step(cache, ("t", t), None, t)
    assert graphs.graphed_step(cache, ("t", 0), None, 0) is first  # a hit: no new capture, now most recent
    graphs.graphed_step(cache, ("t", cap), None, cap)  # one more: the least recently used, ("t", 1), goes
    kept = list(graphs._GRAPHS[cache])
    assert len(kept) == cap and ("t", 1) not in kept and kept[-2:] == [("t", 0), ("t", cap)]
    assert len(made) == cap + 1
    graphs.graphed_step(cache, ("t", 1), None, 1)  # captured again when asked for again
    assert len(made) == cap + 2 and len(graphs._GRAPHS[cache]) == cap
