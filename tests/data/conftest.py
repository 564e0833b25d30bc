"""Tiny shard datasets for the data tests: written with ShardWriter into tmp_path.

Vocabulary: n_text 64 (13 special ids), 32 image codes on a 2x2 grid. Every sample has a 3-6 token caption, a
4-code image and 4 neighbours, all derived from the sample index, so tests can predict exact ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cm3leon_lightning.data.shards import Manifest, Neighbor, ShardSample, ShardWriter

TEXT_TOKENIZER = {"path": "tok.json", "sha256": "0" * 64, "n_text": 64, "num_sentinels": 8}
IMAGE_TOKENIZER = {"checkpoint_sha256": "1" * 64, "n_codes": 32, "grid_h": 2, "grid_w": 2, "image_size": 16}
CLIP = {"model": "ViT-B-32", "dim": 512}
RETRIEVAL = {"k": 4, "max_score": 0.9}


def make_sample(i: int, n_neighbors: int = 4) -> ShardSample:
    """Sample ``i``: key ``doc-{i:04d}``, caption ids ``13 + (i + j) % 51``, codes ``(i + j) % 32``."""
    rng = np.random.default_rng(i)
    cap = 13 + (i + np.arange(3 + i % 4)) % 51
    neighbors = [
        Neighbor(
            key=f"nb-{i}-{j}",
            score=0.9 - 0.1 * j,
            by="text" if j % 2 == 0 else "image",
            text=rng.integers(13, 64, size=2 + j),
            image=rng.integers(0, 32, size=4),
        )
        for j in range(n_neighbors)
    ]
    return ShardSample(
        key=f"doc-{i:04d}",
        caption=f"caption {i}",
        text=cap.astype(np.int32),
        image=((i + np.arange(4)) % 32).astype(np.int16),
        neighbors=neighbors,
    )


def write_dataset(root: Path, n: int, per_shard: int, n_neighbors: int = 4, start: int = 0) -> Manifest:
    """Write samples ``start .. start+n-1`` into ``root`` with ``per_shard`` samples per shard."""
    writer = ShardWriter(root, TEXT_TOKENIZER, IMAGE_TOKENIZER, CLIP, RETRIEVAL, samples_per_shard=per_shard)
    return writer.write_all([make_sample(i, n_neighbors) for i in range(start, start + n)])


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """22 samples in 6 shards (4, 4, 4, 4, 4, 2)."""
    root = tmp_path / "ds"
    write_dataset(root, 22, 4)
    return root
