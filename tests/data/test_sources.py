"""The raw-pair readers of `cm3leon prepare` and their caption / image cleaning rules, on tiny fixtures."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon_lightning.data import cleaning
from cm3leon_lightning.data.shapes import generate_pairs
from cm3leon_lightning.data.sources import (
    BadInput,
    CocoSource,
    FolderSource,
    PairSource,
    RawPair,
    ShapesSource,
    WebDatasetSource,
    clean_caption,
    document_key,
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
    # an unpaired surrogate (a JSON "\\ud83d" escape, as in a COCO file) reached the tokenizer and stopped the run
    assert clean_caption("a dog \ud83d  and\udc00 a cat") == (
        "a dog \ufffd and\ufffd a cat",
        ["repaired_caption_non_utf8"],
    )
    assert clean_caption(json.loads('"a cat \\ud83d\\ude00"')) == ("a cat \U0001f600", [])  # a pair is one character
    for raw, reason in ((None, "caption_missing"), (b"", "caption_empty"), (" \n\t\x00 ", "caption_empty")):
        with pytest.raises(BadInput) as e:
            clean_caption(raw)
        assert e.value.reason == reason


def test_clean_caption_gives_bytes_the_text_of_the_string() -> None:
    """Whitespace is collapsed before the length limit applies, so a long run of it before (or between) the words
    cannot push them out of a caption given as bytes (it did: the bytes were cut first, leaving only spaces)."""
    for raw, max_chars, expected in [
        (" " * 9000 + "a red circle", 1000, ("a red circle", [])),
        ("a" + " \t\n" * 40_000 + "red circle", 1000, ("a red circle", [])),  # crosses the piece boundary
        ("\u00e9" + " " * 70_000 + "\u20ac\U0001f600 " * 400, 9, ("\u00e9 \u20ac\U0001f600 \u20ac\U0001f600",
                                                                  ["repaired_caption_truncated"])),
    ]:  # fmt: skip
        assert clean_caption(raw, max_chars) == expected
        assert clean_caption(raw.encode(), max_chars) == expected
        assert clean_caption(b"\xef\xbb\xbf" + raw.encode(), max_chars) == expected
    with pytest.raises(BadInput) as e:
        clean_caption(b" " * 1_000_000)
    assert e.value.reason == "caption_empty"


def test_clean_caption_reads_bytes_in_pieces_that_never_split_a_character(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cleaning, "_PIECE", 5)
    text = "caf\u00e9 \u20ac\U0001f600 na\u00efve  \u3000 end"
    assert clean_caption(text.encode(), 100) == ("caf\u00e9 \u20ac\U0001f600 na\u00efve end", [])
    bad = b"ab\xf0\x9f\x98\x80\x80\x80\x80\x80\x80 \xe9z"  # an emoji, 5 stray continuation bytes, a latin-1 byte
    assert clean_caption(bad, 100) == ("ab\U0001f600" + "\ufffd" * 5 + " \ufffdz", ["repaired_caption_non_utf8"])
    assert clean_caption(b"caf\xe9", 100) == ("caf\ufffd", ["repaired_caption_non_utf8"])


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


def test_exif_orientation_is_applied_everywhere_images_are_converted() -> None:
    """A photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view) is read upright by
    preparation (counted), and by ``to_rgb``/``fid_resize``, which inference, evaluation and the training data modules
    share; orientation 1 and no EXIF leave the pixels as stored."""
    from cm3leon_lightning.metrics.fid import fid_resize

    stored = np.zeros((40, 64, 3), np.uint8)  # 64 wide, 40 high as stored
    stored[:, :, 0] = np.arange(64, dtype=np.uint8)[None, :] * 3
    stored[:, :, 1] = np.arange(40, dtype=np.uint8)[:, None] * 5

    def encoded(orientation: int | None) -> bytes:
        buf = io.BytesIO()
        exif = Image.Exif()
        if orientation is not None:
            exif[cleaning.EXIF_ORIENTATION] = orientation
        Image.fromarray(stored).save(buf, format="PNG", exif=exif.tobytes())
        return buf.getvalue()

    upright = np.rot90(stored, k=-1)  # turned 90 degrees clockwise: 40 wide, 64 high
    img, repairs = load_image(encoded(6))
    assert img.size == (40, 64) and np.array_equal(np.asarray(img), upright)
    assert repairs == ["repaired_image_orientation"]
    with Image.open(io.BytesIO(encoded(6))) as raw:
        assert np.array_equal(np.asarray(cleaning.to_rgb(raw)), upright)
    mirrored, _ = load_image(encoded(2))  # 2: mirrored left-right
    assert np.array_equal(np.asarray(mirrored), stored[:, ::-1])
    for orientation in (None, 1):
        img, repairs = load_image(encoded(orientation))
        assert np.array_equal(np.asarray(img), stored) and repairs == []
    square = fid_resize(encoded(6), 40)  # the centre 40 x 40 of the upright image
    assert np.array_equal(square.permute(1, 2, 0).numpy(), upright[12:52])


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


def test_no_source_but_instruction_tuning_makes_sft_keys(tmp_path: Path) -> None:
    """Training skips a too-long ``sft-`` document rather than cutting its caption: a folder named ``sft-photos``
    had its pretraining captions skipped."""
    assert [document_key(k) for k in ("sft-photos/cat", "sft-1", "sftx", "a/sft-b", "SFT-c")] == [
        "data-sft-photos_cat", "data-sft-1", "sftx", "a_sft-b", "SFT-c",
    ]  # fmt: skip
    (tmp_path / "img" / "sft-photos").mkdir(parents=True)
    (tmp_path / "img" / "sft-photos" / "cat.png").write_bytes(_png((1, 2, 3)))
    assert [p.key for p in FolderSource(tmp_path / "img")] == ["data-sft-photos_cat"]


def test_non_ascii_ids_become_distinct_keys(tmp_path: Path) -> None:
    """A file named ``猫.png`` stopped the run (its key had no usable character), and ``sub/夏`` / ``sub/冬`` both
    became ``sub__``, the second dropped as a duplicate; ASCII ids keep the keys they had."""
    assert [document_key(k) for k in ("猫", "犬", "sub/夏", "sub/冬", "café", "...", "sub/cat", "a.b")] == [
        "id-a68cf446", "id-35e9595e", "sub__-46fcfece", "sub__-86610aa4", "caf_-2d03c5d6", "id-7456c252",
        "sub_cat", "a_b",
    ]  # fmt: skip
    (tmp_path / "img" / "sub").mkdir(parents=True)
    for name in ("猫", "犬", "sub/夏", "sub/冬", "a"):
        (tmp_path / "img" / f"{name}.png").write_bytes(_png((1, 2, 3)))
    assert [p.key for p in FolderSource(tmp_path / "img")] == [
        "a", "sub__-86610aa4", "sub__-46fcfece", "id-35e9595e", "id-a68cf446",
    ]  # fmt: skip
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "s.tar", [("猫", {"png": _png((1, 1, 1)), "txt": b"a cat"}), ("k", {"txt": b"k"})])
    assert [p.key for p in WebDatasetSource(tmp_path / "wds")] == ["id-a68cf446", "k"]


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


def test_coco_first_mode_takes_the_first_caption_with_text(tmp_path: Path) -> None:
    """A blank or missing lowest-id caption cost the image in ``first`` mode though it had others (found in review)."""
    (tmp_path / "img").mkdir()
    data = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 5, "image_id": 1, "caption": " \n\t "},
            {"id": 6, "image_id": 1},
            {"id": 7, "image_id": 1, "caption": "a dog"},
            {"id": 9, "image_id": 1, "caption": "a cat"},
            {"id": 3, "image_id": 2, "caption": "  "},
        ],
    }
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data))
    first = list(CocoSource(ann, tmp_path / "img"))
    assert [(p.key, p.caption, p.meta["annotation_id"]) for p in first] == [("coco-1", "a dog", 7), ("coco-2", "  ", 3)]
    every = CocoSource(ann, tmp_path / "img", mode="all")
    assert [(p.key, p.caption) for p in every] == [
        ("coco-1-5", " \n\t "), ("coco-1-6", None), ("coco-1-7", "a dog"), ("coco-1-9", "a cat"), ("coco-2-3", "  ")
    ]  # fmt: skip


def test_coco_duplicate_and_unknown_ids(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    ann = tmp_path / "captions.json"
    images = [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "1.jpg"}]  # a repeated entry is harmless
    # two annotations of one id, one without a caption: sorting compared the captions (None < str) and the file was
    # called "not a COCO captions file"; source order is kept (the first of a duplicate key wins in prepare)
    anns = [{"id": 4, "image_id": 1, "caption": "b"}, {"id": 4, "image_id": 1}, {"id": 2, "image_id": 1}]
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    assert [(p.key, p.caption) for p in CocoSource(ann, tmp_path / "img", mode="all")] == [
        ("coco-1-2", None), ("coco-1-4", "b"), ("coco-1-4", None)
    ]  # fmt: skip
    assert [(p.key, p.caption) for p in CocoSource(ann, tmp_path / "img")] == [("coco-1", "b")]
    # one id, two files: the last silently won
    images.append({"id": 1, "file_name": "other.jpg"})
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.raises(ValueError, match=r"captions\.json: image id 1 has two file names: '1\.jpg' and 'other\.jpg'"):
        CocoSource(ann, tmp_path / "img")
    # captions of images the file does not list were dropped without a word
    anns += [{"id": 8, "image_id": 3, "caption": "c"}, {"id": 9, "image_id": 3, "caption": "d"}]
    ann.write_text(json.dumps({"images": images[:1], "annotations": anns}))
    with pytest.warns(UserWarning, match=r"captions\.json: 2 caption\(s\) of image ids not listed in 'images' are left "
                      r"out: ids \[3\]"):  # fmt: skip
        assert [p.key for p in CocoSource(ann, tmp_path / "img")] == ["coco-1"]


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
    # A truncated tar contributes the samples before the damage and is reported (named in a warning: it was only
    # listed in an attribute nothing read, so a truncated download lost its tail without a word).
    raw = (tmp_path / "s-1.tar").read_bytes()
    (tmp_path / "s-1.tar").write_bytes(raw[:3000])  # cut inside k3's image
    message = "1 WebDataset tar(s) are truncated or damaged; only the samples before the damage are read: "
    message += f"{tmp_path / 's-1.tar'} (1 read)"
    with pytest.warns(UserWarning) as caught:
        damaged = WebDatasetSource(tmp_path)
    assert [str(w.message) for w in caught] == [message]
    assert damaged.damaged == [str(tmp_path / "s-1.tar")] and damaged.counts == [2, 1]
    assert [p.key for p in damaged] == ["k0", "k1", "k2"]
    # Cut exactly where k4's members begin (an interrupted copy): reported too, not read as a 2-sample tar.
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        k4 = next(m for m in tf.getmembers() if m.name.startswith("k4"))
    (tmp_path / "s-1.tar").write_bytes(raw[: k4.offset])
    with pytest.warns(UserWarning, match="truncated or damaged"):
        cut = WebDatasetSource(tmp_path)
    assert cut.damaged == [str(tmp_path / "s-1.tar")] and cut.counts == [2, 1]


def test_bzip2_and_xz_tars_are_read_as_webdataset_reads_them(tmp_path: Path) -> None:
    """Only gzip was recognised (a .tar.xz was read as a plain tar: "truncated or damaged", 0 samples), while
    WebDataset and the VQGAN's image shards read bzip2 and xz too; a directory now lists .tar.bz2 and .tar.xz."""
    import bz2
    import lzma

    samples = [(f"k{i}", {"jpg": _jpeg((i, i, i)), "txt": f"cap {i}".encode()}) for i in range(3)]
    _tar(tmp_path / "plain.tar", samples)
    raw = (tmp_path / "plain.tar").read_bytes()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.tar.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "c" / "b.tar.xz").write_bytes(lzma.compress(raw))
    (tmp_path / "c" / "notes.txt").write_text("not a shard")
    src = WebDatasetSource(tmp_path / "c")
    assert src.tars == [tmp_path / "c" / "a.tar.bz2", tmp_path / "c" / "b.tar.xz"] and src.counts == [3, 3]
    plain = [(p.key, p.caption, p.image) for p in WebDatasetSource(tmp_path / "plain.tar")]
    assert [(p.key, p.caption, p.image) for p in src] == plain * 2 and not src.damaged
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^no .tar / .tar.gz / .tgz / .tar.bz2 / .tar.xz shards in "):
        WebDatasetSource(tmp_path / "empty")


def test_gzipped_tars_are_read_and_scattered_members_named(tmp_path: Path) -> None:
    """Gzipped tars (which WebDataset reads) were reported as truncated with 0 samples read, then "the source has no
    documents"; a tar written as ``tar cf x.tar *.jpg *.txt`` (each sample's members apart) lost every document to
    caption_missing / image_missing without a word on why."""
    import gzip

    samples = [(f"k{i}", {"jpg": _jpeg((i, i, i)), "txt": f"cap {i}".encode()}) for i in range(3)]
    _tar(tmp_path / "plain.tar", samples)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "s-0.tar.gz").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    raw = (tmp_path / "plain.tar").read_bytes()
    with tarfile.open(tmp_path / "plain.tar") as tf:
        k2 = next(m for m in tf.getmembers() if m.name.startswith("k2"))
    (tmp_path / "gz" / "s-1.tgz").write_bytes(gzip.compress(raw[: k2.offset]))  # a truncated copy, gzipped
    with pytest.warns(UserWarning, match=r"truncated or damaged; .*s-1.tgz \(1 read\)"):
        src = WebDatasetSource(tmp_path / "gz")  # a directory lists .tar.gz and .tgz too
    assert src.counts == [3, 1]  # as for a plain tar: the last sample before the damage may be cut off
    assert [(p.key, p.caption) for p in src.iter_range(2, 4)] == [("k2", b"cap 2"), ("k0", b"cap 0")]
    assert src.damaged == [str(tmp_path / "gz" / "s-1.tgz")] and not src.scattered
    assert [p.key for p in WebDatasetSource(str(tmp_path / "gz" / "s-0.tar.gz"))] == ["k0", "k1", "k2"]
    apart_members = [(k, {"jpg": m["jpg"]}) for k, m in samples] + [(k, {"txt": m["txt"]}) for k, m in samples]
    _tar(tmp_path / "apart.tar", apart_members)
    message = (
        f"1 WebDataset tar(s) hold samples whose members are not next to each other, so (as WebDataset groups "
        f"consecutive members) their images and captions are read as separate documents and skipped: "
        f"{tmp_path / 'apart.tar'}; write each sample's members together (e.g. tar --sort=name)"
    )
    with pytest.warns(UserWarning) as caught:
        apart = WebDatasetSource([tmp_path / "plain.tar", tmp_path / "apart.tar"])
    assert [str(w.message) for w in caught] == [message] and apart.scattered == [str(tmp_path / "apart.tar")]
    assert apart.counts == [3, 6]


def test_webdataset_keys_keep_folders_and_lower_case_extensions(tmp_path: Path) -> None:
    """Members group as webdataset groups them: ``cats/000`` and ``dogs/000`` are two samples (they were merged,
    losing one), and ``000.JPG`` / ``000.TXT`` are the ``jpg`` and ``txt`` members (they were not found)."""
    import webdataset as wds

    members = [
        ("cats/000.jpg", _jpeg((255, 0, 0))), ("cats/000.txt", b"a red cat"),
        ("dogs/000.jpg", _jpeg((0, 0, 255))), ("dogs/000.txt", b"a blue dog"),
        ("001.JPG", _jpeg((0, 0, 0))), ("001.TXT", b"a black square"),
        ("v1.2/002.Png", _png((9, 9, 9))), ("v1.2/002.caption.TXT", b"a dotted folder"),
        ("README", b"no extension"), (".hidden", b"a hidden file"),
    ]  # fmt: skip
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    pairs = list(WebDatasetSource(tmp_path))
    assert [(p.key, p.meta["key"], p.caption) for p in pairs] == [
        ("cats_000", "cats/000", b"a red cat"), ("dogs_000", "dogs/000", b"a blue dog"),
        ("001", "001", b"a black square"), ("v1_2_002", "v1.2/002", b"a dotted folder"),
    ]  # fmt: skip
    assert [p.image for p in pairs] == [members[0][1], members[2][1], members[4][1], members[6][1]]
    plain = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in wds.WebDataset(
        str(tmp_path / "s.tar"), shardshuffle=False)]  # fmt: skip
    assert plain == [("cats/000", ["jpg", "txt"]), ("dogs/000", ["jpg", "txt"]), ("001", ["jpg", "txt"]),
                     ("v1.2/002", ["caption.txt", "png"])]  # fmt: skip


def test_fingerprints_change_with_the_input_files(tmp_path: Path) -> None:
    """What a resumed ``cm3leon prepare`` compares: the same files give the same fingerprint, any file added,
    removed, replaced or edited (images, sidecars, captions JSON, tars, Parquet, JSON lines) another one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cm3leon_lightning.data.parquet import ParquetSource
    from cm3leon_lightning.data.sft import SFTSource

    def same_time(path: Path, like: Path) -> None:  # an edit within the file system's time resolution
        st = like.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    img = tmp_path / "img"
    img.mkdir()
    for name in "abc":
        (img / f"{name}.png").write_bytes(_png((1, 2, 3)))
        (img / f"{name}.txt").write_text(f"caption {name}")
    folder = FolderSource(img).describe()
    assert folder["fingerprint"] == FolderSource(img).describe()["fingerprint"] and folder["count"] == 3
    (img / "b.txt").write_text("caption B")  # same size, same time: only the content differs
    same_time(img / "b.txt", img / "a.txt")
    (img / "a.txt").write_text("caption a, longer")  # a sidecar edited
    assert FolderSource(img).describe()["fingerprint"] != folder["fingerprint"]
    folder = FolderSource(img).describe()
    (img / "b.png").rename(img / "z.png")  # one image replaced by another: same count
    (img / "b.txt").rename(img / "z.txt")
    assert FolderSource(img).describe()["fingerprint"] != folder["fingerprint"]

    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                               "annotations": [{"id": 2, "image_id": 1, "caption": "one"}]}))  # fmt: skip
    coco = CocoSource(ann, img).describe()
    assert coco["fingerprint"] == CocoSource(ann, img).describe()["fingerprint"]
    ann.write_text(ann.read_text().replace("one", "two"))
    assert CocoSource(ann, img).describe()["fingerprint"] != coco["fingerprint"]
    coco = CocoSource(ann, img).describe()
    (img / "a.png").write_bytes(_png((4, 5, 6), size=41))  # the image it names replaced
    assert CocoSource(ann, img).describe()["fingerprint"] != coco["fingerprint"]

    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "s.tar", [("k0", {"png": _png((1, 1, 1)), "txt": b"zero"})])
    tars = WebDatasetSource(tmp_path / "wds").describe()
    assert tars["fingerprint"] == WebDatasetSource(tmp_path / "wds").describe()["fingerprint"]
    _tar(tmp_path / "wds" / "s.tar", [("k1", {"png": _png((1, 1, 1)), "txt": b"once"})])
    assert WebDatasetSource(tmp_path / "wds").describe()["counts"] == tars["counts"]
    assert WebDatasetSource(tmp_path / "wds").fingerprint() != tars["fingerprint"]

    pq.write_table(pa.table({"image": [_png((1, 1, 1))], "caption": ["one"]}), tmp_path / "a.parquet")
    parquet = ParquetSource(tmp_path / "a.parquet").fingerprint()
    assert parquet is not None and ParquetSource(tmp_path / "a.parquet").fingerprint() == parquet
    pq.write_table(pa.table({"image": [_png((1, 1, 1))], "caption": ["two, longer"]}), tmp_path / "a.parquet")
    assert ParquetSource(tmp_path / "a.parquet").fingerprint() != parquet

    (tmp_path / "sft").mkdir()
    line = {"task": "text", "image": "y.png", "text": "hello"}
    (tmp_path / "sft" / "a.jsonl").write_text(json.dumps(line) + "\n")
    sft = SFTSource(tmp_path / "sft").fingerprint()
    assert sft is not None and SFTSource(tmp_path / "sft").fingerprint() == sft
    (tmp_path / "sft" / "a.jsonl").write_text(json.dumps({**line, "text": "jello"}) + "\n")  # same size
    same_time(tmp_path / "sft" / "a.jsonl", tmp_path / "sft")
    assert SFTSource(tmp_path / "sft").fingerprint() != sft
    assert ShapesSource(3).fingerprint() is None and "fingerprint" not in ShapesSource(3).describe()
    assert PairSource.fingerprint(ShapesSource(3)) is None


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
    with pytest.raises(ValueError, match=r"needs an input path \(--bank-input\)"):
        make_source("folder", flags=("--bank-input", "--bank-captions"))
    with pytest.raises(ValueError, match=r"captions JSON \(--bank-captions "):
        make_source("coco", tmp_path, flags=("--bank-input", "--bank-captions"))
    with pytest.raises(FileNotFoundError):
        make_source("folder", tmp_path / "missing")
    with pytest.raises(ValueError, match="range"):
        list(ShapesSource(3).iter_range(2, 1))
    with pytest.raises(ValueError, match="shapes seed must be >= 0, got -1"):
        ShapesSource(3, seed=-1)


def test_model_text_cleans_as_captions_and_keeps_an_allowed_empty_text() -> None:
    """The one rule every inference entry point reads text with: cleaned as prepare cleans captions; ``""`` passes
    only with ``allow_empty`` (an empty instruction is plain captioning); whitespace alone never does."""
    from cm3leon_lightning.data.cleaning import model_text

    assert model_text(" a red\tcircle \n") == "a red circle"
    assert model_text("", allow_empty=True) == ""
    with pytest.raises(ValueError, match=r"^--instruction: the instruction holds no text"):
        model_text(" \n", "--instruction", "the instruction", allow_empty=True)
    with pytest.raises(ValueError, match=r"^prompt: the prompt holds no text"):
        model_text("")
    with pytest.raises(ValueError, match=r"must be a string, got NoneType"):
        model_text(None, allow_empty=True)  # type: ignore[arg-type]


def test_cli_refuses_source_settings_no_source_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--num-pairs 50 --source folder`` (meant as a subset) prepared the whole folder; ``--key-column``,
    ``--coco-mode``, ``--sft-*`` and ``--shapes-*`` were as silently ignored by sources that do not read them
    (``--shapes-split`` is read by a main shapes source only: the bank's is always ``train``)."""
    from cm3leon_lightning.cli import main as cm3leon_main
    from cm3leon_lightning.data.prepare_cli import build_parser, sources_from_args

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((1, 2, 3)))
    base = ["prepare", "--out", str(tmp_path / "o"), "--vqgan", "v", "--clip-weights", "c",
            "--train-tokenizer-vocab", "300"]  # fmt: skip
    folder = ["--source", "folder", "--input", str(tmp_path / "img")]
    for extra, message in [
        (folder + ["--num-pairs", "50"], "--num-pairs is read only with --source or --bank-source shapes, not with "
         "--source folder; it would be ignored"),
        (folder + ["--key-column", "id"], "--key-column is read only with --source or --bank-source parquet, not "
         "with --source folder; it would be ignored"),
        (folder + ["--coco-mode", "all", "--bank-source", "shapes"], "--coco-mode is read only with --source or "
         "--bank-source coco, not with --source folder and --bank-source shapes; it would be ignored"),
        (folder + ["--bank-source", "shapes", "--shapes-split", "heldout"], "--shapes-split is read only with "
         "--source shapes, not with --source folder and --bank-source shapes; it would be ignored"),
        (["--source", "shapes", "--sft-seed", "3"], "--sft-seed is read only with --source or --bank-source sft, not "
         "with --source shapes; it would be ignored"),
    ]:  # fmt: skip
        assert cm3leon_main(base + extra) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"cm3leon prepare: error: {message}"]
    assert not (tmp_path / "o").exists()
    read = [  # read by the main or the bank source, or given their defaults: accepted
        folder + ["--bank-source", "shapes", "--num-pairs", "4", "--shapes-seed", "2", "--shapes-image-size", "40"],
        folder + ["--num-pairs", "100", "--coco-mode", "first", "--image-column", "image", "--sft-up", "3"],
        ["--source", "shapes", "--num-pairs", "5", "--shapes-split", "heldout"],
    ]
    got = [sources_from_args(build_parser().parse_args(base[1:] + args)) for args in read]
    assert [(len(main), None if bank is None else (len(bank), bank.seed, bank.image_size)) for main, bank in got] == [
        (1, (4, 3, 40)), (1, None), (5, None)
    ]  # fmt: skip
