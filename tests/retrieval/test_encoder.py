"""ClipEncoder: document embedding rule, input forms, local weights, and clear errors when weights are missing."""

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
