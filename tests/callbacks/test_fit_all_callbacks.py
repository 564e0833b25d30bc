"""All four callbacks in one ``cm3leon fit`` run of the tiny model on tiny shards: metrics and images in the logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml
from support.eval_setup import write_eval_data

ROOT = Path(__file__).resolve().parents[2]


def test_cm3leon_fit_with_every_callback(tmp_path: Path) -> None:
    d = write_eval_data(tmp_path / "data")
    common = {"text_tokenizer": None, "vqgan": d["vqgan"], "batch_size": 4}  # tokenizer: from the manifest
    config = {
        "seed_everything": 0,
        "data": {
            "class_path": "cm3leon_lightning.data.datamodule.CM3LeonDataModule",
            "init_args": {
                "train_data": d["train"], "val_data": d["val"], "seq_len": 128, "batch_size": 4, "num_workers": 0,
                "max_retrieved": 0,
            },
        },
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 1, "enable_progress_bar": False,
            "enable_checkpointing": False, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {"class_path": "cm3leon_lightning.callbacks.FIDCallback", "init_args": {
                    **common, "num_samples": 8, "image_size": 16, "samples_per_prompt": 1, "clip_model": None,
                    "feature_extractor": {"class_path": "support.eval_setup.TinyFeatures"},
                    "cache_dir": str(tmp_path / "fid-cache")}},
                {"class_path": "cm3leon_lightning.callbacks.CIDErCallback", "init_args": {
                    **common, "num_samples": 4, "max_new_tokens": 6, "tokenizer": "simple"}},
                {"class_path": "cm3leon_lightning.callbacks.VQACallback", "init_args": {
                    **common, "data": d["vqa"], "num_samples": 4, "max_new_tokens": 3}},
                {"class_path": "cm3leon_lightning.callbacks.SampleLoggerCallback", "init_args": {
                    **common, "prompts": ["a red square", "a blue circle"], "num_caption_images": 2,
                    "max_new_tokens": 6, "cell": 32}},
            ],
        },
    }  # fmt: skip
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cm3leon_lightning", "fit", "--config", str(ROOT / "configs/model/tiny.yaml")]
    proc = subprocess.run(cmd + ["--config", str(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]

    log_dir = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("val/")}
    assert {"val/fid", "val/cider", "val/vqa_acc", "val/loss"} <= set(logged)
    assert logged["val/fid"] > 0 and logged["val/cider"] >= 0 and 0 <= logged["val/vqa_acc"] <= 1
    pngs = sorted(p.name for p in (log_dir / "samples").glob("*.png"))
    assert pngs == ["samples_image_to_text-step0000004.png", "samples_text_to_image-step0000004.png"]
    assert len(list((tmp_path / "fid-cache").glob("fid-ref-*.pt"))) == 1
