"""ClipEncoder: document embedding rule, input forms, local weights, and clear errors when weights are missing."""

import os
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cm3leon_lightning.retrieval.encoder import ClipEncoder, ClipWeightsUnavailableError, create_clip


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seeded random tiny CLIP saved as safetensors and as a torch state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = create_clip("cm3leon-clip-tiny", None)
    # Perturb BatchNorm statistics so the files hold more than the defaults.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    tmp = tmp_path_factory.mktemp("w")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "tiny.safetensors"))
    torch.save(state, tmp / "tiny.pt")
    return tmp / "tiny.safetensors", tmp / "tiny.pt", model.eval()


@pytest.fixture(scope="module")
def enc(weights):
    return ClipEncoder("cm3leon-clip-tiny", pretrained=str(weights[0]), batch_size=4)


def _images(n: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_tiny_configs_are_registered_with_open_clip_and_tokenize_offline():
    assert "cm3leon-clip-tiny" in open_clip.list_models() and "cm3leon-clip-small" in open_clip.list_models()
    tok = open_clip.get_tokenizer("cm3leon-clip-tiny")
    ids = tok(["a red square"])
    assert ids.shape == (1, 16)
    assert ids[0, 0].item() == 49406 and 49407 in ids[0].tolist()  # open_clip's bundled BPE: <sot> ... <eot>


def test_model_building_names_stay_importable_from_the_encoder_module():
    """clip_loading was split out of encoder; user code importing the names from their old home keeps working."""
    from cm3leon_lightning import retrieval
    from cm3leon_lightning.retrieval import clip_loading, encoder

    names = ["CLIP_CONFIGS", "PRECISIONS", "ClipWeightsUnavailableError", "clip_tag", "create_clip"]
    for name in [*names, "register_clip_configs"]:
        assert getattr(encoder, name) is getattr(clip_loading, name), name
    assert retrieval.CLIP_CONFIGS is encoder.CLIP_CONFIGS
    assert retrieval.ClipWeightsUnavailableError is encoder.ClipWeightsUnavailableError


def test_local_weights_load_and_match_the_saved_model(weights, enc):
    st, pt, model = weights
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2)
    texts = ["a red square", "a blue circle", "", "x" * 300]  # empty and over-long captions still embed
    with torch.no_grad():
        want_t = model.encode_text(open_clip.get_tokenizer("cm3leon-clip-tiny")(texts), normalize=True).numpy()
    np.testing.assert_allclose(enc.embed_texts(texts), want_t, atol=1e-6)
    other = ClipEncoder("cm3leon-clip-tiny", pretrained=str(pt))
    np.testing.assert_allclose(other.embed_images(x), enc.embed_images(x), atol=1e-6)  # batch sizes differ
    assert enc.dim == 64 and enc.image_size == 32


def test_embeddings_are_unit_norm_float32(enc):
    t = enc.embed_texts(["a", "b", "c"])
    i = enc.embed_images(torch.from_numpy(_images(3)).permute(0, 3, 1, 2))
    for z in (t, i):
        assert z.dtype == np.float32 and z.shape == (3, 64)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    assert enc.embed_texts([]).shape == (0, 64)


def test_image_input_forms_agree(enc):
    arr = _images(5, 40, 48)  # not the model's size: resized and center-cropped
    u8 = torch.from_numpy(arr).permute(0, 3, 1, 2)
    ref = enc.embed_images(u8)  # batched in chunks of 4
    np.testing.assert_allclose(enc.embed_images(u8.float() / 255), ref, atol=1e-5)
    np.testing.assert_allclose(enc.embed_images([Image.fromarray(a) for a in arr]), ref, atol=1e-5)
    np.testing.assert_allclose(enc.embed_images(list(arr)), ref, atol=1e-5)
    np.testing.assert_allclose(enc.embed_images([Image.fromarray(a).convert("RGBA") for a in arr]), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.embed_images(u8.permute(0, 2, 3, 1))
    # transparent pixels are white, as cm3leon prepare converts images (convert("RGB") kept their hidden colour)
    clear = np.concatenate([arr[0], np.zeros((40, 48, 1), np.uint8)], axis=2)
    white = np.full_like(arr[0], 255)
    np.testing.assert_allclose(enc.embed_images([Image.fromarray(clear, "RGBA")]), enc.embed_images([white]), atol=1e-5)


def test_rgba_arrays_are_white_where_transparent_as_pil_images_and_prepare_make_them(enc):
    """Found in review: an (H, W, 4) array lost its alpha channel (the hidden colour was embedded) while the same
    pixels as a PIL image, or given to ``cm3leon prepare`` (``load_image``), are white where transparent."""
    arr = _images(2, 40, 48)
    half = np.concatenate([arr[0], np.full((40, 48, 1), 128, np.uint8)], axis=2)
    clear = np.concatenate([arr[1], np.zeros((40, 48, 1), np.uint8)], axis=2)
    want = enc.embed_images([Image.fromarray(half, "RGBA"), np.full_like(arr[1], 255)])
    np.testing.assert_array_equal(enc.embed_images([half, clear]), want)
    opaque = np.concatenate([arr[0], np.full((40, 48, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(enc.embed_images([opaque]), enc.embed_images([arr[0]]))
    floats = [np.concatenate([arr[1] / 255.0, np.zeros((40, 48, 1))], axis=2)]  # float RGBA in [0, 1]
    np.testing.assert_allclose(enc.embed_images(floats), want[1:], atol=1e-6)


def test_document_embedding_is_the_renormalised_mean_of_normalised_parts(enc):
    texts = ["a red square", "a green triangle", None, ""]
    arr = _images(4)
    images = [Image.fromarray(arr[0]), None, Image.fromarray(arr[2]), Image.fromarray(arr[3])]
    docs = enc.embed_documents(texts, images)
    t = enc.embed_texts(["a red square", "a green triangle"])
    i = enc.embed_images([images[0], images[2], images[3]])
    both = (t[0] + i[0]) / np.linalg.norm(t[0] + i[0])
    np.testing.assert_allclose(docs[0], both, atol=1e-6)  # paper 2.1: mean of normalised text and image
    np.testing.assert_allclose(docs[0], ((t[0] + i[0]) / 2) / np.linalg.norm((t[0] + i[0]) / 2), atol=1e-6)
    np.testing.assert_allclose(docs[1], t[1], atol=1e-6)  # text-only document
    np.testing.assert_allclose(docs[2], i[1], atol=1e-6)  # image-only (None caption)
    np.testing.assert_allclose(docs[3], i[2], atol=1e-6)  # image-only (empty caption)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-6)
    tensor_docs = enc.embed_documents(texts[:1], torch.from_numpy(arr[:1]).permute(0, 3, 1, 2))
    np.testing.assert_allclose(tensor_docs[0], docs[0], atol=1e-6)


def test_document_errors_name_the_problem(enc):
    with pytest.raises(ValueError, match=r"documents \[1\] have neither text nor image"):
        enc.embed_documents(["a", None], [None, None])
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        enc.embed_documents(["a", "b"], [None])
    with pytest.raises(ValueError, match="single str"):
        enc.embed_texts("a red square")


def test_a_caption_that_is_not_a_str_is_refused_naming_its_index_and_type(enc):
    """A pandas NaN caption raised AttributeError ('float' object has no attribute 'strip') or TypeError."""
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    hint = "; pass None for a document without text"
    for caption, shown in ((float("nan"), "float (nan)"), (3, "int (3)"), (b"x", "bytes (b'x')")):
        with pytest.raises(ValueError) as err:
            enc.embed_documents(["a", "b", caption], images)
        assert str(err.value) == f"texts[2] has type {shown}, not str{hint}"
        with pytest.raises(ValueError) as err:
            enc.embed_texts(["a", caption])
        assert str(err.value) == f"texts[1] has type {shown}, not str"
    with pytest.raises(ValueError) as err:
        enc.embed_texts(["a", None])
    assert str(err.value) == "texts[1] has type NoneType (None), not str"
    assert enc.embed_documents(["a", None], images[:2]).shape == (2, enc.dim)  # None: a document without text


def test_unavailable_tag_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")  # nothing cached
    start = time.monotonic()
    with pytest.raises(ClipWeightsUnavailableError, match="pretrained='/path/to/weights.safetensors'") as err:
        ClipEncoder("ViT-B-32", pretrained="openai")
    assert time.monotonic() - start < 10  # not open_clip's ~50 s of download retries
    assert "'ViT-B-32'/'openai'" in str(err.value) and "ClipModule" in str(err.value)


def test_bad_names_and_paths_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        ClipEncoder("ViT-Nope", pretrained=None)
    with pytest.raises(ValueError, match="neither an existing file nor a pretrained tag.*tags: \\["):
        ClipEncoder("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="batch_size"):
        ClipEncoder("cm3leon-clip-tiny", pretrained=None, batch_size=0)


def test_weights_of_another_architecture_name_the_file_and_the_flag(weights):
    """The tiny CLIP's file given as ViT-B-32 (prepare's default --clip-model) stopped in an AssertionError deep
    inside open_clip ("text pos_embed width changed!")."""
    with pytest.raises(
        ValueError, match=r"weights in .*\.safetensors do not fit the architecture 'ViT-B-32' .*--clip-model"
    ):
        ClipEncoder("ViT-B-32", pretrained=str(weights[0]))


@pytest.mark.parametrize(
    "raw, named",
    [
        ("{not json", "not a JSON object"),
        ('["squash"]', "not a JSON object"),
        ('{"resize_mode": "crop"}', "resize_mode"),
        ('{"mean": [0.5, 0.5], "std": [0.5, 0.5, 0]}', "mean, std"),
        ('{"size": 32, "interp": "bilinear"}', "interp"),
    ],
)
def test_invalid_recorded_preprocessing_names_the_file_and_the_field(weights, tmp_path, raw, named):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "bad.safetensors"
    save_file(load_file(str(weights[0])), str(path), metadata={"preprocess_cfg": raw})
    with pytest.raises(
        ValueError, match=rf"bad\.safetensors: the safetensors metadata 'preprocess_cfg' is invalid \({named}\)"
    ):
        ClipEncoder("cm3leon-clip-tiny", pretrained=str(path))


def test_recorded_preprocessing_is_applied_and_files_without_it_get_the_defaults(weights, enc, tmp_path):
    from safetensors.torch import load_file, save_file

    assert enc.mean == open_clip.OPENAI_DATASET_MEAN and enc._resize["resize_mode"] == "shortest"  # no metadata
    path = tmp_path / "half.safetensors"
    save_file(load_file(str(weights[0])), str(path), metadata={"preprocess_cfg": '{"mean": [0.5, 0.5, 0.5]}'})
    half = ClipEncoder("cm3leon-clip-tiny", pretrained=str(path))
    assert half.mean == (0.5, 0.5, 0.5) and half.std == open_clip.OPENAI_DATASET_STD  # the rest: defaults
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2)
    transform = open_clip.image_transform(32, False, (0.5, 0.5, 0.5), open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        want = weights[2].encode_image(torch.stack([transform(Image.fromarray(a)) for a in _images()]), normalize=True)
    np.testing.assert_allclose(half.embed_images(x), want.numpy(), rtol=0, atol=1e-5)


def test_weights_recorded_without_quick_gelu_run_gelu_under_a_quickgelu_architecture(weights, enc, monkeypatch):
    """open_clip can only force QuickGELU on: GELU-trained weights (metadata ``quick_gelu`` "false") given a
    "-quickgelu" architecture ran QuickGELU, other embeddings without a word; "true" still forces it on."""
    from cm3leon_lightning.retrieval.clip_files import save_clip_weights, uses_quick_gelu

    quick_cfg = {**open_clip.get_model_config("cm3leon-clip-tiny"), "quick_gelu": True}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "cm3leon-clip-tiny-quickgelu", quick_cfg)
    path = weights[0].parent / "recorded.safetensors"
    save_clip_weights(weights[2], "cm3leon-clip-tiny", path)  # records quick_gelu "false"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' private 0o600
    gelu = ClipEncoder("cm3leon-clip-tiny-quickgelu", pretrained=str(path))
    assert not uses_quick_gelu(gelu.model)
    texts = ["a red square", "a blue circle"]
    np.testing.assert_allclose(gelu.embed_texts(texts), enc.embed_texts(texts), rtol=0, atol=1e-6)
    assert uses_quick_gelu(ClipEncoder("cm3leon-clip-tiny-quickgelu", pretrained=str(weights[0])).model)  # no record


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("hw", [(32, 39), (30, 37), (300, 400), (24, 24), (31, 20)])
def test_preprocessing_has_open_clips_geometry(resize_mode, interpolation, hw):
    """Same pixels as open_clip's eval transform on a PIL image, up to resampling rounding (PIL works in uint8).

    Noise images make a one-pixel shift of the crop, or a resize to 43 columns instead of torchvision's 42, show as
    errors of ~1 in normalised units; before the fix, (32, 39) was cropped at column 3 instead of 4 and (300, 400)
    resized to 32 x 43 instead of 32 x 42.
    """
    from open_clip.transform import image_transform

    from cm3leon_lightning.retrieval.encoder import preprocess_images

    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    arr = np.random.default_rng(0).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    transform = image_transform(32, False, mean, std, resize_mode=resize_mode, interpolation=interpolation)
    want = transform(Image.fromarray(arr))  # (3, 32, 32)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    if (resize_mode, interpolation) == ("shortest", "bicubic"):  # the defaults: ViT-B-32 / openai
        got = preprocess_images(x, 32, mean, std)
    else:
        got = preprocess_images(x, 32, mean, std, resize_mode, interpolation)
    assert got.shape == (1, 3, 32, 32)
    diff = (got[0] - want).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.35, (diff.mean(), diff.max())


def test_encoder_applies_the_models_own_resize_mode(weights, monkeypatch):
    """A model whose open_clip preprocess_cfg squashes (SigLIP-style) is embedded squashed, not cropped."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    import cm3leon_lightning.retrieval.encoder as encoder_module

    real = encoder_module.create_clip

    def squashing(*args, **kwargs):
        model = real(*args, **kwargs)
        model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "resize_mode": "squash"}
        return model

    monkeypatch.setattr(encoder_module, "create_clip", squashing)
    enc = ClipEncoder("cm3leon-clip-tiny", pretrained=str(weights[0]))
    model = enc.model
    arr = np.zeros((3, 32, 48, 3), np.uint8)  # content only in the 8 columns each side that a center crop cuts
    arr[:, :, :8], arr[:, :, -8:] = _images(3, 32, 8, seed=3), _images(3, 32, 8, seed=4)
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.no_grad():
        want = model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in arr]), normalize=True).numpy()
    got = enc.embed_images([Image.fromarray(a) for a in arr])
    err = np.abs(got - want).max()
    assert err < 2e-4, err  # a center crop gives ~2e-3 with this seeded random model
    cropped = ClipEncoder.__new__(ClipEncoder)
    cropped.__dict__.update(enc.__dict__, _resize={**enc._resize, "resize_mode": "shortest"})
    crop_err = np.abs(cropped.embed_images([Image.fromarray(a) for a in arr]) - want).max()
    assert err < crop_err / 10, (err, crop_err)


@pytest.mark.parametrize("cached_name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_weights_in_a_copied_hf_cache_are_used_offline(tmp_path, monkeypatch, cached_name):
    """open_clip fetches ``open_clip_model.safetensors`` (not ``open_clip_pytorch_model.safetensors``) for a tag's
    default file; a cache holding it must count as cached, or offline machines are refused weights they have."""
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].rstrip("/")  # timm/vit_base_patch32_...
    root = tmp_path / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    (root / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (root / "snapshots" / ("0" * 40) / cached_name).write_bytes(b"weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: calls.append((a, k)) or torch.nn.Identity())
    create_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))  # handed to open_clip, not refused
    assert calls and calls[0][1]["cache_dir"] == str(tmp_path) and calls[0][1]["pretrained"] == "openai"
    (root / "snapshots" / ("0" * 40) / cached_name).unlink()
    with pytest.raises(ClipWeightsUnavailableError):
        create_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))


def test_unreadable_weights_files_are_named_and_not_blamed_on_the_architecture(weights, tmp_path):
    """A truncated safetensors file raised safetensors' bare 'incomplete metadata, file not fully covered', an empty
    one EOFError, neither naming the file; a truncated torch file was reported as weights that 'do not fit the
    architecture', with advice to name another architecture."""
    st, pt, _ = weights
    cases = {
        "short.safetensors": st.read_bytes()[:-100],
        "half.pt": pt.read_bytes()[: pt.stat().st_size // 2],
        "empty.bin": b"",
        "text.pt": b"not a checkpoint\n" * 10,
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=rf"the CLIP weights file .*/{name} cannot be read \(\w+: .*truncated"):
            ClipEncoder("cm3leon-clip-tiny", pretrained=str(tmp_path / name))
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pt")  # readable, but not this architecture's
    with pytest.raises(ValueError, match=r"weights in .*other\.pt do not fit the architecture 'cm3leon-clip-tiny'"):
        ClipEncoder("cm3leon-clip-tiny", pretrained=str(tmp_path / "other.pt"))


def test_an_unreadable_cached_tag_file_says_to_delete_it(monkeypatch):
    """A tag's file left truncated in the Hugging Face cache raised safetensors' bare error from inside open_clip."""
    from safetensors import SafetensorError

    from cm3leon_lightning.retrieval import clip_loading

    def truncated(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setattr(clip_loading, "_in_hf_cache", lambda *a: True)
    monkeypatch.setattr(open_clip, "create_model", truncated)
    with pytest.raises(
        ClipWeightsUnavailableError,
        match=r"cached CLIP weights 'ViT-B-32'/'openai' cannot be read \(SafetensorError: .*\); delete them from the "
        r"Hugging Face cache \(/some/cache\)",
    ):
        create_clip("ViT-B-32", "openai", cache_dir="/some/cache")


def test_float_images_outside_the_unit_range_are_refused_naming_the_image(enc):
    """Float images in [0, 255] (or [-1, 1]) were clamped after resizing, or passed on unclamped at the model's size,
    and embedded as a white (or dark) picture without a word."""
    u8 = torch.from_numpy(_images(6, 40, 48)).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"images\[0\] is floating point with values in \[\d+, 255\]; float images"):
        enc.embed_images(u8.float())
    minus_one = list(u8.float() / 255)
    minus_one[5] = minus_one[5] * 2 - 1  # batch_size 4: the second chunk's second image
    with pytest.raises(ValueError, match=r"images\[5\] is floating point with values in \[-1, 1\]"):
        enc.embed_images(minus_one)
    with pytest.raises(ValueError, match=r"images\[1\] is floating point"):
        enc.embed_images([_images(1)[0], _images(1)[0].astype(np.float32)])  # an (H, W, 3) float array in [0, 255]
    np.testing.assert_allclose(enc.embed_images(minus_one[:5]), enc.embed_images(u8[:5]), atol=1e-5)  # in range: ok
    nan = u8[:2].float() / 255
    nan[1, 0, 20, 24] = float("nan")  # not refused: it embeds to NaN, which callers see (rerank ranks it last)
    z = enc.embed_images(nan)
    assert np.isfinite(z[0]).all() and np.isnan(z[1]).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16", "pure_bf16"])
def test_half_precision_vit_embeds_images_with_unit_norms(precision):
    """open_clip's "fp16"/"bf16" keep a ViT's class embedding in float32: images were cast to that first parameter's
    dtype and the fp16 patch convolution refused them; bfloat16 embeddings were normalised in bfloat16 (norms 1 +-
    5e-3, not the unit norm documented)."""
    texts = ["a red square", "a blue circle on a green field"]
    images = torch.from_numpy(_images(3, 64, 64)).permute(0, 3, 1, 2)
    encoders = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="randomly initialised"):
            encoders[p] = ClipEncoder("cm3leon-clip-small", pretrained=None, precision=p)
    for embed, x in (("embed_texts", texts), ("embed_images", images)):
        want, got = getattr(encoders["fp32"], embed)(x), getattr(encoders[precision], embed)(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=0, atol=0.03)


def test_an_unknown_precision_is_refused_not_run_in_float32():
    with pytest.raises(ValueError) as err:
        ClipEncoder("cm3leon-clip-tiny", pretrained=None, precision="float16")
    assert str(err.value) == (
        "precision must be one of ['bf16', 'fp16', 'fp32', 'pure_bf16', 'pure_fp16'], got 'float16'"
    )
