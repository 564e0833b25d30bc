"""``--source parquet`` (``data/parquet.py``): Hugging Face-style Parquet files (image struct, binary or path columns;
string or list captions) read in a fixed order by any range, one row group at a time, and prepared into shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.data.parquet import ParquetSource
from cm3leon_lightning.data.shapes import generate_pairs
from cm3leon_lightning.data.shards import Manifest, read_shard
from cm3leon_lightning.data.sources import BadInput, clean_caption, make_source
from cm3leon_lightning.tokenization.text import TextTokenizer


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def dataset(tmp_path: Path) -> dict:
    """``a.parquet``: 7 rows of datasets' Image struct + string captions in row groups of 3; ``b.parquet``: 4 rows
    of relative image paths + list captions (the first one empty) + an integer id column named like a's."""
    pairs = list(generate_pairs(11, seed=3))
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    images = [png(p.image) for p in pairs]
    a = pa.table({
        "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images[:7])],
        "caption": [p.caption for p in pairs[:7]],
        "id": list(range(7)),
    })  # fmt: skip
    pq.write_table(a, root / "a.parquet", row_group_size=3)
    for i in range(7, 11):
        (root / "img" / f"{i}.png").write_bytes(images[i])
    b = pa.table({
        "image": [f"img/{i}.png" for i in range(7, 11)],
        "caption": [["", p.caption] for p in pairs[7:]],
        "id": list(range(7, 11)),
    })  # fmt: skip
    pq.write_table(b, root / "b.parquet")
    return {"root": root, "pairs": pairs, "images": images}


def test_rows_come_in_file_then_row_order_with_images_and_captions(dataset: dict) -> None:
    root, pairs, images = dataset["root"], dataset["pairs"], dataset["images"]
    src = ParquetSource(root)
    assert len(src) == 11 and src.row_groups == [[3, 3, 1], [4]]
    got = list(src)
    assert [p.key for p in got] == [f"a-{i:07d}" for i in range(7)] + [f"b-{i:07d}" for i in range(4)]
    assert [p.caption for p in got] == [p.caption for p in pairs]
    assert [p.image for p in got[:7]] == images[:7]  # bytes of the struct
    assert [Path(p.image).read_bytes() for p in got[7:]] == images[7:]  # paths relative to the file
    assert got[8].meta == {"file": "b.parquet", "row": 1}
    for start, stop in [(2, 9), (3, 6), (0, 1), (10, 11), (6, 7), (5, 5), (9, 100)]:
        assert [p.key for p in src.iter_range(start, stop)] == [p.key for p in got[start:stop]]
    assert list(src.captions()) == [p.caption for p in got]
    assert src.describe()["counts"] == [7, 4] and src.describe()["count"] == 11
    keyed = make_source("parquet", str(root / "*.parquet"), columns=("image", "caption", "id"))
    assert [p.key for p in keyed] == [str(i) for i in range(11)]


def test_null_ids_and_large_types(dataset: dict, tmp_path: Path) -> None:
    """A null id became the key ``None``, so every row without an id after the first was dropped as a duplicate; a
    null id now gives the row its default key. Polars' ``large_list`` / ``large_string`` columns were refused."""
    image = dataset["images"][0]
    table = pa.table({
        "image": pa.array([image] * 4, pa.large_binary()),
        "caption": pa.array([["one"], ["two"], ["", "three"], ["four"]], pa.large_list(pa.large_string())),
        "id": pa.array(["x", None, None, "猫"], pa.large_string()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet")
    src = ParquetSource(tmp_path / "p.parquet", key_column="id")
    assert [(p.key, p.caption) for p in src] == [
        ("x", "one"), ("p-0000001", "two"), ("p-0000002", "three"), ("id-a68cf446", "four"),
    ]  # fmt: skip
    assert list(ParquetSource(tmp_path / "p.parquet").captions()) == ["one", "two", "three", "four"]


def test_a_caption_list_skips_captions_cleaning_empties(dataset: dict, tmp_path: Path) -> None:
    """The first caption of a list that was not blank by ``str.strip`` was taken, so one of control characters
    (empty once cleaned) cost the row although a later caption had text (``coco`` mode ``first`` skips it)."""
    captions = [["\x00\x07", " a red cat "], ["\x1f", " "], [None], []]
    table = pa.table({"image": [dataset["images"][0]] * 4, "caption": captions})
    pq.write_table(table, tmp_path / "p.parquet")
    assert [p.caption for p in ParquetSource(tmp_path / "p.parquet")] == [" a red cat ", "\x1f", None, None]
    # a list of blank captions is skipped as empty (it was "caption_missing"), as coco's first mode counts it
    with pytest.raises(BadInput) as e:
        clean_caption("\x1f")
    assert e.value.reason == "caption_empty"


def test_bad_files_and_columns_are_named(dataset: dict, tmp_path: Path) -> None:
    root = dataset["root"]
    with pytest.raises(ValueError, match=r"a.parquet has no caption column 'text'; its columns: \['image', 'caption'"):
        ParquetSource(root, caption_column="text")
    with pytest.raises(ValueError, match=r"a.parquet column 'id' \(caption\) has the unsupported type int64"):
        ParquetSource(root, caption_column="id")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="x.parquet is not a readable Parquet file"):
        ParquetSource(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="no Parquet files at"):
        ParquetSource(tmp_path / "nothing-*.parquet")


def test_a_damaged_row_group_is_named(dataset: dict) -> None:
    """A damaged data page ended the run in pyarrow's OSError ("Couldn't deserialize thrift"), naming no file."""
    path = dataset["root"] / "a.parquet"
    data = bytearray(path.read_bytes())
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    src = ParquetSource(path)
    assert [p.key for p in src.iter_range(0, 3)] == [f"a-{i:07d}" for i in range(3)]  # row group 0 is intact
    with pytest.raises(ValueError, match=rf"^{path}: row group 1 \(rows 3\.\.5\) cannot be read \(OSError: .*\); the "
                       "file is damaged"):  # fmt: skip
        list(src.iter_range(2, 5))


def test_prepare_turns_parquet_rows_into_shards(dataset: dict, tmp_path: Path) -> None:
    """The command line end to end (micro VQGAN, tiny CLIP): every row becomes a document with its caption's tokens."""
    import torch
    from safetensors.torch import save_file

    from cm3leon_lightning.retrieval.encoder import create_clip
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    torch.manual_seed(0)
    VQGAN.from_name("micro").save_pretrained(tmp_path / "vqgan")
    with pytest.warns(UserWarning, match="randomly initialised"):
        clip = create_clip("cm3leon-clip-tiny", None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    out = tmp_path / "out"
    args = ["prepare", "--source", "parquet", "--input", str(dataset["root"]), "--key-column", "id", "--out", str(out),
            "--vqgan", str(tmp_path / "vqgan"), "--clip-model", "cm3leon-clip-tiny", "--clip-weights",
            str(tmp_path / "clip.safetensors"), "--train-tokenizer-vocab", "300", "--val-fraction", "0",
            "--search-k", "4", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cm3leon_main(args) == 0
    manifest = Manifest.load(out / "train" / "manifest.json")
    samples = {s.key: s for shard in manifest.shards for s in read_shard(out / "train" / shard.name, manifest)}
    captions = {str(i): p.caption for i, p in enumerate(dataset["pairs"])}
    assert {k: s.caption for k, s in samples.items()} == captions
    tok = TextTokenizer.load(out / "train" / "tokenizer.json")
    assert all(s.text.tolist() == tok.encode(s.caption) for s in samples.values())
    assert json.loads((out / "summary.json").read_text())["counts"]["read"] == 11


def test_files_of_one_name_in_several_folders_keep_distinct_keys(dataset: dict, tmp_path: Path) -> None:
    """The configurations of a Hub dataset repeat file names (``en/train-00000-of-00001.parquet``,
    ``de/train-...``): keys were ``{file stem}-{row}``, so every row of the second folder was dropped as a
    duplicate key, and its skip records named a file that two folders hold. Files of one folder keep their keys."""
    image = dataset["images"][0]
    for lang in ("de", "en"):
        (tmp_path / "hub" / lang).mkdir(parents=True)
        table = pa.table({"image": [image] * 2, "caption": [f"{lang} 0", f"{lang} 1"]})
        pq.write_table(table, tmp_path / "hub" / lang / "train-00000-of-00001.parquet")
    src = ParquetSource(tmp_path / "hub")
    assert [(p.key, p.caption, p.meta) for p in src] == [
        ("de_train-00000-of-00001-0000000", "de 0", {"file": "de/train-00000-of-00001.parquet", "row": 0}),
        ("de_train-00000-of-00001-0000001", "de 1", {"file": "de/train-00000-of-00001.parquet", "row": 1}),
        ("en_train-00000-of-00001-0000000", "en 0", {"file": "en/train-00000-of-00001.parquet", "row": 0}),
        ("en_train-00000-of-00001-0000001", "en 1", {"file": "en/train-00000-of-00001.parquet", "row": 1}),
    ]  # fmt: skip
    assert [p.key for p in ParquetSource(str(tmp_path / "hub" / "*" / "*.parquet")).iter_range(1, 3)] == [
        "de_train-00000-of-00001-0000001", "en_train-00000-of-00001-0000000",
    ]  # fmt: skip
    one = ParquetSource(tmp_path / "hub" / "en" / "train-00000-of-00001.parquet")  # a single file: its stem
    assert [p.key for p in one] == ["train-00000-of-00001-0000000", "train-00000-of-00001-0000001"]
    nested = ParquetSource(tmp_path / "hub" / "en")  # all in one folder below the one given: stems, as before
    assert [p.meta["file"] for p in nested] == ["train-00000-of-00001.parquet"] * 2
    # the plan records the new scheme where keys changed, so a preparation begun with the colliding stems is refused
    # on resume rather than mixing both; one folder's description (and its old plans) is unchanged
    assert src.describe()["keys"] == "relative path" and "keys" not in nested.describe()
    assert "keys" not in ParquetSource(tmp_path / "hub", key_column="caption").describe()


def test_training_the_tokenizer_reads_no_image(dataset: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer stage read every document whole, so a dataset with its images in the Parquet files was read once
    more just for its captions (``captions()`` skipped the images, but the stage did not call it); it now reads the
    caption and key columns only, and trains on the same training-split captions."""
    from cm3leon_lightning.data.prepare import PrepareConfig
    from cm3leon_lightning.data.prepare_encode import stage_tokenizer
    from cm3leon_lightning.data.prepare_run import Run, is_val
    from cm3leon_lightning.data.sources import clean_caption

    src = ParquetSource(dataset["root"], key_column="id")
    pairs = [(p.split_key, p.caption) for p in src]
    read: list[tuple[str, ...]] = []
    real = pq.ParquetFile.read_row_group

    def spy(self: pq.ParquetFile, i: int, columns: list[str] | None = None, **kwargs: object) -> pa.Table:
        read.append(tuple(columns or ()))
        return real(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    assert list(src.split_captions()) == pairs and set(read) == {("caption", "id")}
    read.clear()
    cfg = PrepareConfig(vqgan="v", clip_weights="c", train_tokenizer_vocab=300, val_fraction=0.3, progress=False)
    run = Run(cfg, tmp_path / "out", {"main": src})
    run.work.mkdir(parents=True)
    assert stage_tokenizer(run) == {"skipped": False, "vocab_size": 300}
    assert set(read) == {("caption", "id")}
    train = [clean_caption(c)[0] for k, c in pairs if not is_val(k, 0.3, 0)]
    assert 0 < len(train) < len(pairs)
    expected = TextTokenizer.train(train, 300).save(tmp_path / "expected.json")
    assert (run.work / "tokenizer.json").read_bytes() == Path(expected).read_bytes()
