"""FIDCallback inside trainer.validate of a tiny model: the logged value is torchmetrics' FID of the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.eval_setup import (
    TinyFeatures,
    micro_vqgan,
    shape_samples,
    tiny_module,
    tiny_tokenizer,
    trainer,
    val_loader,
)
from torchmetrics.image.fid import FrechetInceptionDistance

from cm3leon_lightning.callbacks import FIDCallback
from cm3leon_lightning.callbacks.fid import reference_cache_file


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    return tok, micro_vqgan(), tiny_module(tok)


def make(parts, **kwargs) -> FIDCallback:
    tok, vqgan, _ = parts
    args = dict(
        samples=shape_samples(6), num_samples=6, image_size=16, samples_per_prompt=1, clip_model=None,
        feature_extractor=TinyFeatures(), text_tokenizer=tok, vqgan=vqgan, batch_size=4, seed=7,
    )  # fmt: skip
    return FIDCallback(**{**args, **kwargs})


def test_logged_fid_equals_torchmetrics_on_the_generated_images(parts, tmp_path: Path) -> None:
    _, _, module = parts
    cb = make(parts)
    trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    logged = float(cb.metric.compute())
    assert np.isfinite(logged) and logged > 0
    # Regenerate with the same seeds (batch b of 4 seeds seed + first index) and compute FID independently.
    samples = cb.samples
    fake = torch.cat([cb.generate(module, [s.references[0] for s in samples[i : i + 4]], 7 + i) for i in (0, 4)])
    assert fake.shape == (6, 3, 16, 16) and fake.dtype == torch.uint8
    ref = FrechetInceptionDistance(feature=TinyFeatures())
    ref.update(torch.stack([s.image for s in samples]), real=True)
    ref.update(fake, real=False)
    assert logged == pytest.approx(float(ref.compute()), rel=1e-6)


class Copying(FIDCallback):
    """Generation overridden: returns the reference images themselves (optionally inverted)."""

    invert = False

    def generate(self, pl_module, captions, seed):
        by_caption = {s.references[0]: s.image for s in self.samples}
        images = torch.stack([by_caption[c] for c in captions])
        return 255 - images if self.invert else images


def test_overridden_generation_equal_sets_zero_shifted_more(parts, tmp_path: Path) -> None:
    _, _, module = parts
    unique = list({s.references[0]: s for s in shape_samples(40)}.values())  # one image per caption
    same = Copying(**{**_args(parts), "samples": unique, "num_samples": len(unique)})
    t = trainer(tmp_path, [same])
    out = t.validate(module, val_loader(module.vocab), verbose=False)[0]
    assert abs(out["val/fid"]) < 1e-4
    shifted = Copying(**{**_args(parts), "samples": unique, "num_samples": len(unique)})
    shifted.invert = True
    out = trainer(tmp_path, [shifted]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/fid"] > 0.1


def _args(parts) -> dict:
    tok, vqgan, _ = parts
    return dict(
        image_size=16, samples_per_prompt=1, clip_model=None, feature_extractor=TinyFeatures(), text_tokenizer=tok,
        vqgan=vqgan, batch_size=4,
    )  # fmt: skip


def test_reference_statistics_are_cached(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, module = parts
    first = make(parts, cache_dir=str(tmp_path / "cache"))
    trainer(tmp_path, [first]).validate(module, val_loader(module.vocab), verbose=False)
    path = reference_cache_file(first)
    assert path is not None and path.is_file()

    real_updates = []
    update = FrechetInceptionDistance.update

    def counting(self, imgs, real):
        real_updates.append(bool(real))
        return update(self, imgs, real)

    monkeypatch.setattr(FrechetInceptionDistance, "update", counting)
    second = make(parts, cache_dir=str(tmp_path / "cache"))
    out = trainer(tmp_path, [second]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert reference_cache_file(second) == path
    assert real_updates and not any(real_updates)  # only generated images went through the extractor
    assert int(second.metric.real_features_num_samples) == 6
    assert out["val/fid"] == pytest.approx(float(first.metric.compute()), rel=1e-6)


def test_best_candidate_is_kept_by_the_scorer(parts, tmp_path: Path) -> None:
    class Brightest:
        def embed_texts(self, texts):
            return np.ones((len(texts), 1), np.float32)

        def embed_images(self, images):  # score = mean brightness, as a 2-d unit vector
            m = images.float().mean(dim=(1, 2, 3))
            return torch.stack([m, 1 - m], dim=1)

    _, _, module = parts
    cb = make(parts, samples_per_prompt=3)
    cb.setup(None, module, "validate")
    cb.clip = Brightest()
    images = cb.generate(module, ["a red square"], seed=3)
    cb.clip = None
    candidates = torch.stack([cb.generate(module, ["a red square"], seed=3)])  # first candidate only
    assert images.shape == (1, 3, 16, 16)
    assert images.float().mean() >= candidates.float().mean()


def test_bad_arguments(parts) -> None:
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        make(parts, num_samples=1)
    with pytest.raises(FileNotFoundError, match="feature_weights_path"):
        make(parts, feature_extractor=None, feature_weights_path="/nonexistent/inception.pth").setup(None, None, "fit")


def test_retrieval_augmented_fid_places_the_nearest_documents_first(parts, tmp_path: Path) -> None:
    """With ``retrieve`` each caption is decoded after its ``retrieve_k`` nearest bank documents (table 1's
    retrieval rows): the images equal generate_image given DocumentRetriever's documents, and differ without them."""
    from support.retrieval_setup import write_retrieval_assets

    from cm3leon_lightning.generation import generate_image
    from cm3leon_lightning.generation.retrieve import DocumentRetriever
    from cm3leon_lightning.metrics.fid import fid_resize, to_uint8_images

    tok, vqgan, module = parts
    assets = write_retrieval_assets(tmp_path)
    root, clip = assets["root"], assets["clip"]
    retrieval = dict(
        retrieve=str(root / "bank"), retrieve_shards=str(root / "shards"), retrieve_k=2,
        clip_model="cm3leon-clip-tiny", clip_pretrained=str(root / "clip.safetensors"),
    )  # fmt: skip
    cb = make(parts, **retrieval)
    cb.setup(None, module, "validate")
    captions = [s.references[0] for s in cb.samples[:3]]
    got = cb.generate(module, captions, seed=11)

    keys_docs = DocumentRetriever(root / "bank", root / "shards", clip, module.vocab).retrieve(captions, 2)
    assert all(len(keys) == 2 for keys, _ in keys_docs)
    want = generate_image(
        module.model, module.vocab, tok.encode_batch(captions), num_samples=1, seed=11, vqgan=vqgan,
        retrieved=[docs for _, docs in keys_docs], **cb.sampling,
    ).images[:, 0]  # fmt: skip
    assert torch.equal(got, torch.stack([fid_resize(img, 16) for img in to_uint8_images(want)]))
    plain = make(parts)
    plain.setup(None, module, "validate")
    assert not torch.equal(got, plain.generate(module, captions, seed=11))

    with pytest.raises(ValueError, match="retrieve needs retrieve_shards .*, clip_model .* and retrieve_k >= 1"):
        make(parts, retrieve=str(root / "bank"), clip_model="cm3leon-clip-tiny")
    with pytest.raises(ValueError, match="retrieve_k >= 1"):
        make(parts, **{**retrieval, "retrieve_k": 0})
