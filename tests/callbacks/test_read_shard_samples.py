"""read_shard_samples: images grouped by their jpg bytes, in manifest order, with all their references."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cm3leon_lightning.callbacks import read_shard_samples
from cm3leon_lightning.data.shards import ShardSample, ShardWriter


def _jpg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, rows: list[tuple[str, int]]) -> Path:
    """Shards of ``(caption, image value)`` rows, three per shard, so an image's captions span shards."""
    text_info = {"path": "tokenizer.json", "sha256": "0" * 64, "n_text": 300, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 2, "grid_w": 2, "image_size": 8}
    samples = [
        ShardSample(
            key=f"k{i}",
            caption=caption,
            text=np.arange(20, 23, dtype=np.int32),
            image=np.full(4, value, np.int16),
            jpg=_jpg(value),
        )
        for i, (caption, value) in enumerate(rows)
    ]
    ShardWriter(root, text_info, image_info, samples_per_shard=3).write_all(samples)
    return root


def test_scattered_captions_of_kept_images_are_all_read(tmp_path: Path) -> None:
    """COCO's annotation order scatters an image's captions: with ``all_references`` the kept images get every one
    of theirs (reading stopped at the third image before, and CIDEr scored against fewer references)."""
    rows = [("a1", 1), ("b1", 2), ("c1", 3), ("a2", 1), ("b2", 2), ("d1", 4), ("a3", 1), ("c2", 3)]
    root = _write(tmp_path / "val", rows)
    full, full_id = read_shard_samples(root, 2, all_references=True)
    assert [(s.key, s.references) for s in full] == [("k0", ["a1", "a2", "a3"]), ("k1", ["b1", "b2"])]
    early, early_id = read_shard_samples(root, 2)
    assert [(s.key, s.references) for s in early] == [("k0", ["a1"]), ("k1", ["b1"])]
    assert full_id != early_id
    every, _ = read_shard_samples(root, 10)
    assert [s.references for s in every] == [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2"], ["d1"]]
    assert [s.codes.tolist() for s in every] == [[1] * 4, [2] * 4, [3] * 4, [4] * 4]
    apart, _ = read_shard_samples(root, 3, group_by_image=False)
    assert [s.references for s in apart] == [["a1"], ["b1"], ["c1"]]
