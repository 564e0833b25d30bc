"""Compose the evaluation callbacks by hand around a Trainer (notebook style; about a minute on a CPU).

Everything is tiny and offline: coloured-shape images, a BPE tokenizer trained on their captions, a randomly
initialised micro VQGAN, and a fixed random feature extractor in place of Inception (real runs leave
``feature_extractor`` unset and get torch-fidelity's Inception, or pass ``feature_weights_path``). The numbers are
therefore meaningless; the point is the wiring. Run: ``python examples/compose_callbacks.py`` (``--help``).

It works in a fresh temporary directory (tokenizer, VQGAN, shards, logs, sample grids), deleted when Python exits;
``--workdir DIR`` writes them to ``DIR`` and keeps them. Stopped by SIGTERM (``kill PID``) it exits with status 143,
as the project's commands do, its temporary directory deleted.
"""

# %% Imports
from __future__ import annotations

import argparse
import atexit
import io
import json
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn

from cm3leon_lightning import (
    VQGAN,
    CIDErCallback,
    CM3LeonDataModule,
    CM3LeonModule,
    FIDCallback,
    SampleLoggerCallback,
    ShardWriter,
    TextTokenizer,
    VQACallback,
)
from cm3leon_lightning.data.pairs import make_shape_pairs
from cm3leon_lightning.data.shards import ShardSample
from cm3leon_lightning.demo_cli import sigterm_raises

# %% Arguments (in a notebook's kernel, whose command line is the kernel's, the defaults)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--workdir", type=Path, default=None, metavar="DIR", help="a new or empty directory to write "
                    "the run to and keep (default: a temporary directory, deleted at exit)")  # fmt: skip
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
if args.workdir is not None and args.workdir.exists():  # never written over: the VQGAN export refuses, logs mix
    if not args.workdir.is_dir() or any(args.workdir.iterdir()):
        parser.error(f"argument --workdir: {args.workdir} is not an empty directory: give a new or empty one")

# SIGTERM raises SystemExit(143) from here on, as in `cm3leon demo`: Python's default ended the run at once, without
# the clean-up below, and Lightning's, during the fit, with status 0 (a notebook's kernel keeps its own handler).
sigterm = ExitStack()
if "ipykernel" not in sys.modules:
    sigterm.enter_context(sigterm_raises())

torch.manual_seed(0)
if args.workdir is None:
    work = Path(tempfile.mkdtemp(prefix="cm3leon-callbacks-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # also after an error or Ctrl-C
else:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

# %% Tokenizers: text BPE on the captions, a micro VQGAN (16x16 images -> 8x8 codes from 32)
captions_all = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle", "triangle")]
tok = TextTokenizer.train(captions_all * 20, vocab_size=300)
tok_path = tok.save(work / "tokenizer")
vqgan = VQGAN.from_name("micro").eval()
vqgan_dir = vqgan.save_pretrained(work / "vqgan")


# %% Tiny shards that keep the source image (evaluation shards must, for FID and CIDEr)
def write_split(name: str, n: int, seed: int) -> tuple[Path, np.ndarray, list[str]]:
    images, captions = make_shape_pairs(n, image_size=16, seed=seed)
    with torch.no_grad():
        codes = vqgan.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()  # (n, 64)
    text_info = {"path": str(tok_path), "sha256": tok.sha256, "n_text": tok.vocab_size, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 8, "grid_w": 8, "image_size": 16}
    writer = ShardWriter(work / name, text_info, image_info, samples_per_shard=8)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        text = np.asarray(tok.encode(captions[i]), np.int32)
        writer.write(ShardSample(f"{name}-{i}", captions[i], text, codes[i].astype(np.int16), jpg=buf.getvalue()))
    writer.close()
    return work / name, codes, captions


train_dir, _, _ = write_split("train", 32, seed=0)
val_dir, val_codes, val_captions = write_split("val", 8, seed=1)

# A VQA-format file: question, image (or codes), ten human answers.
vqa = [
    {"question": "what color is the shape?", "codes": val_codes[i].tolist(), "answers": [c.split()[1]] * 10}
    for i, c in enumerate(val_captions)
]
(work / "vqa.json").write_text(json.dumps(vqa))

# %% Data and model
data = CM3LeonDataModule(
    train_data=str(train_dir), val_data=str(val_dir), seq_len=128, batch_size=4, num_workers=0, max_retrieved=0
)
model = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict(), lr=3e-3, warmup_steps=2)


# %% A stand-in for Inception: any nn.Module mapping uint8 (N, 3, H, W) to (N, d) features
class ColourFeatures(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255  # (N, 3, H, W)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (N, 6)


# %% The callbacks: each generates with the module's network, scores on every rank, logs one number
shared = dict(text_tokenizer=str(tok_path), vqgan=str(vqgan_dir), batch_size=8)
callbacks = [
    FIDCallback(
        num_samples=8, image_size=16, samples_per_prompt=1, clip_model=None, feature_extractor=ColourFeatures(),
        cache_dir=str(work / "fid-cache"), **shared,
    ),  # data=None: the data module's val_data
    CIDErCallback(num_samples=8, max_new_tokens=6, **shared),
    VQACallback(data=str(work / "vqa.json"), num_samples=8, max_new_tokens=3, **shared),
    SampleLoggerCallback(prompts=captions_all[:4], seeds=[0, 1, 2, 3], num_caption_images=4, cell=64, **shared),
]  # fmt: skip

# %% Train a few steps; validation (and so every callback) runs at the end of the epoch
logger = CSVLogger(work, name="run")
trainer = L.Trainer(
    accelerator="cpu", max_steps=8, limit_val_batches=1, logger=logger, callbacks=callbacks,
    enable_checkpointing=False, enable_progress_bar=False,
)  # fmt: skip
trainer.fit(model, datamodule=data)

# %% Results
for key in ("val/loss", "val/fid", "val/cider", "val/vqa_acc"):
    print(f"{key:12s} {float(trainer.callback_metrics[key]):.4f}")
print("sample grids:", *sorted(p.name for p in (Path(logger.log_dir) / "samples").glob("*.png")))
print("run directory:", logger.log_dir, "(kept)" if args.workdir else "(deleted at exit; --workdir keeps it)")
