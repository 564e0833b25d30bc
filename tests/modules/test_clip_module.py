"""ClipModule trains a tiny CLIP on generated shape pairs that retrieves matching pairs far above chance."""

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from open_clip.loss import ClipLoss

from cm3leon_lightning.data.pairs import ImageCaptionDataModule, make_shape_pairs
from cm3leon_lightning.modules.clip import MAX_LOGIT_SCALE, ClipModule, caption_match_recall
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
    with pytest.raises(ValueError, match="export_path must end in .safetensors"):
        ClipModule(export_path="runs/.safetensors")  # no suffix: export_weights would refuse it only after fit


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


def test_forward_refuses_what_the_encoder_refuses_and_captions_that_do_not_fit_the_batch():
    """Float [0, 255] images trained on rescaled or clamped pixels, silently (ClipEncoder refuses them); a caption
    count other than the batch's failed inside the loss with "Target 3 is out of bounds"."""
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.configure_model()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images\[0\] is floating point with values in \[0, 255\]"):
        module(x.float(), ["a"] * 4)
    with pytest.raises(ValueError, match="a batch of 4 images needs as many captions, got 3 captions"):
        module(x, ["a", "b", "c"])
    with pytest.raises(ValueError, match="a batch of 4 images needs as many captions, got a single str"):
        module(x, "abcd")
    img, txt, _ = module(x.float() / 255, ["a"] * 4)  # [0, 1] floats are the uint8 images
    torch.testing.assert_close(img, module(x, ["a"] * 4)[0], rtol=0, atol=1e-6)
    assert img.shape == txt.shape == (4, 64)


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
    replaced = plain.export_weights(path, overwrite=True)
    assert not uses_quick_gelu(ClipEncoder("cm3leon-clip-tiny", pretrained=str(replaced)).model)


# Preprocessing of pretrained tags that differs from open_clip's defaults (OpenAI mean/std, bicubic, "shortest").
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # e.g. ViT-L-14 laion2b_s32b_b82k


@pytest.mark.parametrize(
    "model_name, tag_pp",
    [
        ("cm3leon-clip-small", {**HALF, "interpolation": "bilinear", "resize_mode": "squash"}),  # SigLIP-style
        ("cm3leon-clip-tiny", {**HALF, "resize_mode": "longest", "fill_color": 255}),
    ],
)
def test_export_records_the_preprocessing_and_the_encoder_applies_it(tmp_path, model_name, tag_pp):
    """A model fine-tuned from a tag whose preprocessing is not the architecture's default came back from
    ClipEncoder(model_name, file) with the defaults: other image embeddings in prepare's bank and at query time."""
    from cm3leon_lightning.retrieval.encoder import preprocess_images

    torch.manual_seed(0)
    module = ClipModule(model_name=model_name)
    module.configure_model()
    module.eval()
    module.model.visual.preprocess_cfg.update(tag_pp)  # as create_model(..., pretrained=<tag>) sets it
    path = module.export_weights(tmp_path / "clip.safetensors")
    enc = ClipEncoder(model_name, pretrained=str(path))
    got_pp = enc.model.visual.preprocess_cfg
    as_tuples = lambda pp: {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in pp.items()}  # noqa: E731
    assert as_tuples(got_pp) == as_tuples(module.model.visual.preprocess_cfg)
    size = module.image_size
    x = torch.randint(0, 256, (3, 3, size, size * 3 // 2), dtype=torch.uint8)  # not square: the modes differ
    with torch.no_grad():
        img, _, _ = module(x, ["a", "b", "c"])
        default = module.model.encode_image(
            preprocess_images(x, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD), normalize=True
        )
    np.testing.assert_allclose(enc.embed_images(x), img.numpy(), rtol=0, atol=1e-6)
    assert np.abs(enc.embed_images(x) - default.numpy()).max() > 1e-3  # the defaults embed otherwise
    tuned = ClipModule(model_name=model_name, pretrained=str(path))  # fine-tuning further keeps it too
    tuned.configure_model()
    assert tuned.model.visual.preprocess_cfg == got_pp


def assert_same_embeddings(want: ClipModule, got: ClipModule) -> None:
    """Both modules embed two shape images and their captions to exactly the same features."""
    x = torch.from_numpy(make_shape_pairs(2, 64, seed=7)[0]).permute(0, 3, 1, 2)
    captions = ["a red square", "a blue circle"]
    with torch.no_grad():
        a, b = want.eval()(x, captions), got.eval()(x, captions)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=0)


def test_a_checkpoint_keeps_the_image_preprocessing(tmp_path):
    """Reloaded offline (``pretrained=None``), a checkpoint of a model fine-tuned from a tag came back with the
    architecture's default preprocessing, and an export from it recorded the defaults."""
    module = ClipModule(model_name="cm3leon-clip-small")
    module.configure_model()
    module.model.visual.preprocess_cfg.update(
        {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash"}
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    assert torch.load(tmp_path / "tuned.ckpt", weights_only=True)["clip_preprocess_cfg"]["resize_mode"] == "squash"
    loaded = ClipModule.load_from_checkpoint(tmp_path / "tuned.ckpt", pretrained=None)
    pp = loaded.model.visual.preprocess_cfg
    assert (
        tuple(pp["mean"]) == (0.5, 0.5, 0.5) and tuple(pp["std"]) == (0.5, 0.5, 0.5) and pp["resize_mode"] == "squash"
    )
    path = loaded.export_weights(tmp_path / "again.safetensors")
    assert (
        ClipEncoder("cm3leon-clip-small", pretrained=str(path)).model.visual.preprocess_cfg["resize_mode"] == "squash"
    )


def test_a_checkpoint_keeps_quick_gelu(tmp_path):
    """A model fine-tuned from the "openai" tag runs QuickGELU; reloaded offline (``pretrained=None``) its checkpoint
    came back with the architecture's GELU: other embeddings, and an export that recorded GELU."""
    from cm3leon_lightning.retrieval.encoder import uses_quick_gelu

    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-small")  # a ViT: QuickGELU in both towers
    module.model = open_clip.create_model("cm3leon-clip-small", force_quick_gelu=True)  # as the openai tag builds it
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    loaded = ClipModule.load_from_checkpoint(tmp_path / "tuned.ckpt", pretrained=None).eval()
    assert uses_quick_gelu(loaded.model)
    assert_same_embeddings(module, loaded)
    path = loaded.export_weights(tmp_path / "again.safetensors")
    assert uses_quick_gelu(ClipEncoder("cm3leon-clip-small", pretrained=str(path)).model)


def test_export_refuses_an_existing_file_and_replaces_it_whole(tmp_path, monkeypatch):
    """The export replaced any file at its path (e.g. the weights a bank's recorded sha256 names), and wrote in place:
    an error while writing left a truncated file where the previous weights were."""
    import cm3leon_lightning.retrieval.clip_files as clip_files

    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.configure_model()
    path = module.export_weights(tmp_path / "clip.safetensors")
    before = path.read_bytes()
    with torch.no_grad():
        module.model.logit_scale.add_(1.0)  # another model
    with pytest.raises(FileExistsError, match=r"clip\.safetensors already exists; pass overwrite=True"):
        module.export_weights(path)
    assert path.read_bytes() == before

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of a file, then the disk is full
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(clip_files, "save_safetensors", failing_save_file)
        with pytest.raises(OSError, match="No space left"):
            module.export_weights(path, overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["clip.safetensors"]
    module.export_weights(path, overwrite=True)
    assert path.read_bytes() != before and sorted(p.name for p in tmp_path.iterdir()) == ["clip.safetensors"]


def test_fit_refuses_an_existing_export_path_before_training(tmp_path):
    """``fit`` with an ``export_path`` that holds a file trained to the end, then replaced the file; it refuses at the
    start now, and ``overwrite_export=True`` replaces it."""
    export = tmp_path / "clip.safetensors"
    export.write_bytes(b"earlier weights")

    def fit(**kwargs) -> None:
        L.seed_everything(0, verbose=False)
        module = ClipModule(model_name="cm3leon-clip-tiny", export_path=str(export), **kwargs)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, ImageCaptionDataModule(synthetic=32, batch_size=16, val_fraction=0.0))
        assert trainer.global_step == 1

    with pytest.raises(FileExistsError, match=r"export_path .*clip\.safetensors already exists.*overwrite_export"):
        fit()
    assert export.read_bytes() == b"earlier weights"
    fit(overwrite_export=True)
    assert ClipEncoder("cm3leon-clip-tiny", pretrained=str(export)).dim == 64


def test_export_records_the_image_size_and_another_size_is_refused(tmp_path):
    """open_clip fits a ViT's position embedding to the architecture's size silently; the recorded size refuses."""
    module = ClipModule(model_name="cm3leon-clip-small")
    module.model = open_clip.create_model("cm3leon-clip-small", force_image_size=32)  # the architecture takes 64
    path = module.export_weights(tmp_path / "clip32.safetensors")
    with pytest.raises(ValueError, match=r"clip32\.safetensors were trained at image size 32x32 .* takes 64x64"):
        ClipEncoder("cm3leon-clip-small", pretrained=str(path))


def test_same_export_gives_the_same_file_and_other_preprocessing_another(tmp_path):
    """cm3leon prepare records the file's sha256 (plan and manifest) and the query side checks it: exporting the
    same model again must give the same bytes (safetensors wrote its metadata keys in a random order), and other
    preprocessing another sha256, so a bank built with one is not queried with the other."""
    from cm3leon_lightning.data.shards import file_sha256
    from cm3leon_lightning.generation.retrieve import check_clip_weights

    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.configure_model()
    shas = {file_sha256(module.export_weights(tmp_path / f"clip{i}.safetensors")) for i in range(10)}
    assert len(shas) == 1
    module.model.visual.preprocess_cfg.update(HALF)
    other = module.export_weights(tmp_path / "half.safetensors")
    recorded = {"model": "cm3leon-clip-tiny", "dim": 64, "weights_sha256": shas.pop()}
    check_clip_weights(recorded, str(tmp_path / "clip9.safetensors"), "shards/")
    with pytest.raises(ValueError, match="half.safetensors is sha256"):
        check_clip_weights(recorded, str(other), "shards/")


class _FirstStep(Callback):
    """Keeps the gradients of the first optimizer step (after DDP's average) and the losses the step computed."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.want_loss: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """The loss in float32 from the features autocast gives, to compare with what training computed."""
        if trainer.precision == "bf16-mixed":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                img, txt, scale = pl_module(batch["image"], batch["caption"])
            self.want_loss = ClipLoss()(img.float(), txt.float(), scale.float()).item()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}


def _fit_one_step(
    devices: int, batch_size: int, gather_with_grad: bool = False, local_loss: bool = False
) -> tuple[_FirstStep, dict[str, float]]:
    """One training step and one validation batch of a ViT CLIP (no BatchNorm: per-device batch statistics would
    differ) on 16 fixed pairs, in order, on ``devices`` CPU processes; returns the recorder and the logged metrics."""
    from torch.utils.data import DataLoader

    from cm3leon_lightning.data.pairs import ImageCaptionPairs, collate_pairs

    L.seed_everything(0, verbose=False)
    module = ClipModule("cm3leon-clip-small", lr=1e-3, warmup_steps=0, local_loss=local_loss,
                        gather_with_grad=gather_with_grad)  # fmt: skip
    images, captions = make_shape_pairs(16, 32, seed=3)
    data = ImageCaptionPairs(images, captions, 32)
    train = DataLoader(data, batch_size=batch_size, collate_fn=collate_pairs)  # ranks take pairs 0, 2, .. / 1, 3, ..
    val = DataLoader(ImageCaptionPairs(*make_shape_pairs(16, 32, seed=4), 32), batch_size, collate_fn=collate_pairs)
    rec = _FirstStep()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1, callbacks=[rec],
    )  # fmt: skip
    trainer.fit(module, train, val)
    return rec, {k: float(v) for k, v in trainer.callback_metrics.items()}


DDP_LOSSES = [(False, False), (True, False), (True, True)]  # (gather_with_grad, local_loss)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # processes made here, not by Lightning: it reads the rank from the environment (LightningEnvironment)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    results = {}
    for gather, local in DDP_LOSSES:
        rec, metrics = _fit_one_step(2, 8, gather, local)
        results[(gather, local)] = (rec.grads, metrics)
    try:
        _fit_one_step(2, 8, gather_with_grad=False, local_loss=True)
    except ValueError as e:
        results["refused"] = str(e)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_process_ddp_step_equals_one_process_fed_both_batches(tmp_path):
    """2 CPU processes (gloo), 8 pairs each, against one process fed the 16: the same losses, the same recall over the
    16 pairs, and the same gradients after DDP's average, for each open_clip gathering mode. Without the world-size
    scale the default mode (gradients through the local shard only) gave every weight half its gradient."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for gather, local in DDP_LOSSES:
        rec, want = _fit_one_step(1, 16, gather, local)
        for got in ranks:
            grads, metrics = got[(gather, local)]
            assert grads.keys() == rec.grads.keys()
            for name, g in grads.items():  # summed in another order: float32 noise of the tensor's largest entries
                atol = 4e-6 * float(rec.grads[name].abs().max())  # (5e-7 of 0.6 on an AMD EPYC; a halved grad: 50%)
                torch.testing.assert_close(g, rec.grads[name], rtol=1e-4, atol=atol, msg=f"{gather} {local} {name}")
            for key in ("train/loss", "val/loss", "val/i2t_r1", "val/t2i_r1"):
                assert metrics[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (gather, local, key)
        assert want["val/t2i_r1"] not in (0.0, 1.0)  # a recall that tells the 16 candidates from per-rank 8 apart
    for got in ranks:
        assert "local_loss=True" in got["refused"] and "gather_with_grad=True" in got["refused"]


def test_features_and_loss_are_float32_under_bf16_autocast():
    """bf16-mixed runs the towers in bfloat16, but the loss of logits up to 100 must be float32 (bf16: steps of 0.5)."""
    torch.manual_seed(0)
    module = ClipModule(model_name="cm3leon-clip-tiny")
    module.configure_model()
    with torch.no_grad():
        module.model.logit_scale.fill_(MAX_LOGIT_SCALE)
    x = torch.from_numpy(make_shape_pairs(4, 32, seed=9)[0]).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = module(x, ["a red square", "a blue circle", "a red circle", "a green triangle"])
    assert img.dtype == txt.dtype == scale.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-6)

    L.seed_everything(0, verbose=False)
    dm = ImageCaptionDataModule(synthetic=64, batch_size=32, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[rec := _FirstStep()],
    )  # fmt: skip
    trainer.fit(module, dm)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(rec.want_loss, rel=1e-6)


def test_load_from_checkpoint_does_not_read_the_pretrained_weights_again(tmp_path):
    """A module fine-tuned from pretrained weights (a tag to download, or a file since moved) could not be reloaded
    from its own checkpoint, which holds every weight: ``load_from_checkpoint`` read ``pretrained`` first."""
    start = ClipModule(model_name="cm3leon-clip-tiny")
    start.configure_model()
    weights = start.export_weights(tmp_path / "start.safetensors")
    tuned = ClipModule(model_name="cm3leon-clip-tiny", pretrained=str(weights))
    tuned.configure_model()
    with torch.no_grad():
        next(tuned.model.parameters()).add_(1.0)  # fine-tuned: no longer the start weights
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(tuned)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    weights.unlink()
    loaded = ClipModule.load_from_checkpoint(tmp_path / "tuned.ckpt")
    assert loaded.hparams.pretrained is None
    for (name, want), got in zip(tuned.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    with pytest.raises(Exception, match="start.safetensors"):  # asked for explicitly, the file is read
        ClipModule.load_from_checkpoint(tmp_path / "tuned.ckpt", pretrained=str(weights))


def test_a_checkpoint_saved_before_the_records_takes_them_from_its_pretrained_weights(tmp_path):
    """A checkpoint saved before the preprocessing and QuickGELU were recorded, of a model fine-tuned from weights
    that bring their own (a tag, or an export of such a model), came back from ``load_from_checkpoint`` with the
    architecture's GELU and preprocessing once it stopped reading ``pretrained``: other embeddings, without a word.
    It reads them from ``pretrained`` as before; ``pretrained=None`` passed explicitly still skips them."""
    from cm3leon_lightning.retrieval.encoder import uses_quick_gelu

    torch.manual_seed(0)
    start = ClipModule(model_name="cm3leon-clip-small")
    start.model = open_clip.create_model("cm3leon-clip-small", force_quick_gelu=True)  # as the openai tag builds it
    start.model.visual.preprocess_cfg.update(HALF)
    weights = start.export_weights(tmp_path / "start.safetensors")
    tuned = ClipModule(model_name="cm3leon-clip-small", pretrained=str(weights))
    tuned.configure_model()
    assert uses_quick_gelu(tuned.model) and tuple(tuned.model.visual.preprocess_cfg["mean"]) == HALF["mean"]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(tuned)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    ckpt = torch.load(tmp_path / "tuned.ckpt", weights_only=True)
    del ckpt["clip_preprocess_cfg"], ckpt["clip_quick_gelu"]  # as saved before they were recorded
    torch.save(ckpt, tmp_path / "older.ckpt")
    loaded = ClipModule.load_from_checkpoint(tmp_path / "older.ckpt").eval()
    assert loaded.hparams.pretrained == str(weights)
    assert uses_quick_gelu(loaded.model) and tuple(loaded.model.visual.preprocess_cfg["mean"]) == HALF["mean"]
    assert_same_embeddings(tuned, loaded)
    plain = ClipModule.load_from_checkpoint(tmp_path / "older.ckpt", pretrained=None)  # asked for: the defaults
    assert not uses_quick_gelu(plain.model) and plain.hparams.pretrained is None
    recorded = ClipModule.load_from_checkpoint(tmp_path / "tuned.ckpt")  # recorded: pretrained is not read
    assert recorded.hparams.pretrained is None and uses_quick_gelu(recorded.model)


def test_a_resume_with_more_steps_extends_the_cosine_decay(tmp_path):
    """The schedule was a WarmupDecay object, whose length LambdaLR saves and restored on resume: a run of 4 steps
    resumed with max_steps=10 trained its last 6 steps at lr 0. It now follows the 10-step schedule of a fresh run."""

    class Rates(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, list[float]]:
        L.seed_everything(0, verbose=False)
        dm = ImageCaptionDataModule(synthetic=80, batch_size=8, val_fraction=0.1)
        module = ClipModule(model_name="cm3leon-clip-tiny", lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
        rates = Rates()
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[rates],
        )  # fmt: skip
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return trainer, rates.lrs

    trainer, first = fit(4)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    _, resumed = fit(10, tmp_path / "c.ckpt")
    _, fresh = fit(10)
    cosine = [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert fresh == pytest.approx([0.5, 1.0, *cosine])
    assert first == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert resumed == pytest.approx(fresh[4:])


def test_data_of_unknown_length_needs_max_steps():
    """Lightning estimates -1 steps for an iterable dataset without max_steps: the cosine decay ended one step
    after the warm-up and the rest of the run trained at lr 0 (min_lr_ratio 0). It is now refused, naming the fix."""
    from torch.utils.data import DataLoader, IterableDataset

    from cm3leon_lightning.data.pairs import ImageCaptionPairs, collate_pairs

    class Stream(IterableDataset):
        def __init__(self, pairs: ImageCaptionPairs) -> None:
            self.pairs = pairs

        def __iter__(self):
            return (self.pairs[i] for i in range(len(self.pairs)))

    loader = DataLoader(Stream(ImageCaptionPairs(*make_shape_pairs(8, 32, seed=3), 32)), 4, collate_fn=collate_pairs)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs the length of training.*set trainer.max_steps or model max_steps"):
        trainer.fit(ClipModule("cm3leon-clip-tiny"), loader)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(ClipModule("cm3leon-clip-tiny", warmup_steps=1, min_lr_ratio=0.0), loader)
    assert trainer.global_step == 2 and trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == 0.0
