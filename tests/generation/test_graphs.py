"""Decode-step modes: what ``compile`` resolves to on each device, and clear errors for modes a device lacks.
(The CUDA modes' equality with eager is tested in test_generate.py on a GPU.)"""

import pytest
import torch

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.graphs import CUDA_ONLY, DEFAULT_CUDA_MODE, MODES, TREE_MODES, resolve_mode
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_resolve_mode_defaults_per_device():
    assert resolve_mode(None, CPU) == "eager" and resolve_mode(None, CUDA) == DEFAULT_CUDA_MODE
    assert resolve_mode(True, CPU) == "inductor" and resolve_mode(True, CUDA) == DEFAULT_CUDA_MODE
    assert resolve_mode(False, CUDA) == "eager"
    assert all(resolve_mode(m, CUDA) == m for m in MODES)
    assert DEFAULT_CUDA_MODE in MODES and set(TREE_MODES) <= set(CUDA_ONLY) <= set(MODES)


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
