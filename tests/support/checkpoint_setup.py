"""A tokenizer, a micro VQGAN (16 px, 8x8 codes from 32) and a random tiny CM3Leon checkpoint for both, on disk: what
``cm3leon generate`` and ``cm3leon serve`` load."""

from __future__ import annotations

from pathlib import Path

import torch

from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN

CORPUS = ["a red circle", "a blue square", "two green triangles", "a small red square", "what colour is it"] * 20


def write_checkpoint_assets(root: Path, max_seq_len: int = 128) -> Path:
    """Write ``tok/``, ``vqgan/`` and ``model.ckpt`` (blocks drawn from N(0, 0.2), so samples differ between seeds)
    under ``root``; returns ``root``."""
    tok = TextTokenizer.train(CORPUS, vocab_size=300)
    tok.save(root / "tok")
    torch.manual_seed(0)
    vqgan = VQGAN.from_name("micro").eval()
    vqgan.save_pretrained(root / "vqgan")
    vocab = tok.make_vocab(n_codes=vqgan.n_embed, grid_h=8, grid_w=8)
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=max_seq_len)
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.normal_(0.0, 0.2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, root / "model.ckpt")
    return root


def save_sharded(trainer: object, path: Path) -> Path:
    """Write ``trainer``'s checkpoint as Lightning's FSDPStrategy does with ``state_dict_type="sharded"`` (the
    strategy's own ``save_checkpoint``: ``torch.distributed.checkpoint`` shards + ``meta.pt``), on the CPU, where the
    strategy cannot train; returns ``path``."""
    from lightning.pytorch.strategies import FSDPStrategy

    checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # type: ignore[attr-defined]
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(checkpoint, path)
    return path
