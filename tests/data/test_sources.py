"""The raw-pair readers of `cm3leon prepare` and their caption / image cleaning rules, on tiny fixtures."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon_lightning.data.shapes import generate_pairs
from cm3leon_lightning.data.sources import (
    BadInput,
    CocoSource,
    FolderSource,
    RawPair,
    ShapesSource,
    WebDatasetSource,
    clean_caption,
    load_image,
    make_source,
    source_jpeg,
)


def _png(colour: tuple[int, ...], size: int = 40, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ cleaning
def test_clean_caption_rules() -> None:
    assert clean_caption(b"\xef\xbb\xbf  a red\tcircle \n") == ("a red circle", [])  # BOM, control chars, spaces
    assert clean_caption("caf\u00e9") == ("caf\u00e9", [])
    assert clean_caption(b"caf\xe9 au lait") == ("caf\ufffd au lait", ["repaired_caption_non_utf8"])
    assert clean_caption("one two three four", max_chars=12) == ("one two", ["repaired_caption_truncated"])
    assert clean_caption("abcdefghijkl", max_chars=5) == ("abcde", ["repaired_caption_truncated"])
    text, repairs = clean_caption(b"word " * 200_000, max_chars=1000)  # a megabyte-long caption
    assert len(text) <= 1000 and text.endswith("word") and repairs == ["repaired_caption_truncated"]
    for raw, reason in ((None, "caption_missing"), (b"", "caption_empty"), (" \n\t\x00 ", "caption_empty")):
        with pytest.raises(BadInput) as e:
            clean_caption(raw)
        assert e.value.reason == reason


def test_load_image_rules(tmp_path: Path) -> None:
    img, repairs = load_image(_jpeg((200, 10, 10)))
    assert img.mode == "RGB" and img.size == (40, 40) and repairs == []
    grey, repairs = load_image(_png((128,), mode="L"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128) and repairs == ["repaired_image_mode"]
    clear, _ = load_image(_png((255, 0, 0, 0), mode="RGBA"))  # fully transparent -> white
    assert clear.getpixel((3, 3)) == (255, 255, 255)
    arr, repairs = load_image(np.full((32, 48, 3), 7, np.uint8))
    assert arr.size == (48, 32) and repairs == []
    good = _jpeg((0, 200, 0), size=64)
    (tmp_path / "ok.jpg").write_bytes(good)
    assert load_image(tmp_path / "ok.jpg")[0].size == (64, 64)
    cases = [
        (None, "image_missing"),
        (tmp_path / "nope.jpg", "image_missing"),
        (b"not an image at all", "image_unreadable"),
        (good[: len(good) // 2], "image_unreadable"),  # truncated JPEG
        (_png((1, 2, 3), size=8), "image_too_small"),
    ]
    for raw, reason in cases:
        with pytest.raises(BadInput) as e:
            load_image(raw, min_size=32)
        assert e.value.reason == reason, raw if not isinstance(raw, bytes) else len(raw)


def test_source_jpeg_keeps_jpeg_bytes_and_encodes_others() -> None:
    jpg = _jpeg((1, 2, 3))
    assert source_jpeg(jpg, Image.open(io.BytesIO(jpg))) == jpg
    png = _png((9, 9, 9))
    out = source_jpeg(png, Image.open(io.BytesIO(png)).convert("RGB"))
    assert out[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(out)).size == (40, 40)


# ------------------------------------------------------------------------------------------------- sources
def test_folder_source(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").write_bytes(_png((1, 1, 1)))
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.jpg").write_bytes(_jpeg((2, 2, 2)))
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "sub" / "c.jpeg").write_bytes(_jpeg((3, 3, 3)))  # no sidecar
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    src = FolderSource(tmp_path)
    pairs = list(src)
    assert len(src) == 3
    assert [(p.key, p.caption) for p in pairs] == [("a", b"first"), ("b", b"second"), ("sub_c", None)]
    assert pairs[2].image == tmp_path / "sub" / "c.jpeg" and pairs[2].meta == {"file": "sub/c.jpeg"}
    assert [p.key for p in src.iter_range(1, 99)] == ["b", "sub_c"]
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_coco_source_first_and_all(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    data = {
        "images": [{"id": 7, "file_name": "7.jpg"}, {"id": 3, "file_name": "3.jpg"}, {"id": 5, "file_name": "5.jpg"}],
        "annotations": [
            {"id": 20, "image_id": 7, "caption": "seven b"},
            {"id": 11, "image_id": 7, "caption": "seven a"},
            {"id": 12, "image_id": 3, "caption": "three"},
        ],
    }
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data))
    first = CocoSource(ann, tmp_path / "img")
    assert [(p.key, p.caption) for p in first] == [("coco-3", "three"), ("coco-5", None), ("coco-7", "seven a")]
    assert first.docs[2][1] == "7.jpg" and list(first.iter_range(2, 3))[0].image == tmp_path / "img" / "7.jpg"
    every = CocoSource(ann, tmp_path / "img", mode="all")
    assert [p.key for p in every] == ["coco-3-12", "coco-5", "coco-7-11", "coco-7-20"]
    assert list(every)[3].meta == {"file": "7.jpg", "image_id": 7, "annotation_id": 20}
    # the two captions of image 7 share a split key, so they can never land in different splits
    assert [p.split_key for p in every] == ["coco-3", "coco-5", "coco-7", "coco-7"]
    ann.write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO captions file"):
        CocoSource(ann, tmp_path / "img")


def test_webdataset_source(tmp_path: Path) -> None:
    _tar(tmp_path / "s-0.tar", [("k0", {"jpg": _jpeg((1, 1, 1)), "txt": b"zero"}), ("k1", {"txt": b"no image"})])
    _tar(tmp_path / "s-1.tar", [(f"k{i}", {"png": _png((i, i, i)), "txt": f"cap {i}".encode()}) for i in (2, 3, 4)])
    src = WebDatasetSource(tmp_path)
    assert (len(src), src.counts) == (5, [2, 3])
    pairs = list(src)
    assert [(p.key, p.caption) for p in pairs] == [
        ("k0", b"zero"), ("k1", b"no image"), ("k2", b"cap 2"), ("k3", b"cap 3"), ("k4", b"cap 4"),
    ]  # fmt: skip
    assert pairs[1].image is None and pairs[3].image[:4] == b"\x89PNG" and pairs[3].meta["shard"] == "s-1.tar"
    assert [p.key for p in src.iter_range(1, 4)] == ["k1", "k2", "k3"]  # across the tar boundary
    assert [p.key for p in WebDatasetSource(str(tmp_path / "s-{0..1}.tar")).iter_range(3, 5)] == ["k3", "k4"]
    # A truncated tar contributes the samples before the damage and is reported.
    raw = (tmp_path / "s-1.tar").read_bytes()
    (tmp_path / "s-1.tar").write_bytes(raw[:3000])  # cut inside k3's image
    damaged = WebDatasetSource(tmp_path)
    assert damaged.damaged == [str(tmp_path / "s-1.tar")] and damaged.counts == [2, 1]
    assert [p.key for p in damaged] == ["k0", "k1", "k2"]


def test_shapes_source_matches_generate_pairs() -> None:
    src = ShapesSource(12, split="heldout", image_size=32, seed=3)
    expected = list(generate_pairs(12, "heldout", 32, 3))
    got = list(src.iter_range(4, 9))
    assert [p.key for p in got] == [e.key for e in expected[4:9]]
    assert [p.caption for p in got] == [e.caption for e in expected[4:9]]
    assert all(np.array_equal(p.image, e.image) for p, e in zip(got, expected[4:9]))
    assert isinstance(got[0], RawPair) and len(src) == 12


def test_make_source_errors(tmp_path: Path) -> None:
    assert isinstance(make_source("shapes", num_pairs=3), ShapesSource)
    with pytest.raises(ValueError, match="one of shapes, folder, coco, wds"):
        make_source("laion", tmp_path)
    with pytest.raises(ValueError, match="needs an input path"):
        make_source("folder")
    with pytest.raises(ValueError, match="captions JSON"):
        make_source("coco", tmp_path)
    with pytest.raises(FileNotFoundError):
        make_source("folder", tmp_path / "missing")
    with pytest.raises(ValueError, match="range"):
        list(ShapesSource(3).iter_range(2, 1))
