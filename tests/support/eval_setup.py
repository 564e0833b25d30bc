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
    """A fixed random feature extractor: uint8 ``(N, 3, H, W)`` -> ``(N, dims)`` (colour statistics + a conv; the
    first ``dims`` of 8, as Inception's layers give features of several sizes from one set of weights)."""

    def __init__(self, seed: int = 0, dims: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.requires_grad_(False)
        self.num_features = dims

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0  # (N, 3, H, W)
        conv = torch.tanh(self.conv(x)).mean(dim=(2, 3))  # (N, 5)
        return torch.cat([x.mean(dim=(2, 3)), conv], dim=1)[:, : self.num_features]  # (N, dims)


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


def write_eval_data(root, n_train: int = 16, n_val: int = 8, seed: int = 0) -> dict:
    """Tiny shards of coloured shapes that keep their jpg, plus the tokenizer, VQGAN and a VQA file, under ``root``.

    Returns paths: ``train``, ``val`` (shard directories), ``tokenizer`` (tokenizer.json), ``vqgan`` (directory),
    ``vqa`` (VQA-format JSON).
    """
    import io
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from cm3leon_lightning.data.prepare_run import path_sha256
    from cm3leon_lightning.data.shards import ShardSample, ShardWriter

    root = Path(root)
    tok, vqgan = tiny_tokenizer(), micro_vqgan(seed)
    tok_path, vqgan_dir = tok.save(root / "tokenizer"), vqgan.save_pretrained(root / "vqgan")
    text_info = {"path": str(tok_path), "sha256": tok.sha256, "n_text": tok.vocab_size, "num_sentinels": 8}
    # the hash cm3leon prepare records: a model trained on these shards refuses another VQGAN
    image_info = {
        "checkpoint_sha256": path_sha256(vqgan_dir),
        "n_codes": 32,
        "grid_h": 8,
        "grid_w": 8,
        "image_size": 16,
    }
    out = {"tokenizer": str(tok_path), "vqgan": str(vqgan_dir)}
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        images, captions = make_shape_pairs(n, image_size=16, seed=s)
        with torch.no_grad():
            codes = vqgan.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        samples = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")  # lossless, so FID references are exact
            samples.append(
                ShardSample(
                    key=f"{split}-{i:04d}",
                    caption=captions[i],
                    text=np.asarray(tok.encode(captions[i]), np.int32),
                    image=codes[i].astype(np.int16),
                    jpg=buf.getvalue(),
                )
            )
        ShardWriter(root / split, text_info, image_info, samples_per_shard=8).write_all(samples)
        out[split] = str(root / split)
        if split == "val":
            entries = [
                {"key": f"q{i}", "question": "what color is the shape?", "codes": codes[i].tolist(),
                 "answers": [captions[i].split()[1]] * 10}
                for i in range(n)
            ]  # fmt: skip
            (root / "vqa.json").write_text(json.dumps(entries))
            out["vqa"] = str(root / "vqa.json")
    return out
