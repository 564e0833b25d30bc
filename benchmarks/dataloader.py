"""Data-loader throughput at the paper's full-scale shapes: sequences per second for one worker.

Shapes: 32x32 = 1024 image tokens (8192 codes), ~30-token captions (56320 text ids), 4 stored neighbours, up to
three retrieved per example, seq_len 4096, CM3 masking on. The benchmark writes synthetic shards with
:class:`ShardWriter` into a temporary directory, then runs one worker's stream (:meth:`ShardStream.iter_worker`, the
exact code a DataLoader worker runs: read + sha256 + tar parse + decode/validate + retrieval choice + context fit +
serialization + masking + collate) in this process, and times the stages separately too.

Goal (issue 3): one worker feeds >= 100 sequences/s (four workers: ten times what a 350M model consumes on an H100).

    python benchmarks/dataloader.py [--samples 1024] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from generation import at_least  # benchmarks/generation.py, beside this script

from cm3leon_lightning.data.datamodule import CM3LeonDataModule
from cm3leon_lightning.data.shards import Neighbor, ShardSample, ShardWriter
from cm3leon_lightning.data.stages import build_example, decode
from cm3leon_lightning.data.stream import ShardStream, read_piece

TEXT = {"path": "bpe.json", "sha256": "0" * 64, "n_text": 56320, "num_sentinels": 8}
IMAGE = {"checkpoint_sha256": "1" * 64, "n_codes": 8192, "grid_h": 32, "grid_w": 32, "image_size": 256}


def synthetic(i: int, rng: np.random.Generator, neighbours: int = 4) -> ShardSample:
    """A full-scale sample: ~30-token caption, 1024 codes, ``neighbours`` caption-image neighbours."""

    def caption() -> np.ndarray:
        return rng.integers(13, TEXT["n_text"], size=int(rng.integers(20, 41)))

    return ShardSample(
        key=f"doc-{i:07d}",
        caption=f"synthetic caption {i}",
        text=caption(),
        image=rng.integers(0, 8192, size=1024),
        neighbors=[
            Neighbor(
                f"nb-{i}-{j}", 0.9 - 0.01 * j, "text" if j % 2 else "image", caption(), rng.integers(0, 8192, 1024)
            )
            for j in range(neighbours)
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(1), default=1024)
    parser.add_argument("--per-shard", type=at_least(1), default=256)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--seq-len", type=at_least(1), default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        writer = ShardWriter(root, TEXT, IMAGE, {"model": "ViT-B-32", "dim": 512}, samples_per_shard=args.per_shard)
        manifest = writer.write_all([synthetic(i, rng) for i in range(args.samples)])
        write_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in root.glob("shard-*.tar")) / 2**20

        dm = CM3LeonDataModule(train_data=str(root), seq_len=args.seq_len, batch_size=args.batch_size, num_workers=0)
        _, urls, infos = dm.sources["train"]
        stream = ShardStream(urls, infos, dm.cfg, args.batch_size, args.seq_len, num_workers=0)

        t0 = time.perf_counter()
        rows, real = 0, 0
        for batch in stream.iter_worker(0):
            rows += batch["input_ids"].shape[0]
            real += sum(len(k) for k in batch["keys"])
            tokens = int((batch["input_ids"] != 0).sum())
        total_s = time.perf_counter() - t0

        # Stage breakdown on the same data.
        t0 = time.perf_counter()
        items = [it for piece_url, info in zip(urls, infos) for it in _read_all(piece_url, info)]
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = [decode(it, dm.vocab) for it in items]
        decode_s = time.perf_counter() - t0
        cfg_plain = type(dm.cfg)(**{**dm.cfg.__dict__, "infill": False})
        t0 = time.perf_counter()
        plain = [build_example(s, cfg_plain, 0) for s in samples]
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        masked = [build_example(s, dm.cfg, 0) for s in samples]
        build_mask_s = time.perf_counter() - t0

    n = manifest.num_samples
    print(f"full-scale shapes: 1024 image tokens, ~30 caption tokens, 4 neighbours, seq_len {args.seq_len}")
    print(f"wrote {n} samples in {len(manifest.shards)} shards ({size_mb:.1f} MiB) in {write_s:.2f}s")
    print(f"one worker, end to end: {real / total_s:.1f} sequences/s ({total_s:.2f}s for {real} sequences)")
    ms = {
        "read+sha256+tar": read_s,
        "decode+validate": decode_s,
        "retrieve+fit+serialize": build_s,
        "CM3 masking": build_mask_s - build_s,
    }
    print("  per sequence: " + ", ".join(f"{k} {1e3 * v / n:.2f} ms" for k, v in ms.items()))
    mean_len = np.mean([e.ids.size for e in masked])
    kept = np.mean([e.n_retrieved for e in plain])
    print(f"  mean sequence {mean_len:.0f} tokens, {kept:.2f} retrieved documents kept; last batch {tokens} tokens")


def _read_all(url: str, info) -> list:
    from cm3leon_lightning.data.plan import Piece

    items, _ = read_piece(url, info, Piece(0, 0, info.count), verify_sha256=True, allow_remote=False)
    return items


if __name__ == "__main__":
    main()
