"""``cm3leon fit --config configs/vqgan/tiny.yaml`` trains the tokenizer end to end through the package's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cm3leon_lightning.modules.vqgan import VQGANModule

ROOT = Path(__file__).parents[2]


def test_cli_fits_tiny_vqgan_config(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "cm3leon_lightning", "fit",
        "--config", str(ROOT / "configs" / "vqgan" / "tiny.yaml"),
        "--trainer.max_steps", "3",
        "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.synthetic", "64",
        "--data.init_args.synthetic_val", "8",
        "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ckpt"))
    # the config's checkpoint folder, with the last.ckpt the README tells VQGAN.from_pretrained to read
    assert ckpts == ["runs/vqgan_tiny/checkpoints/epoch=0-step=3.ckpt", "runs/vqgan_tiny/checkpoints/last.ckpt"]
    last = tmp_path / ckpts[1]
    raw = torch.load(last, weights_only=True)
    assert raw["global_step"] == 3 and raw["hyper_parameters"]["preset"] == "tiny"
    module = VQGANModule.load_from_checkpoint(last, weights_only=True)
    assert int(module.train_steps) == 3 and module.vqgan.config.grid_size == (8, 8)
    # the default logger is TensorBoard: scalars and the originals-vs-reconstructions grid are there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"val/rec_loss", "val/usage", "val/perplexity", "train/rec_loss"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["val/reconstructions"]
