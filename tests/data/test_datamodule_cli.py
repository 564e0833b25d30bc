"""`cm3leon fit` with a YAML that points at tiny shards, end to end in a subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cm3leon_fit_on_tiny_shards(tiny_dataset: Path, tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "configs" / "data" / "shards.yaml").read_text())
    data["data"]["init_args"].update(
        {
            "train_data": str(tiny_dataset),
            "val_data": str(tiny_dataset),
            "seq_len": 64,
            "batch_size": 2,
            "num_workers": 0,
        }
    )
    config = {
        **data,
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "log_every_n_steps": 1,
            "limit_val_batches": 2,
            "val_check_interval": 2,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                },
            ],
        },
    }
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump(config))
    tiny = ROOT / "configs" / "model" / "tiny.yaml"
    cmd = [sys.executable, "-m", "cm3leon_lightning", "fit", "--config", str(tiny), "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4  # saved after the validation at step 4
    assert ckpt["hyper_parameters"]["vocab"]["n_text"] == 64 and ckpt["hyper_parameters"]["vocab"]["grid_h"] == 2
    state = ckpt["CM3LeonDataModule"]
    assert (state["epoch"], state["batch"], state["counts"]["examples"]) == (0, 4, 8)
    # The CLI adds DataCountsLogger by itself (--data_counts.*), so the counts reach the logger.
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [r["data/examples"] for r in rows if r.get("data/examples")] == ["2.0", "4.0", "6.0", "8.0"]
