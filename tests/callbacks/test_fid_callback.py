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

from cm3leon_lightning.callbacks import EvalSample, FIDCallback
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


def test_cache_key_follows_the_reference_pixels(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key is the reference images' content: a num_samples beyond the dataset reads the same images (same
    key), while a change in how jpgs are decoded (e.g. EXIF orientation now applied) changes the pixels and the key;
    keyed on shard hashes and arguments, the stale statistics were reused and the FID silently wrong."""
    from support.eval_setup import write_eval_data

    import cm3leon_lightning.callbacks.base as base

    val = write_eval_data(tmp_path / "data", n_train=2, n_val=8)["val"]
    _, _, module = parts

    def key(**kwargs) -> Path:
        cb = make(parts, samples=None, data=val, cache_dir=str(tmp_path / "cache"), **kwargs)
        cb.setup(None, module, "validate")
        return reference_cache_file(cb)

    with pytest.warns(UserWarning, match="num_samples=20"):
        assert key(num_samples=8) == key(num_samples=20)
    upright = key(num_samples=8)
    decode = base.fid_resize
    monkeypatch.setattr(base, "fid_resize", lambda image, size: decode(image, size).flip(-1))
    assert key(num_samples=8) != upright


def test_fewer_images_than_num_samples_warns(parts) -> None:
    """FID depends on the sample count: 6 images under num_samples=10 must not pass silently for an FID-10."""
    _, _, module = parts
    cb = make(parts, num_samples=10)
    with pytest.warns(UserWarning, match=r"num_samples=10 but the evaluation set has 6 images"):
        cb.setup(None, module, "validate")
    assert len(cb.samples) == 6


def test_unreadable_or_mismatched_cache_is_recomputed(parts, tmp_path: Path) -> None:
    """A truncated cache file, or one holding another image count, is replaced (with a warning naming it) rather
    than failing without the file's name or giving a wrong FID."""
    from cm3leon_lightning.metrics.fid import real_stats, save_real_stats

    _, _, module = parts
    first = make(parts, cache_dir=str(tmp_path / "cache"))
    want = trainer(tmp_path, [first]).validate(module, val_loader(module.vocab), verbose=False)[0]["val/fid"]
    path = reference_cache_file(first)
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    again = make(parts, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match=f"ignoring the reference-statistics cache {path}"):
        out = trainer(tmp_path, [again]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/fid"] == pytest.approx(want, rel=1e-6)
    assert path.read_bytes() == good

    fewer = make(parts, num_samples=4)
    fewer.setup(None, module, "validate")
    for s in fewer.samples:
        fewer.metric.update(s.image[None], real=True)
    save_real_stats(path, real_stats(fewer.metric))
    third = make(parts, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="it holds 4 images, the reference set 6"):
        out = trainer(tmp_path, [third]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/fid"] == pytest.approx(want, rel=1e-6)
    assert int(third.metric.real_features_num_samples) == 6


class _Strategy:
    """Stands in for the DDP strategy: ``broadcast`` returns rank zero's value."""

    def __init__(self, rank_zero_value: bool) -> None:
        self.value = rank_zero_value

    def broadcast(self, obj, src: int = 0):
        return self.value


def test_rank_zero_decides_whether_the_cache_is_used(parts, tmp_path: Path) -> None:
    """Under DDP with a node-local cache_dir the ranks can disagree on whether the cache exists; each then took its
    own branch (a rank loading zeros while rank zero recomputes drops its share; a rank recomputing while rank zero
    loads the totals counts its share twice). Rank zero's answer now holds on every rank."""
    from types import SimpleNamespace

    from cm3leon_lightning.metrics.fid import real_stats, save_real_stats

    _, _, module = parts
    cache = str(tmp_path / "cache")
    rank1 = SimpleNamespace(global_rank=1, world_size=2, strategy=_Strategy(True))  # rank zero has the cache
    cb = make(parts, cache_dir=cache)
    cb.setup(None, module, "validate")
    assert not reference_cache_file(cb).exists()  # not on this rank's disk
    cb._prepare_real(rank1, torch.device("cpu"))
    assert int(cb.metric.real_features_num_samples) == 0  # rank zero holds the totals

    save_real_stats(reference_cache_file(cb), real_stats(cb.metric))  # now this rank's disk has one
    rank1.strategy = _Strategy(False)  # but rank zero's has not: every rank adds its share
    other = make(parts, cache_dir=cache)
    other.setup(None, module, "validate")
    other._prepare_real(rank1, torch.device("cpu"))
    assert int(other.metric.real_features_num_samples) == 3  # samples 1, 3, 5


def test_val_data_that_is_not_a_dataset_directory_is_a_clear_error(parts, tmp_path: Path) -> None:
    """The data module also takes shard lists or patterns; the callback reads a prepared directory or manifest and
    says so, naming ``data``, instead of failing to decode a .tar as JSON (or reading only the first of several)."""
    from types import SimpleNamespace

    from support.eval_setup import write_eval_data

    val = write_eval_data(tmp_path / "data", n_train=2, n_val=4)["val"]
    _, _, module = parts
    shards = sorted(str(p) for p in Path(val).glob("*.tar"))
    stub = SimpleNamespace(datamodule=SimpleNamespace(hparams={"val_data": shards}))
    with pytest.raises(ValueError, match=r"the data module's val_data .* give data=<prepared dataset directory"):
        make(parts, samples=None).setup(stub, module, "validate")
    with pytest.raises(ValueError, match=r"data .*shard-000000.tar.* give data=<prepared dataset directory"):
        make(parts, samples=None, data=shards[0]).setup(None, module, "validate")
    cb = make(parts, samples=None, num_samples=4)
    cb.setup(SimpleNamespace(datamodule=SimpleNamespace(hparams={"val_data": [val]})), module, "validate")
    assert len(cb.samples) == 4


def test_generation_batches_and_seeds_do_not_depend_on_the_device_count(parts) -> None:
    """Ranks take whole batches of the one-device run (same captions, same seed each), so a fixed seed gives the
    same images on 1 or 8 devices; splitting captions rank::world_size first made other batches and seeds."""
    from types import SimpleNamespace

    _, _, module = parts

    class Recording(Copying):
        calls: list

        def generate(self, pl_module, captions, seed):
            self.calls.append((captions, seed))
            return super().generate(pl_module, captions, seed)

    def calls(rank: int, world_size: int) -> list:
        cb = Recording(**{**_args(parts), "samples": shape_samples(10), "num_samples": 10, "seed": 7})
        cb.calls = []
        cb.setup(None, module, "validate")
        cb.evaluate(SimpleNamespace(global_rank=rank, world_size=world_size), module)
        return cb.calls

    single = calls(0, 1)
    assert [seed for _, seed in single] == [7, 11, 15]
    assert sorted(calls(0, 2) + calls(1, 2), key=lambda c: c[1]) == single


@pytest.mark.parametrize("references, image", [(["a cat"], None), ([], "given"), ("a red square", "given")])
def test_in_memory_samples_without_caption_or_image_are_refused_at_setup(parts, references, image) -> None:
    # Were an AttributeError ('NoneType' object has no attribute 'getexif') naming no sample, an IndexError at the
    # first validation after an epoch of training, or a one-letter caption ('a red square'[0]).
    samples = shape_samples(3)
    samples[1] = EvalSample("bad", references, samples[1].image if image else None)
    cb = make(parts, samples=samples, num_samples=3)
    with pytest.raises(ValueError, match=r"FIDCallback: sample 'bad' needs its caption in a list \(references\[0\]\)"):
        cb.setup(None, None, "fit")


def test_in_memory_captions_are_tokenized_as_the_training_captions(parts, monkeypatch) -> None:
    """Shards hold cleaned captions, but in-memory samples' captions (a user's COCO json: trailing spaces, newlines)
    were tokenized as given; they are cleaned at setup as ``cm3leon prepare`` cleans captions, and one that cleans
    to nothing is refused naming the sample."""
    import cm3leon_lightning.generation as generation

    tok, _, module = parts
    samples = shape_samples(3)
    raw = samples[1].references[0] + " \n"
    samples[1] = EvalSample("raw", [raw.replace(" ", "  "), "another"], samples[1].image)
    cb = make(parts, samples=samples, num_samples=3)
    cb.setup(None, None, "fit")
    assert [s.references for s in cb.samples][1] == [raw.strip(), "another"]
    seen = []

    def spy(model, vocab, prompts, **kwargs):
        seen.append(prompts)
        return real(model, vocab, prompts, **kwargs)

    real = generation.generate_image
    monkeypatch.setattr(generation, "generate_image", spy)
    cb.generate(module, [raw, "a red\tsquare"], 0)  # generate cleans what a subclass or user passes too
    assert seen == [[tok.encode(raw.strip()), tok.encode("a red square")]] and tok.encode(raw) != seen[0][0]
    samples[1] = EvalSample("blank", ["\t \n"], samples[1].image)
    with pytest.raises(ValueError, match=r"^FIDCallback: sample 'blank': its caption holds no text \(only"):
        make(parts, samples=samples, num_samples=3).setup(None, None, "fit")


def test_no_vqgan_is_refused_at_setup(parts, tmp_path: Path) -> None:
    """Without a VQGAN the default generation failed at the first validation end, after the training steps before
    it; setup now names the argument. An overridden ``generate`` needs none."""
    _, _, module = parts
    with pytest.raises(ValueError, match=r"^FIDCallback: give vqgan \(a VQGAN weights path or module\) to decode"):
        make(parts, vqgan=None).setup(None, module, "fit")
    Copying(**{**_args(parts), "samples": shape_samples(6), "vqgan": None}).setup(None, module, "fit")


@pytest.mark.parametrize(("dims", "warns"), [(8, True), (5, False)])
def test_no_more_images_than_features_warns_that_fid_is_biased(parts, dims: int, warns: bool) -> None:
    """With no more images than feature dimensions (FID-1000 with Inception's 2048) the covariances are singular and
    the FID a biased proxy; that passed without a word."""
    import warnings

    _, _, module = parts
    cb = make(parts, feature_extractor=TinyFeatures(dims=dims))  # 6 images
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cb.setup(None, module, "validate")
    biased = [str(w.message) for w in seen if "covariances are singular" in str(w.message)]
    expected = "FIDCallback: 6 images for 8 features: the covariances are singular, so val/fid is biased upward"
    assert [m.startswith(expected) for m in biased] == ([True] if warns else [])


def test_a_cache_that_cannot_be_written_warns_and_logs_the_fid(parts, tmp_path: Path, monkeypatch) -> None:
    """Rank zero alone writes the cache: a failed write (a full disk) raised there while the other ranks went on to
    the metric's synchronisation and waited for it; the cache is only a shortcut, so a warning now says it is not
    written. A cache_dir that is a file is refused at setup, not after the reference set is embedded."""
    _, _, module = parts
    want = trainer(tmp_path, [make(parts)]).validate(module, val_loader(module.vocab), verbose=False)[0]["val/fid"]

    def full_disk(path, stats):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cm3leon_lightning.callbacks.fid.save_real_stats", full_disk)
    cb = make(parts, cache_dir=str(tmp_path / "cache"))
    warning = r"could not write the reference-statistics cache .*fid-ref-\w+\.pt \(\[Errno 28\] No space left"
    with pytest.warns(UserWarning, match=warning):
        out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/fid"] == pytest.approx(want, rel=1e-6) and not (tmp_path / "cache").exists()

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=f"^FIDCallback cache_dir: {tmp_path / 'file'} is not a directory$"):
        make(parts, cache_dir=str(tmp_path / "file")).setup(None, module, "validate")


def test_a_model_on_apple_mps_scores_on_the_cpu(parts) -> None:
    """The metric followed the module to its device, but its float64 sums cannot live on MPS: a Mac run failed at
    the first evaluation. On MPS it now stays on the CPU, with the FID of a CPU run."""
    from types import SimpleNamespace

    _, _, module = parts
    one_device = SimpleNamespace(global_rank=0, world_size=1)
    want = Copying(**{**_args(parts), "samples": shape_samples(8), "num_samples": 8})
    want.setup(None, module, "validate")
    want.invert = True
    cb = Copying(**{**_args(parts), "samples": shape_samples(8), "num_samples": 8})
    cb.setup(None, module, "validate")
    cb.invert = True
    value = cb.evaluate(one_device, SimpleNamespace(device=torch.device("mps")))  # only the device is read
    assert cb.metric.device == torch.device("cpu")
    assert value == float(want.evaluate(one_device, module)) and value > 0
