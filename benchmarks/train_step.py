"""Training throughput of CM3LeonModule through a Lightning Trainer (tokens/s, step time, peak memory).

Runs a few optimisation steps per preset on random token batches and prints one line per preset. On a GPU it uses
bf16-mixed precision (the configuration the paper-sized presets are meant for), which also checks that precision works
end to end; on CPU fp32 with the tiny preset.

    python benchmarks/train_step.py                       # tiny on CPU
    python benchmarks/train_step.py --presets tiny 350m --batch-size 4 --seq-len 4096 --steps 20   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from generation import at_least  # benchmarks/generation.py, beside this script
from torch.utils.data import DataLoader, Dataset

from cm3leon_lightning.config import PRESETS
from cm3leon_lightning.modules.cm3leon import CM3LeonModule


class RandomTokens(Dataset):
    """``n`` rows of random non-pad token ids of length ``seq_len``."""

    def __init__(self, n: int, seq_len: int, vocab_size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(1, vocab_size, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


class StepTimer(L.Callback):
    """Records the wall time of every training batch (synchronising the device first)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def run(preset: str, batch_size: int, seq_len: int, steps: int, compile: bool, checkpointing: bool) -> dict:
    """Fit ``steps`` steps and return throughput figures (the first two steps are warm-up, not counted; the learning
    rate warms up over the first half of the steps)."""
    gpu = torch.cuda.is_available()
    # half the run warms up (10 of the GPU example's 20 steps): a fixed 10 was the whole of the default 10-step run,
    # and the module warned to lower --model.init_args.warmup_steps, an option this script does not have
    module = CM3LeonModule(
        preset=preset, max_seq_len=seq_len, warmup_steps=steps // 2, compile=compile,
        activation_checkpointing=checkpointing,
    )  # fmt: skip
    data = RandomTokens(batch_size * steps, seq_len, module.config.vocab_size)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    timed = timer.times[2:]
    step_s = sum(timed) / len(timed)
    tokens = batch_size * (seq_len - 1)
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "precision": trainer.precision,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params_M": round(module.config.num_parameters() / 1e6, 1),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "final_loss": None if loss is None else round(float(loss), 4),
        "compile": compile,
        "activation_checkpointing": checkpointing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=tuple(PRESETS))
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--seq-len", type=at_least(2), default=256, help="tokens per row (one less trained)")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps, the first two not timed")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (the first two are warm-up, not timed), got {args.steps}")
    results = []
    for preset in args.presets:
        r = run(preset, args.batch_size, args.seq_len, args.steps, args.compile, args.activation_checkpointing)
        print(json.dumps(r))
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
