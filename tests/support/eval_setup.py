"""Tiny, offline pieces for the evaluation-callback tests: a BPE tokenizer, the micro VQGAN, a CM3Leon module with
the matching vocabulary, coloured-shape evaluation samples, and a tiny fixed feature extractor for FID."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cm3leon_lightning.callbacks.base import EvalSample
from cm3leon_lightning.data.pairs import make_shape_pairs
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN

CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle", "triangle")]


def tiny_tokenizer() -> TextTokenizer:
    """A byte-level BPE of 300 ids trained on the shape captions."""
    return TextTokenizer.train(CAPTIONS * 20 + ["what color is it? the answer is"] * 5, vocab_size=300)


def micro_vqgan(seed: int = 0) -> VQGAN:
    """The ``micro`` VQGAN preset (16x16 images, 8x8 grid, 32 codes), randomly initialised with ``seed``."""
    torch.manual_seed(seed)
    return VQGAN.from_name("micro").eval()


def tiny_module(tok: TextTokenizer, seed: int = 0) -> CM3LeonModule:
    """A built, randomly initialised tiny CM3Leon for ``tok``'s ids and the micro VQGAN's codes."""
    torch.manual_seed(seed)
    vocab = tok.make_vocab(n_codes=32, grid_h=8, grid_w=8)
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), warmup_steps=1)
    module.configure_model()
    return module


def shape_samples(n: int, size: int = 16, seed: int = 0) -> list[EvalSample]:
    """``n`` coloured-shape images (uint8 ``(3, size, size)``) with their captions."""
    images, captions = make_shape_pairs(n, image_size=size, seed=seed)
    return [
        EvalSample(f"shape-{i}", [captions[i]], torch.from_numpy(images[i]).permute(2, 0, 1).contiguous())
        for i in range(n)
    ]


class TinyFeatures(nn.Module):
    """A fixed random feature extractor: uint8 ``(N, 3, H, W)`` -> ``(N, 8)`` (colour statistics + a conv)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.requires_grad_(False)
        self.num_features = 8

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0  # (N, 3, H, W)
        conv = torch.tanh(self.conv(x)).mean(dim=(2, 3))  # (N, 5)
        return torch.cat([x.mean(dim=(2, 3)), conv], dim=1)  # (N, 8)


def val_loader(vocab, n: int = 4, seed: int = 0):
    """A DataLoader of ``n`` caption-image examples in ``vocab`` (for ``trainer.validate``)."""
    import numpy as np
    from torch.utils.data import DataLoader

    from cm3leon_lightning.tokenization.vocab import Segment

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        caption = rng.integers(vocab.num_special, vocab.n_text, size=5).tolist()
        codes = rng.integers(0, vocab.n_codes, size=vocab.image_tokens).tolist()
        rows.append(vocab.example_to_ids([], [Segment.text(caption), Segment.image(codes)]))
    ids = torch.tensor(rows, dtype=torch.long)
    return DataLoader([{"input_ids": r} for r in ids], batch_size=2)


def trainer(tmp_path, callbacks, logger=False):
    """A quiet CPU trainer for ``validate`` runs."""
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
