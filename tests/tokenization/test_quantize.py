"""Tests for the vector quantizer's dead-code restarts around loading a state dict."""

from __future__ import annotations

import pytest
import torch

from cm3leon_lightning.tokenization.quantize import VectorQuantizer


def test_loading_a_state_dict_drops_the_restarts_chosen_for_the_old_codebook() -> None:
    """A training forward picks dead codes to restart at the next forward. Loading saved weights before that forward
    (e.g. the best checkpoint after training) kept them pending, so the next lookup or encode overwrote 6 of the 8
    loaded codes with latents of the last training batch."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, dead_code_after=1, ema_decay=0.9)
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    q.train()
    q(torch.randn(1, 2, 1, 2))  # two latents: at least 6 codes unused, picked for restart
    assert q._pending_restart[0].tolist() == [0, 2, 3, 4, 6, 7]
    q.load_state_dict(saved)
    q.eval()
    codes = torch.arange(8).view(1, 2, 4)
    assert torch.equal(q.lookup(codes), saved["embedding.weight"].view(2, 4, 2).permute(2, 0, 1)[None])
    assert all(torch.equal(v, saved[k]) for k, v in q.state_dict().items())


def test_loading_other_weights_of_a_parent_keeps_the_pending_restart() -> None:
    """A state dict without the codebook (``strict=False``, other modules' weights) leaves the restarts pending."""
    torch.manual_seed(0)
    parent = torch.nn.ModuleDict({"q": VectorQuantizer(8, 2, dead_code_after=1), "lin": torch.nn.Linear(2, 2)})
    parent.train()
    parent["q"](torch.randn(1, 2, 1, 2))
    dead, picks = parent["q"]._pending_restart
    parent.load_state_dict({"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}, strict=False)
    parent["q"].lookup(torch.zeros(1, 1, 1, dtype=torch.long))
    assert dead.numel() == 6 and torch.equal(parent["q"].embedding.weight[dead], picks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move the quantizer across devices")
def test_restart_chosen_on_one_device_is_written_after_moving_to_another() -> None:
    """Restarts picked by the last training forward on a GPU stayed on it; after ``.cpu()`` the write in
    ``state_dict`` / ``decode`` indexed the CPU codebook with CUDA tensors and failed."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, dead_code_after=1, ema_decay=0.9).cuda().train()
    q(torch.randn(1, 2, 1, 2, device="cuda"))
    dead, picks = q._pending_restart
    state = q.cpu().state_dict()
    assert torch.equal(state["embedding.weight"][dead.cpu()], picks.cpu())
    assert torch.equal(state["ema_embed_sum"][dead.cpu()], picks.cpu())
