"""Peak memory and time of ``cm3leon export`` from a single-file and a sharded (FSDP) checkpoint, and of loading
the exported directory as ``cm3leon generate`` / ``serve`` do.

Writes a randomly filled checkpoint of a preset in both forms, then exports each to bfloat16 and loads the result,
in a fresh process per run, a chunk at a time (the default) and with the whole model read at once (``--whole``
chunk size, close to what export did before it streamed), and prints the extra memory each took beyond the process
after its imports:

* ``anon``: peak anonymous memory (the process's own allocations, sampled every 5 ms from ``/proc/self/status``),
  the part that cannot be reclaimed;
* ``rss``: peak resident set (sampled likewise), which also counts the pages of a memory-mapped ``.ckpt`` read
  through (the kernel may drop those at any time).

    python benchmarks/export_memory.py                       # 350m: 1.4 GB checkpoints, ~1 min on 2 cores
    python benchmarks/export_memory.py --preset tiny --json export.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cm3leon_lightning.config import PRESETS
from cm3leon_lightning.demo_cli import positive_int  # --whole 0 kept the default chunk: "whole" rows chunked

CHILD = r"""
import gc, json, sys, threading, time
from pathlib import Path
import torch
import torch.distributed.checkpoint, safetensors.torch  # what export imports, before the baseline
import cm3leon_lightning.generation.cli, cm3leon_lightning.model.hf_opt, cm3leon_lightning.model.safetensors_stream
from cm3leon_lightning.export import export_model
from cm3leon_lightning.model import weights

def kib():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return [int(fields[k].split()[0]) for k in ("RssAnon", "VmRSS")]

action, src, out, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if chunk:
    weights.CHUNK_BYTES = chunk
gc.collect()
base = kib()
peak, done = list(base), threading.Event()

def sample():
    while not done.wait(0.005):
        peak[:] = map(max, peak, kib())

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
if action == "export":
    export_model(src, out, dtype=torch.bfloat16)
    size = (Path(out) / "model.safetensors").stat().st_size
else:  # load the exported directory as generate and serve do
    model, _ = cm3leon_lightning.generation.cli.load_checkpoint(src)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
seconds = time.perf_counter() - t
done.set()
peak[:] = map(max, peak, kib())
print(json.dumps({"seconds": seconds, "anon_mib": (peak[0] - base[0]) / 1024, "rss_mib": (peak[1] - base[1]) / 1024,
                  "bytes": size}))
"""


def write_checkpoints(preset: str, root: Path) -> tuple[Path, Path, int]:
    """A random ``CM3LeonModule`` checkpoint of ``preset`` as ``one.ckpt`` and as FSDP's sharded ``sharded.ckpt``;
    returns both paths and the parameter count."""
    from lightning.pytorch.strategies import FSDPStrategy

    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model import CM3Leon
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    vocab = MultimodalVocab(n_text=56320, n_codes=8192, grid_h=32, grid_w=32)
    config = CM3LeonConfig.from_preset(preset, vocab_size=vocab.padded_size)
    with torch.device("meta"):
        shapes = CM3Leon(config).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {"model." + k: torch.randn(v.shape, generator=g) * 0.02 for k, v in shapes.items() if k != "lm_head.weight"}
    if config.tie_embeddings:
        state["model.lm_head.weight"] = state["model.wte.weight"]
    hparams = {"config": config.to_dict(), "vocab": vocab.to_dict()}
    checkpoint = {"state_dict": state, "hyper_parameters": hparams, "global_step": 1, "epoch": 0}
    torch.save(checkpoint, root / "one.ckpt")
    FSDPStrategy(state_dict_type="sharded").save_checkpoint(dict(checkpoint), root / "sharded.ckpt")
    return root / "one.ckpt", root / "sharded.ckpt", config.num_parameters()


def measure(action: str, src: Path, out: Path, chunk: int) -> dict[str, float]:
    """``export`` ``src`` to ``out``, or ``load`` the model directory ``src``, in a fresh process reading ``chunk``
    bytes at a time (0: the default)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", CHILD, action, str(src), str(out), str(chunk)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse the arguments, write the checkpoints, export each way, print one line per run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="350m", choices=tuple(PRESETS))
    p.add_argument(
        "--whole", type=positive_int, default=1 << 50, help="chunk size in bytes of the read-everything-at-once runs"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        one, sharded, n = write_checkpoints(args.preset, root)
        print(
            f"{args.preset}: {n / 1e6:.0f}M parameters, float32 checkpoints written in {time.perf_counter() - t:.1f} s"
        )
        runs = [("export", src, mode) for src in (one, sharded) for mode in ("chunked", "whole")]
        runs += [("load", root / "out-one-chunked", mode) for mode in ("chunked", "whole")]
        for action, src, mode in runs:
            out = root / f"out-{src.stem}-{mode}"
            r = measure(action, src, out, 0 if mode == "chunked" else args.whole)
            r = {"action": action, "source": src.name, "mode": mode, "parameters": n, **r}
            results.append(r)
            print(
                f"{action:6s} {src.name:16s} {mode:8s} anon +{r['anon_mib']:6.0f} MiB  rss +{r['rss_mib']:6.0f} MiB  "
                f"{r['seconds']:5.1f} s  {r['bytes'] / 2**20:.0f} MiB of weights"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
