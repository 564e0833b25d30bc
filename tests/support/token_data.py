"""A small in-memory token dataset for module and CLI tests (the streaming shards DataModule has its own tests).

Each example is ``<eos> caption <break> image <eos>`` in a tiny vocabulary, where the image codes are a fixed
function of the caption, so a model can learn the mapping and the loss must fall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment


def make_examples(vocab: MultimodalVocab, n: int, caption_len: int, seed: int) -> torch.Tensor:
    """``n`` examples ``(n, T)``: random captions over the non-special text ids, codes derived from the caption."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        caption = rng.integers(vocab.num_special, vocab.n_text, size=caption_len)
        codes = (np.resize(caption, vocab.image_tokens) * 7 + np.arange(vocab.image_tokens)) % vocab.n_codes
        doc = [Segment.text(caption.tolist()), Segment.image(codes.tolist())]
        rows.append(vocab.example_to_ids([], doc))
    return torch.tensor(rows, dtype=torch.long)


class _Rows(Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


class TokenDataModule(L.LightningDataModule):
    """Fixed random caption -> image-code examples with a real MultimodalVocab.

    Args:
        n_train: training examples.
        n_val: validation examples.
        batch_size: rows per batch.
        caption_len: text tokens per caption.
        seed: data seed.
    """

    def __init__(self, n_train: int = 32, n_val: int = 8, batch_size: int = 4, caption_len: int = 6, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.vocab = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=3)
        self.train_rows = make_examples(self.vocab, n_train, caption_len, seed)
        self.val_rows = make_examples(self.vocab, n_val, caption_len, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.train_rows), batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Rows(self.val_rows), batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def cpu_trainer(root: str | Path, **kwargs: Any) -> L.Trainer:
    """A quiet one-CPU Trainer writing under ``root`` (no logger, bar, summary or sanity check); ``kwargs`` override."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def write_fit_config(root: Path, max_steps: int, n_train: int, limit_val_batches: int = 0) -> Path:
    """``root/fit.yaml``: a quiet CPU fit on :class:`TokenDataModule` that keeps ``root/ckpt/last.ckpt``.

    Compose it after a model config: ``cm3leon fit --config configs/model/tiny.yaml --config <this>``.
    """
    import yaml

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}  # fmt: skip
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root), "limit_val_batches": limit_val_batches,
            "callbacks": [checkpoint],
        },
        "data": {"class_path": f"{__name__}.TokenDataModule", "init_args": {"n_train": n_train, "batch_size": 4}},
    }  # fmt: skip
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
