"""Run by tests/data/test_resampled_images.py in a subprocess: real two-process DDP on the CPU (gloo, ``ddp_spawn``)
over ``OUTDIR/sh`` (shards of unequal sizes) with ``ImageDataModule(mode="resampled")``.

Prints one JSON line: ``{"rank0": [batches per epoch], "rank1": [...], "differ": bool}`` (the ranks read different
images). Usage: ``python ddp_resampled_images_run.py OUTDIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from cm3leon_lightning.data.images import ImageDataModule


class Record(L.LightningModule):
    """One weight; appends each batch's image numbers to ``<out>/rank<r>.jsonl`` as ``[epoch, ids]``."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with open(self.out / f"rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([self.current_epoch, batch[:, 0, 0, 0].tolist()]) + "\n")
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out: Path) -> None:
    """Fit two epochs and print the batches per epoch of each rank."""
    dm = ImageDataModule(train=str(out / "sh"), image_size=8, batch_size=2, mode="resampled", shuffle_buffer=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Record(out), datamodule=dm)
    rows = {r: [json.loads(line) for line in open(out / f"rank{r}.jsonl")] for r in range(2)}
    result: dict = {f"rank{r}": [sum(e == epoch for e, _ in rows[r]) for epoch in range(2)] for r in range(2)}
    result["differ"] = [ids for _, ids in rows[0]] != [ids for _, ids in rows[1]]
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
