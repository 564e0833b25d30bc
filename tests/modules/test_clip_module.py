"""ClipModule trains a tiny CLIP on generated shape pairs that retrieves matching pairs far above chance."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cm3leon_lightning.data.pairs import ImageCaptionDataModule, make_shape_pairs
from cm3leon_lightning.modules.clip import ClipModule, caption_match_recall
from cm3leon_lightning.retrieval.encoder import ClipEncoder

STEPS = 150


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once for the module's tests: ~10-20 s on 2 CPU cores."""
    tmp = tmp_path_factory.mktemp("clip")
    # One intra-op thread: on 2 shared cores, OpenMP threads spinning against other processes made it 7x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = ImageCaptionDataModule(synthetic=STEPS * 32 + 64, batch_size=32, val_fraction=64 / (STEPS * 32 + 64))
    module = ClipModule(model_name="cm3leon-clip-tiny", lr=1e-3, weight_decay=0.0, warmup_steps=10)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=STEPS,
    )
    try:
        trainer.fit(module, dm)
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp / "clip.ckpt"
    trainer.save_checkpoint(ckpt)
    weights = module.export_weights(tmp / "clip.safetensors")
    return module, trainer, ckpt, weights


def test_trained_clip_retrieves_matching_pairs_far_above_chance(trained):
    _, trainer, _, weights = trained
    enc = ClipEncoder("cm3leon-clip-tiny", pretrained=str(weights))
    images, captions = make_shape_pairs(120, 32, seed=1234)  # held out: another seed
    caps = np.array(captions)
    img = enc.embed_images(torch.from_numpy(images).permute(0, 3, 1, 2))  # (120, D)
    txt = enc.embed_texts(captions)  # (120, D)
    # text -> image over all 120 pairs: the top image must show what the caption says. Chance ~ 1/12.
    t2i = np.mean(caps[(txt @ img.T).argmax(1)] == caps)
    # image -> caption among the 12 distinct captions. Chance = 1/12.
    classes = sorted(set(captions))
    i2t = np.mean(np.array(classes)[(img @ enc.embed_texts(classes).T).argmax(1)] == caps)
    assert len(classes) == 12
    assert t2i >= 0.9, t2i
    assert i2t >= 0.9, i2t
    assert trainer.callback_metrics["val/t2i_r1"] >= 0.8


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_same_model(trained):
    module, _, ckpt, _ = trained
    raw = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert raw["hyper_parameters"]["model_name"] == "cm3leon-clip-tiny"
    assert all(isinstance(v, int | float | str | bool | type(None)) for v in raw["hyper_parameters"].values())
    loaded = ClipModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    module.eval()
    images, captions = make_shape_pairs(8, 32, seed=5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        a, b = module(x, captions), loaded(x, captions)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_exported_weights_give_the_encoder_the_module_embeddings(trained):
    module, _, _, weights = trained
    module.eval()
    enc = ClipEncoder("cm3leon-clip-tiny", pretrained=str(weights))
    images, captions = make_shape_pairs(8, 32, seed=6)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        img, txt, _ = module(x, captions)
    np.testing.assert_allclose(enc.embed_images(x), img.numpy(), atol=1e-6)
    np.testing.assert_allclose(enc.embed_texts(captions), txt.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        module.export_weights(weights.with_suffix(".pt"))


def test_caption_match_recall_counts_equal_captions_as_hits():
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.0], [0.0, 0.0, 0.2]])  # rows images, columns texts
    i2t, t2i = caption_match_recall(sim, ["a", "a", "b"])  # images 0/1 pick the other "a": still a hit
    assert i2t.item() == 1.0
    i2t, t2i = caption_match_recall(sim, ["a", "b", "c"])
    assert i2t.item() == pytest.approx(1 / 3) and t2i.item() == pytest.approx(1 / 3)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        ClipModule(lr=0.0)


@pytest.mark.parametrize("name", ["tiny_shapes.yaml", "vit_b32_finetune.yaml"])
def test_clip_configs_parse_and_instantiate(name, tmp_path):
    from cm3leon_lightning.cli import CM3LeonCLI
    from cm3leon_lightning.data.pairs import ImageCaptionDataModule

    config = Path(__file__).parents[2] / "configs" / "clip" / name
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu"]
    if "vit" in name:
        args += ["--trainer.precision", "32-true", "--data.init_args.data_dir", str(tmp_path)]
    cli = CM3LeonCLI(args=args, run=False)
    assert isinstance(cli.model, ClipModule) and isinstance(cli.datamodule, ImageCaptionDataModule)
    assert cli.model.hparams.export_path.endswith(".safetensors")
    assert cli.model.model is None  # built later, in configure_model: parsing downloads nothing


def test_forward_uses_the_models_open_clip_resize_mode():
    """Training preprocesses like ClipEncoder and open_clip: a squashing model's images are squashed, not cropped."""
    from cm3leon_lightning.retrieval.encoder import preprocess_images

    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.configure_model()
    module.eval()
    pp = module.model.visual.preprocess_cfg
    pp["resize_mode"] = "squash"
    x = torch.zeros(2, 3, 32, 48, dtype=torch.uint8)  # content only where a center crop cuts
    x[..., :8] = torch.randint(0, 256, (2, 3, 32, 8), dtype=torch.uint8)
    x[..., -8:] = 255
    with torch.no_grad():
        img, _, _ = module(x, ["a", "b"])
        want = module.model.encode_image(preprocess_images(x, 32, pp["mean"], pp["std"], "squash"), normalize=True)
    torch.testing.assert_close(img, want, rtol=0, atol=1e-6)


def test_export_of_a_quick_gelu_model_is_rebuilt_with_quick_gelu(tmp_path):
    """Fine-tuning from the "openai" tag runs QuickGELU (create_clip forces it); ClipEncoder(model_name, file) must
    rebuild that, not the plain GELU architecture, or its embeddings are not the trained model's."""
    import open_clip

    from cm3leon_lightning.retrieval.encoder import uses_quick_gelu

    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.model = open_clip.create_model("cm3leon-clip-tiny", force_quick_gelu=True)  # as the openai tag builds it
    module.eval()
    path = module.export_weights(tmp_path / "clip.safetensors")
    enc = ClipEncoder("cm3leon-clip-tiny", pretrained=str(path))
    assert uses_quick_gelu(enc.model)
    captions = ["a red square", "a blue circle"]
    x = torch.from_numpy(make_shape_pairs(2, 32, seed=7)[0]).permute(0, 3, 1, 2)
    with torch.no_grad():
        img, txt, _ = module(x, captions)
    np.testing.assert_allclose(enc.embed_texts(captions), txt.numpy(), atol=1e-6)
    np.testing.assert_allclose(enc.embed_images(x), img.numpy(), atol=1e-6)
    plain = ClipModule(model_name="cm3leon-clip-tiny")
    plain.configure_model()
    assert not uses_quick_gelu(ClipEncoder("cm3leon-clip-tiny", pretrained=str(plain.export_weights(path))).model)
