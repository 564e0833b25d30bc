"""ImageCaptionDataModule: folder, in-memory and generated sources, the split, and batch layout."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon_lightning.data.pairs import (
    ImageCaptionDataModule,
    ImageCaptionPairs,
    make_shape_pairs,
    read_image_folder,
    to_square_uint8,
)


def test_make_shape_pairs_is_seeded_with_12_captions():
    a_img, a_cap = make_shape_pairs(300, 32, seed=3)
    b_img, b_cap = make_shape_pairs(300, 32, seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    assert a_cap == b_cap and len(set(a_cap)) == 12 and a_img.shape == (300, 32, 32, 3) and a_img.dtype == np.uint8
    assert make_shape_pairs(5, 32, seed=4)[1] != a_cap[:5]
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        make_shape_pairs(1, 8)


def test_folder_source_reads_sidecar_captions_and_skips_uncaptioned(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, size, mode in [("a.png", (40, 30), "RGB"), ("sub/b.jpg", (32, 32), "L"), ("c.png", (16, 16), "RGBA")]:
        Image.new(mode, size).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("first caption\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("second", encoding="utf-8")
    paths, caps = read_image_folder(tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.jpg"] and caps == ["first caption", "second"]
    dm = ImageCaptionDataModule(data_dir=str(tmp_path), image_size=24, batch_size=2, val_fraction=0.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 24, 24) and batch["image"].dtype == torch.uint8
    assert sorted(batch["caption"]) == ["first caption", "second"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image with a caption sidecar"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_image_folder(tmp_path / "missing")


def test_read_image_folder_names_a_non_utf8_sidecar_and_skips_blank_ones(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("   \n", encoding="utf-8")  # blank: no caption, so the image is skipped
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfa cat\n")  # a BOM is not part of the caption
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 au lait")  # latin-1
    with pytest.raises(ValueError, match=rf"caption sidecar {tmp_path / 'c.txt'} is not UTF-8 \(byte 3: invalid"):
        read_image_folder(tmp_path)
    (tmp_path / "c.txt").write_text("caf\u00e9 au lait", encoding="utf-8")
    paths, caps = read_image_folder(tmp_path)
    assert [p.name for p in paths] == ["b.png", "c.png"] and caps == ["a cat", "caf\u00e9 au lait"]
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("\t")
    with pytest.raises(FileNotFoundError, match="no image with a caption sidecar"):
        read_image_folder(tmp_path)


def test_folder_captions_are_cleaned_as_prepare_cleans_them(tmp_path):
    """Sidecar captions were only stripped: a two-line caption or a tab trained the CLIP on text that ``cm3leon
    prepare`` (and every retrieval query) collapses to single spaces, so it embedded other text than it learned."""
    from cm3leon_lightning.data.cleaning import clean_caption

    raw = "a red\n\nsquare\t on  grey\x00 ground \u2028 "
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text(raw, encoding="utf-8")
    (tmp_path / "b.txt").write_text("\x07\x00 \n", encoding="utf-8")  # control characters only: no caption
    paths, caps = read_image_folder(tmp_path)
    assert [p.name for p in paths] == ["a.png"]
    assert caps == ["a red square on grey ground"] == [clean_caption(raw)[0]]


def test_split_is_seeded_and_disjoint():
    images, captions = make_shape_pairs(50, 32)
    captions = [f"{c} {i}" for i, c in enumerate(captions)]  # unique, to check disjointness
    dm = ImageCaptionDataModule(images=images, captions=captions, val_fraction=0.2, seed=1)
    dm.setup()
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10
    assert not set(dm.train_set.captions) & set(dm.val_set.captions)
    again = ImageCaptionDataModule(images=images, captions=captions, val_fraction=0.2, seed=1)
    again.setup()
    assert again.val_set.captions == dm.val_set.captions


def test_shapes_source_uses_the_demo_dataset():
    dm = ImageCaptionDataModule(synthetic=20, synthetic_source="shapes", val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 20 and dm.train_set[0]["image"].shape == (3, 32, 32)


def test_to_square_uint8_resizes_and_crops():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200  # the centre 20 columns are bright: after the center crop, all of it
    out = to_square_uint8(img, 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert (out[:, :, 2:-2] == 200).all() and out.min() >= 180  # only bicubic ringing at the crop edges
    assert to_square_uint8(torch.zeros(3, 8, 8, dtype=torch.uint8), 8).shape == (3, 8, 8)


def test_float_images_scale_to_uint8_whether_or_not_they_are_resized():
    """A float image in [0, 1] already at the target size was cast without the x255 the resize applies (black)."""
    x = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0005, -0.0005]).repeat(3, 6, 1)  # (3, 6, 6), rounding slack clamps
    out = to_square_uint8(x, 6)
    assert out.dtype == torch.uint8 and out[0, 0].tolist() == [0, 64, 128, 255, 255, 0]
    assert to_square_uint8(np.full((6, 6, 3), 0.5, np.float32), 6).unique().tolist() == [128]
    assert set(to_square_uint8(torch.full((3, 12, 12), 0.5), 6).unique().tolist()) <= {127, 128}  # as resized
    ds = ImageCaptionPairs(torch.full((2, 3, 32, 32), 0.5), ["a", "b"], 32)
    assert ds[1]["image"].unique().tolist() == [128]
    same = torch.full((3, 6, 6), 7, dtype=torch.uint8)
    assert to_square_uint8(same, 6) is same  # uint8 at the size: unchanged


@pytest.mark.parametrize(
    "image",
    [
        torch.full((3, 8, 8), 200.0),  # float [0, 255] at the size: scaled by 255 and clamped to white
        np.full((12, 12, 3), 200, np.int64),  # np.random.integers' dtype: read as [0, 1], white after the resize
        torch.full((3, 8, 8), -0.75),  # [-1, 1] values: clamped to black
    ],
)
def test_non_uint8_images_outside_the_unit_range_are_refused_not_whitened(image):
    """Such images became a white (or black) picture without a word, where ``ClipEncoder`` refuses them."""
    with pytest.raises(ValueError, match=r"image has values in \[.*\]; images other than uint8 must be in \[0, 1\]"):
        to_square_uint8(image, 8)
    with pytest.raises(ValueError, match="images other than uint8 must be in"):
        ImageCaptionPairs([image], ["a"], 8)[0]


def test_in_memory_captions_that_do_not_fit_the_images_are_refused_at_construction():
    """Extra images were dropped silently at setup (the split numbers the captions); too few failed with IndexError;
    a caption that is not a str failed in the CLIP tokenizer at the first step ("object of type 'float' has no len()").
    """
    images = [np.zeros((8, 8, 3), np.uint8)] * 10
    for n_captions in (8, 12):
        with pytest.raises(ValueError, match=f"got 10 images but {n_captions} captions"):
            ImageCaptionDataModule(images=images, captions=["c"] * n_captions, image_size=8)
    with pytest.raises(ValueError, match="captions must be a sequence of str, got a single str 'abcdefghij'"):
        ImageCaptionDataModule(images=images, captions="abcdefghij", image_size=8)
    with pytest.raises(ValueError, match=r"^captions\[2\] has type float \(nan\), not str$"):  # a pandas NaN
        ImageCaptionDataModule(images=images[:3], captions=["a", "b", float("nan")], image_size=8)


def test_images_convert_to_rgb_as_prepare_converts_them(tmp_path):
    """CLIP training used a plain convert("RGB"): transparent pixels black and 16-bit grey near-white, where
    `cm3leon prepare` (cleaning.to_rgb), whose images the trained retriever embeds, makes them white and scaled."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # one opaque pixel, the rest transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = to_square_uint8(tmp_path / "t.png", 4)
    assert out[:, 0, 0].tolist() == [200, 10, 10] and out[:, 3, 3].tolist() == [255, 255, 255]
    assert torch.equal(to_square_uint8(Image.fromarray(rgba, "RGBA"), 4), out)
    grey = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000  # 0 .. 60000
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert to_square_uint8(tmp_path / "g16.png", 4)[0, 0].tolist() == [0, 16, 31, 47]  # round(v / 257)


def test_channels_first_arrays_are_refused_not_garbled():
    """A (3, H, W) array was read as an image of H rows and 3 columns: a wrong picture without a word."""
    with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, 3\) or \(H, W, 4\), got shape \(3, 8, 8\)"):
        to_square_uint8(np.zeros((3, 8, 8), np.uint8), 8)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="exactly one of"):
        ImageCaptionDataModule()
    with pytest.raises(ValueError, match="exactly one of"):
        ImageCaptionDataModule(data_dir="x", synthetic=3)
    with pytest.raises(ValueError, match="val_fraction"):
        ImageCaptionDataModule(synthetic=3, val_fraction=1.0)
    with pytest.raises(ValueError, match="synthetic_source"):
        ImageCaptionDataModule(synthetic=3, synthetic_source="nope")
    dm = ImageCaptionDataModule(synthetic=3, val_fraction=0.9)  # round(2.7) = 3 held out: fit trained on nothing
    with pytest.raises(ValueError, match=r"val_fraction=0.9 of 3 pair\(s\) holds out 3, leaving none to train on"):
        dm.setup()
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        ImageCaptionPairs([np.zeros((4, 4, 3), np.uint8)] * 2, ["a"], 4)


def test_an_image_file_that_does_not_decode_is_named(tmp_path):
    """A truncated image raised ``OSError: image file is truncated`` without saying which file it was."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "cut.txt").write_text("a cut image")
    pairs = ImageCaptionPairs(*read_image_folder(tmp_path), image_size=8)
    with pytest.raises(ValueError, match=r"cannot decode image .*cut\.jpg: OSError: image file is truncated"):
        pairs[0]


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused_naming_it(seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0 .*got {seed!r}"):
        make_shape_pairs(2, 32, seed=seed)
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0 .*got {seed!r}"):
        ImageCaptionDataModule(synthetic=4, seed=seed)  # at construction, before setup reaches numpy
