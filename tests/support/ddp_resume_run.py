"""Run by tests/data/test_ddp_resume.py in a subprocess: real two-process DDP on the CPU (gloo, ``ddp_spawn``).

Fits 8 steps without interruption, then 2 steps with a checkpoint and a resume from it to step 8, recording each
rank's batch keys. Prints one JSON line: ``{"rank0": bool, "rank1": bool, "differ": bool}`` (each rank's resumed keys
equal its uninterrupted ones; the ranks read different samples). Usage: ``python ddp_resume_run.py OUTDIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from conftest import write_dataset  # noqa: E402  (tests/data/conftest.py: tiny shards)

from cm3leon_lightning.data import CM3LeonDataModule  # noqa: E402
from cm3leon_lightning.modules.cm3leon import CM3LeonModule  # noqa: E402


class RecordKeys(L.Callback):
    """Append each training batch's sample keys to ``<out>/<tag>-rank<r>.jsonl``."""

    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        with open(self.out / f"{self.tag}-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(batch["keys"]) + "\n")


def fit(out: Path, tag: str, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None) -> None:
    """One ``ddp_spawn`` fit on two CPU processes."""
    dm = CM3LeonDataModule(train_data=str(out / "ds"), seq_len=64, batch_size=2, num_workers=0, shuffle_shards=1)
    model = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), max_seq_len=64, warmup_steps=1)
    callbacks: list[L.Callback] = [RecordKeys(out, tag)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps, callbacks=callbacks, logger=False,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)


def main(out: Path) -> None:
    """Run the three fits and print the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    write_dataset(out / "ds", 22, 4)
    fit(out, "full", 8)
    fit(out, "head", 2, ckpt_dir=out / "ckpt")
    fit(out, "tail", 8, ckpt_path=str(out / "ckpt" / "epoch=0-step=2.ckpt"))

    def keys(tag: str, rank: int) -> list:
        return [json.loads(line) for line in open(out / f"{tag}-rank{rank}.jsonl")]

    result = {f"rank{r}": keys("head", r) + keys("tail", r) == keys("full", r) for r in range(2)}
    result["differ"] = keys("full", 0) != keys("full", 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
