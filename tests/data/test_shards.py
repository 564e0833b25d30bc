"""The shard format: writer, manifest, reader validation, plain-webdataset compatibility."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import IMAGE_TOKENIZER, TEXT_TOKENIZER, make_sample, write_dataset

from cm3leon_lightning.data.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardFormatError,
    ShardSample,
    ShardWriter,
    decode_sample,
    encode_sample,
    file_sha256,
    iter_tar_samples,
    read_shard,
    sanitize_key,
)


def test_write_and_read_back(tmp_path: Path) -> None:
    m = write_dataset(tmp_path, 10, 4)
    assert [(s.name, s.count) for s in m.shards] == [
        ("shard-000000.tar", 4),
        ("shard-000001.tar", 4),
        ("shard-000002.tar", 2),
    ]
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION == 1
    assert saved["created_by"].startswith("cm3leon_lightning ")
    assert saved["text_tokenizer"] == TEXT_TOKENIZER and saved["image_tokenizer"] == IMAGE_TOKENIZER
    assert saved["clip"] == {"model": "ViT-B-32", "dim": 512} and saved["retrieval"]["k"] == 4
    for s in saved["shards"]:
        assert s["sha256"] == file_sha256(tmp_path / s["name"])
    loaded = Manifest.load(tmp_path / "manifest.json")
    assert loaded.num_samples == 10 and loaded.vocab().image_tokens == 4
    got = [s for sh in loaded.shards for s in read_shard(tmp_path / sh.name, loaded)]
    for i, s in enumerate(got):
        want = make_sample(i)
        assert s.key == want.key and s.caption == want.caption
        assert s.text.tolist() == want.text.tolist() and s.image.tolist() == want.image.tolist()
        assert [(n.key, n.score, n.by) for n in s.neighbors] == [(n.key, n.score, n.by) for n in want.neighbors]
        for a, b in zip(s.neighbors, want.neighbors):
            assert a.text.tolist() == b.text.tolist() and a.image.tolist() == b.image.tolist()


def test_plain_webdataset_and_numpy_read_shards(tmp_path: Path) -> None:
    write_dataset(tmp_path, 6, 6)
    rows = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [r["__key__"] for r in rows] == [f"doc-{i:04d}" for i in range(6)]
    r = rows[2]
    assert set(r) >= {"caption.txt", "text.npy", "image.npy", "neighbors.json", "neighbors.npz"}
    text = np.load(io.BytesIO(r["text.npy"]), allow_pickle=False)
    image = np.load(io.BytesIO(r["image.npy"]), allow_pickle=False)
    assert text.dtype == np.int32 and text.tolist() == make_sample(2).text.tolist()
    assert image.dtype == np.int16 and image.tolist() == [2, 3, 4, 5]
    with np.load(io.BytesIO(r["neighbors.npz"]), allow_pickle=False) as npz:
        assert sorted(npz.files) == [f"{m}_{j}" for m in ("image", "text") for j in range(4)]
        assert npz["image_1"].tolist() == make_sample(2).neighbors[1].image.tolist()
    assert [n["by"] for n in json.loads(r["neighbors.json"])] == ["text", "image", "text", "image"]
    assert r["caption.txt"].decode() == "caption 2"


def test_writes_are_atomic_and_deterministic(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "a", TEXT_TOKENIZER, IMAGE_TOKENIZER, samples_per_shard=4)
    for i in range(6):  # one complete shard, one in progress; the writer is "killed" (never closed)
        w.write(make_sample(i))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [".shard-000001.tar.tmp", "shard-000000.tar"]  # no manifest: the dataset is not complete
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "b", TEXT_TOKENIZER, IMAGE_TOKENIZER) as w2:
        w2.write(make_sample(0))
        raise RuntimeError("killed")
    assert list((tmp_path / "b").iterdir()) == []
    m1, m2 = write_dataset(tmp_path / "c", 5, 2), write_dataset(tmp_path / "d", 5, 2)
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]  # byte-identical shards
    with pytest.raises(ValueError, match="exists"):
        write_dataset(tmp_path / "c", 1, 1)


def test_keys_are_sanitised_and_unique(tmp_path: Path) -> None:
    assert sanitize_key("a/b/../c.d.e") == "a_b____c_d_e"
    assert sanitize_key("img 001.jpg") == "img_001_jpg"
    with pytest.raises(ValueError, match="no usable"):
        sanitize_key("../")
    w = ShardWriter(tmp_path, TEXT_TOKENIZER, IMAGE_TOKENIZER)
    s = make_sample(0)
    s.key = "coco/train/1.jpg"
    assert w.write(s) == "coco_train_1_jpg"
    s2 = make_sample(1)
    s2.key = "coco/train/1_jpg"
    with pytest.raises(ValueError, match="duplicate key 'coco_train_1_jpg'"):
        w.write(s2)
    w.close()
    assert [x.key for x in read_shard(tmp_path / "shard-000000.tar", Manifest.load(tmp_path / "manifest.json"))] == [
        "coco_train_1_jpg"
    ]


def test_writer_refuses_samples_the_reader_would_skip(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, TEXT_TOKENIZER, IMAGE_TOKENIZER)
    bad = make_sample(0)
    bad.image = np.zeros(5, dtype=np.int16)
    with pytest.raises(ShardFormatError, match="5 image codes; expected grid_h\\*grid_w = 4"):
        w.write(bad)
    bad = make_sample(1)
    bad.text = np.array([13, 64])
    with pytest.raises(ShardFormatError, match=r"text id 64 outside the allowed range \[13, 64\)"):
        w.write(bad)


def npy(values: list) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(values, dtype=np.int16), allow_pickle=False)
    return buf.getvalue()


def _members(i: int = 0) -> dict[str, bytes]:
    return encode_sample(make_sample(i), Manifest(TEXT_TOKENIZER, IMAGE_TOKENIZER).vocab())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.update({"text.npy": b"garbage"}), "corrupt_member"),
        (lambda m: m.update({"neighbors.json": b"{not json"}), "corrupt_member"),
        (lambda m: m.pop("image.npy"), "missing_field"),
        (lambda m: m.update({"text.npy": npy([20, 1, 30])}), "ids_out_of_range"),  # <eos> inside a caption
        (lambda m: m.update({"image.npy": npy([0, 1, 2, 40])}), "ids_out_of_range"),
        (lambda m: m.update({"image.npy": npy([0, 1, 2])}), "image_length"),
        (lambda m: m.update({"image.npy": npy([[0, 1], [2, 3]])}), "corrupt_member"),
        (lambda m: m.update({"neighbors.npz": b"PK garbage"}), "corrupt_member"),
        (lambda m: m.update({"extra.pkl": b"\x80\x04K\x01."}), "forbidden_member"),
        (lambda m: m.update({"pyd": b"\x80\x04K\x01."}), "forbidden_member"),
    ],
)
def test_reader_rejects_bad_samples_with_a_reason(mutate, reason) -> None:
    vocab = Manifest(TEXT_TOKENIZER, IMAGE_TOKENIZER).vocab()
    members = _members(3)
    mutate(members)
    with pytest.raises(ShardFormatError) as err:
        decode_sample("doc", members, vocab)
    assert err.value.reason == reason


def test_read_shard_errors_name_the_shard_and_the_key(tmp_path: Path) -> None:
    """A bad sample's error named its key only; among thousands of shards the user could not tell which to fix."""
    m = write_dataset(tmp_path, 4, 4)
    path = tmp_path / "shard-000000.tar"
    items = list(iter_tar_samples(io.BytesIO(path.read_bytes())))
    items[2][1]["image.npy"] = npy([0, 1, 2])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in items:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    got = []
    with pytest.raises(ShardFormatError) as err:
        for sample in read_shard(path, m):
            got.append(sample.key)
    assert got == ["doc-0000", "doc-0001"] and err.value.reason == "image_length"
    assert str(err.value) == f"shard {path}: sample 'doc-0002' image.npy: 3 image codes; expected grid_h*grid_w = 4"


def test_truncated_tar_yields_complete_samples_then_fails(tmp_path: Path) -> None:
    write_dataset(tmp_path, 4, 4)
    data = (tmp_path / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        cut = tf.getmembers()[7].offset_data + 10  # inside the second sample's image.npy
    got = []
    with pytest.raises(ShardFormatError) as err:
        for key, _ in iter_tar_samples(io.BytesIO(data[:cut]), "half"):
            got.append(key)
    assert err.value.reason == "corrupt_shard" and "half" in str(err.value)
    assert got == ["doc-0000"]  # the sample cut in the middle is not yielded
    with pytest.raises(ShardFormatError):
        list(iter_tar_samples(io.BytesIO(b"\x01" * 1024), "noise"))


def test_tar_cut_between_members_fails(tmp_path: Path) -> None:
    """A tar cut exactly at a member boundary reads as a shorter tar to tarfile; the missing end-of-archive
    marker gives it away, and the sample read last (whose other members may be lost) is not yielded."""
    write_dataset(tmp_path, 4, 4)
    data = (tmp_path / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        members = tf.getmembers()
    assert len(members) > 9 and members[-1].offset_data + members[-1].size < len(data)
    for cut_before, want in ((members[8], ["doc-0000"]), (members[-1], ["doc-0000", "doc-0001", "doc-0002"])):
        got = []
        with pytest.raises(ShardFormatError, match="end-of-archive") as err:
            for key, _ in iter_tar_samples(io.BytesIO(data[: cut_before.offset]), "cut"):
                got.append(key)
        assert err.value.reason == "corrupt_shard" and got == want
    whole = [key for key, _ in iter_tar_samples(io.BytesIO(data), "whole")]
    assert whole == ["doc-0000", "doc-0001", "doc-0002", "doc-0003"]
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    assert [k for k, _ in iter_tar_samples(io.BytesIO(data[: end + 512]), "one zero block")] == whole


def test_tar_cut_inside_a_header_or_with_a_garbled_header_fails(tmp_path: Path) -> None:
    """tarfile also stops without a word inside a member header and at a header that is neither valid nor zeros."""
    write_dataset(tmp_path, 4, 4)
    data = (tmp_path / "shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        header = tf.getmembers()[8].offset  # the third sample's first header
    for cut in (1, 100, 511):
        with pytest.raises(ShardFormatError, match=f"end-of-archive marker at byte {header}: cut off"):
            list(iter_tar_samples(io.BytesIO(data[: header + cut]), "cut"))
    garbled = data[:header] + b"\x07" * 512 + data[header + 512 :]
    got = []
    with pytest.raises(ShardFormatError, match="a garbled member header"):
        for key, _ in iter_tar_samples(io.BytesIO(garbled), "garbled"):
            got.append(key)
    assert got == ["doc-0000"]


def test_manifest_validation(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2, 2)
    d = json.loads((tmp_path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="format_version 3 is not supported"):
        Manifest.from_dict({**d, "format_version": 3})
    with pytest.raises(ValueError, match=r"image_tokenizer lacks \['grid_w'\]"):
        Manifest.from_dict({**d, "image_tokenizer": {"n_codes": 32, "grid_h": 2}})
    bad_shards = (
        ("count", -3, "count must be an integer >= 0, got -3"), ("count", 4.5, "count must be an integer"),
        ("count", "4", "count must be an integer"), ("name", 7, r"shards\[0\].name must be a non-empty string, got 7"),
    )  # fmt: skip
    for field, value, message in bad_shards:  # a count of -3 lost samples silently; "4" raised a bare TypeError
        shards = [dict(x) for x in d["shards"]]
        shards[0][field] = value
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict({**d, "shards": shards})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read manifest .*bad.json"):
        Manifest.load(tmp_path / "bad.json")


def test_a_format_version_of_another_type_or_a_manifest_not_an_object_is_named(tmp_path: Path) -> None:
    """A hand-edited ``"format_version": "1"`` was refused as "format_version 1 is not supported (expected 1 or 2)",
    ``true`` was read as version 1, and a manifest holding a JSON number raised "argument of type 'int' is not
    iterable"."""
    write_dataset(tmp_path, 2, 2)
    d = json.loads((tmp_path / "manifest.json").read_text())
    for value in ("1", True, 1.0):
        with pytest.raises(ValueError, match=rf"format_version {value!r} is not supported \(expected the integer 1 "
                           r"or 2\)"):  # fmt: skip
            Manifest.from_dict({**d, "format_version": value})
    assert Manifest.from_dict({**d, "format_version": 2}).format_version == 2
    (tmp_path / "number.json").write_text("5")
    with pytest.raises(ValueError, match=r"cannot read manifest .*number.json: a manifest is a JSON object, got int"):
        Manifest.load(tmp_path / "number.json")


def test_tar_members_have_fixed_headers(tmp_path: Path) -> None:
    write_dataset(tmp_path, 1, 1)
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos] == [
        "doc-0000.caption.txt",
        "doc-0000.text.npy",
        "doc-0000.image.npy",
        "doc-0000.neighbors.json",
        "doc-0000.neighbors.npz",
    ]
    assert {(i.mtime, i.mode) for i in infos} == {(0, 0o644)}


def _segment_sample(i: int = 0) -> ShardSample:
    s = make_sample(i, n_neighbors=0)
    s.segments = [("text", np.array([20, 21])), ("image", np.array([1, 2, 3, 4])), ("text", np.array([30])),
                  ("image", np.array([5, 6, 7, 8]))]  # fmt: skip
    return s


def test_documents_with_segments_round_trip_and_raise_the_format_version(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "plain", TEXT_TOKENIZER, IMAGE_TOKENIZER) as w:
        w.write(make_sample(0))
    assert Manifest.load(tmp_path / "plain" / "manifest.json").format_version == 1
    with ShardWriter(tmp_path / "seg", TEXT_TOKENIZER, IMAGE_TOKENIZER) as w:
        w.write(make_sample(0))
        w.write(_segment_sample(1))
    m = Manifest.load(tmp_path / "seg" / "manifest.json")
    assert m.format_version == 2  # an older reader refuses the dataset rather than dropping the segments
    plain, seg = list(read_shard(tmp_path / "seg" / m.shards[0].name, m))
    assert plain.segments is None
    assert [(k, a.tolist()) for k, a in seg.segments] == [
        ("text", [20, 21]), ("image", [1, 2, 3, 4]), ("text", [30]), ("image", [5, 6, 7, 8])
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.pop("segments.npz"), "missing_field"),
        (lambda m: m.update({"segments.json": b'["text", "audio"]'}), "corrupt_member"),
        (lambda m: m.update({"segments.json": b'["text", "image", "text", "image", "text"]'}), "missing_field"),
        (lambda m: m.update({"segments.json": b'["text", "text", "text", "image"]'}), "ids_out_of_range"),
        (lambda m: m.update({"segments.json": b'["image", "image", "text", "image"]'}), "image_length"),
        (lambda m: m.update({"segments.npz": b"PK garbage"}), "corrupt_member"),
    ],
)
def test_reader_rejects_bad_segments_with_a_reason(mutate, reason) -> None:
    vocab = Manifest(TEXT_TOKENIZER, IMAGE_TOKENIZER).vocab()
    members = encode_sample(_segment_sample(), vocab)
    mutate(members)
    with pytest.raises(ShardFormatError) as err:
        decode_sample("doc", members, vocab)
    assert err.value.reason == reason


def test_manifest_errors_name_the_field_and_refuse_what_was_misread(tmp_path: Path) -> None:
    """n_text 64.7 became 64 and grid_h true became 1 without a word; a shard listed twice was read twice an epoch;
    other bad entries raised bare TypeErrors ("ShardInfo() argument after ** must be a mapping")."""
    write_dataset(tmp_path, 4, 2)
    d = json.loads((tmp_path / "manifest.json").read_text())
    cases = (
        ("text_tokenizer", "n_text", 64.7, r"text_tokenizer.n_text must be an integer, got 64.7"),
        ("text_tokenizer", "num_sentinels", "8", r"text_tokenizer.num_sentinels must be an integer, got '8'"),
        ("image_tokenizer", "grid_h", True, r"image_tokenizer.grid_h must be an integer, got True"),
        ("image_tokenizer", "n_codes", None, r"image_tokenizer.n_codes must be an integer, got None"),
    )
    for section, key, value, message in cases:
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict({**d, section: {**d[section], key: value}})
    with pytest.raises(ValueError, match="manifest text_tokenizer must be an object, got None"):
        Manifest.from_dict({**d, "text_tokenizer": None})
    first, second = d["shards"]
    bad_shards = (
        ({"a": first}, r"manifest shards must be a list of \{name, count, sha256\}, got dict"),
        ([first, "shard-000001.tar"], r"manifest shards\[1\] must be an object"),
        ([first, {"name": second["name"], "count": 2}], r"manifest shards\[1\] lacks \['sha256'\]"),
        ([first, {**second, "size": 9}], r"manifest shards\[1\] has unknown field\(s\) \['size'\]"),
        ([first, second, first], r"manifest shards\[2\] \(shard-000000.tar\) repeats the name of shards\[0\]"),
    )
    for shards, message in bad_shards:
        with pytest.raises(ValueError, match=message):
            Manifest.from_dict({**d, "shards": shards})
    assert Manifest.from_dict(d).vocab().n_text == 64
