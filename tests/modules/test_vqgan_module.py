"""VQGANModule: it trains a tiny tokenizer on generated images, runs the GAN / LPIPS path, and checkpoints safely."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file

from cm3leon_lightning.data.images import ImageDataModule, synthetic_images
from cm3leon_lightning.modules.vqgan import VQGANModule, batch_images
from cm3leon_lightning.modules.vqgan_losses import LPIPS, NLayerDiscriminator, adaptive_weight, hinge_d_loss


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _held_out_error_and_usage(module: VQGANModule, images: torch.Tensor) -> tuple[float, int]:
    vq = module.vqgan
    was_training = vq.training
    vq.eval()
    codes = vq.encode(images)
    err = (vq.preprocess(images) - vq.decode(codes)).abs().mean().item()
    vq.train(was_training)
    return err, codes.unique().numel()


def test_tiny_vqgan_learns_generated_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    held_out = torch.from_numpy(synthetic_images(64, 16, seed=123)).permute(0, 3, 1, 2).contiguous()
    data = ImageDataModule(synthetic=512, synthetic_val=16, image_size=16, batch_size=8)
    module = VQGANModule(preset="micro", lr=3e-3)
    module.configure_model()
    start_err, _ = _held_out_error_and_usage(module, held_out)
    trainer = _trainer(
        tmp_path,
        200,
        limit_val_batches=1,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    end_err, used = _held_out_error_and_usage(module, held_out)
    print(f"held-out L1 {start_err:.3f} -> {end_err:.3f}, codes used {used}/32")
    assert int(module.train_steps) == 200
    assert start_err > 0.7  # an untrained decoder outputs ~0 for images in [-1, 1]
    assert end_err < 0.6 * start_err, (start_err, end_err)
    assert used >= 16, used  # at least half of the 32 codes on held-out images
    metrics = trainer.callback_metrics
    assert {"train/rec_loss", "train/usage", "train/perplexity", "val/rec_loss", "val/usage"} <= set(metrics)
    assert module.last_image_grid is not None and module.last_image_grid.shape == (3, 2 * 16 + 3, 8 * 16 + 9)


def _random_lpips_weights(path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {}
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
    convs += [(256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    slices = [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    for (cin, cout), i, s in zip(convs, indices, slices):
        tensors[f"loss.perceptual_loss.net.slice{s}.{i}.weight"] = torch.randn(cout, cin, 3, 3) * (2 / (9 * cin)) ** 0.5
        tensors[f"loss.perceptual_loss.net.slice{s}.{i}.bias"] = torch.zeros(cout)
    for n, c in enumerate((64, 128, 256, 512, 512)):
        tensors[f"loss.perceptual_loss.lin{n}.model.1.weight"] = torch.rand(1, c, 1, 1) / c
    save_file(tensors, str(path))
    return path


def test_lpips_loads_local_weights_and_measures_distance(tmp_path: Path) -> None:
    lp = LPIPS(_random_lpips_weights(tmp_path / "lpips.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lp(x, x), torch.zeros(2))
    d = lp(x, x.flip(0))
    assert d.shape == (2,) and (d > 0).all()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS(tmp_path / "missing.pth")
    save_file({"net.slice1.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        LPIPS(tmp_path / "partial.safetensors")


def test_lpips_reads_the_lpips_package_state_dict_and_names_the_file_on_wrong_shapes(tmp_path: Path) -> None:
    """``lpips.LPIPS(net="vgg").state_dict()`` holds each ``lin{n}`` layer twice, also as ``lins.{n}`` (a ModuleList
    of the same layers), and ``scaling_layer.*``: it was refused as "unexpected lins.0...". A tensor of the wrong
    shape raised torch's RuntimeError, which names no file."""
    from safetensors.torch import load_file

    source = _random_lpips_weights(tmp_path / "lpips.safetensors")
    sd = {k.removeprefix("loss.perceptual_loss."): v for k, v in load_file(str(source)).items()}
    package = dict(sd)
    package.update({f"lins.{n}.model.1.weight": sd[f"lin{n}.model.1.weight"] for n in range(5)})
    package.update({"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)})
    torch.save(package, tmp_path / "package.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(LPIPS(tmp_path / "package.pth")(x, y), LPIPS(source)(x, y))
    torch.save({**package, "lins.2.model.1.weight": torch.zeros(1, 256, 1, 1)}, tmp_path / "differ.pth")
    with pytest.raises(ValueError, match=r"differ\.pth: two different tensors for the LPIPS weight lin2\.model\.1"):
        LPIPS(tmp_path / "differ.pth")
    save_file({**sd, "lin0.model.1.weight": torch.zeros(1, 32, 1, 1)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"shape\.safetensors: .*wrong shapes 1 \['lin0\.model\.1\.weight \(1, 32"):
        LPIPS(tmp_path / "shape.safetensors")


def test_gan_and_perceptual_path_trains_both_optimizers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    module = VQGANModule(
        preset="micro",
        perceptual_weight=1.0,
        lpips_weights=str(weights),
        disc_weight=0.5,
        disc_start=2,
        disc_ndf=8,
        disc_layers=1,
    )
    module.configure_model()
    disc_before = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    data = ImageDataModule(synthetic=16, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, 6, limit_val_batches=0, enable_checkpointing=False)  # max_steps counts optimizer steps
    trainer.fit(module, data)
    # batches 0, 1: autoencoder only (2 optimizer steps); batches 2, 3: both (4 more)
    assert int(module.train_steps) == 4 and trainer.global_step == 6
    assert not torch.equal(disc_before["main.0.weight"], module.discriminator.state_dict()["main.0.weight"])
    assert {"train/p_loss", "train/g_loss", "train/d_loss", "train/d_weight"} <= set(trainer.callback_metrics)


def test_a_checkpoint_with_perceptual_loss_loads_without_the_lpips_file(tmp_path: Path) -> None:
    """load_from_checkpoint read lpips_weights' file again (FileNotFoundError once it was moved), though the
    checkpoint holds the LPIPS weights: they now come from the checkpoint, equal to the file's."""
    torch.manual_seed(0)
    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    module = VQGANModule(preset="micro", perceptual_weight=1.0, lpips_weights=str(weights))
    trainer = _trainer(tmp_path, 1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, ImageDataModule(synthetic=4, image_size=16, batch_size=4))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    want = {k: v.clone() for k, v in module.lpips.state_dict().items()}
    weights.unlink()
    loaded = VQGANModule.load_from_checkpoint(tmp_path / "model.ckpt")
    got = loaded.lpips.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(FileNotFoundError, match="LPIPS weights not found"):  # a new module still needs the file
        VQGANModule(preset="micro", perceptual_weight=1.0, lpips_weights=str(weights)).configure_model()


def test_checkpoint_loads_weights_only_and_restores_codes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", n_embed=16)
    data = ImageDataModule(synthetic=8, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(module, data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["n_embed"] == 16 and "vqgan.quantize.embedding.weight" in raw["state_dict"]
    restored = VQGANModule.load_from_checkpoint(ckpt, weights_only=True)
    restored.configure_model()  # idempotent; Lightning already called it while loading
    x = torch.from_numpy(synthetic_images(4, 16, seed=5)).permute(0, 3, 1, 2)
    assert torch.equal(restored.vqgan.eval()(x)[1].codes, module.vqgan.eval()(x)[1].codes)
    assert int(restored.train_steps) == 2


def test_load_from_checkpoint_does_not_read_init_from_again(tmp_path: Path) -> None:
    """A run started from ``init_from`` records the path in its hyper-parameters; ``load_from_checkpoint`` read it
    again (FileNotFoundError once the file was moved or the checkpoint copied elsewhere), only for the checkpoint's
    weights to replace it. It now builds the network without it, unless ``init_from`` is passed."""
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    torch.manual_seed(0)
    VQGAN.from_name("micro").save_pretrained(tmp_path / "init")
    module = VQGANModule(preset="micro", init_from=str(tmp_path / "init"), num_logged_images=0)
    trainer = _trainer(tmp_path, 1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, ImageDataModule(synthetic=8, image_size=16, batch_size=4))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "init" / "model.safetensors").unlink()
    restored = VQGANModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert restored.hparams.init_from is None
    for k, v in module.vqgan.state_dict().items():
        assert torch.equal(restored.vqgan.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="init"):  # asked for explicitly, it is read
        VQGANModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True, init_from=str(tmp_path / "init"))


def test_module_argument_errors() -> None:
    with pytest.raises(ValueError, match="lpips_weights"):
        VQGANModule(preset="micro", perceptual_weight=1.0)
    with pytest.raises(ValueError, match="unknown VQGAN preset"):
        VQGANModule(preset="nope")
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANModule(preset="micro", ch=40)
    with pytest.warns(UserWarning, match="perceptual loss is off"):
        VQGANModule(preset="micro", lpips_weights="x.pth")


def test_settings_the_run_would_ignore_are_refused_or_warned_about_naming_them() -> None:
    """A negative perceptual weight (no LPIPS) or clip value (Lightning skips clipping at <= 0) trained without them,
    and discriminator settings with ``disc_weight`` 0, Gumbel settings on the vq quantizer or ``beta`` on the Gumbel
    one were dropped, all without a word."""
    with pytest.raises(ValueError, match=r"^perceptual_weight must be >= 0, got -1.0$"):
        VQGANModule(preset="micro", perceptual_weight=-1.0)
    with pytest.raises(ValueError, match=r"^gradient_clip_val must be >= 0, got -0.5$"):
        VQGANModule(preset="micro", gradient_clip_val=-0.5)
    with pytest.raises(ValueError, match=r"^disc_start must be >= 0, got -1$"):
        VQGANModule(preset="micro", disc_start=-1)
    with pytest.warns(UserWarning, match=r"^disc_start=30000, disc_layers=2 set but disc_weight is 0: no discrimin"):
        VQGANModule(preset="micro", disc_start=30000, disc_layers=2)
    with pytest.warns(UserWarning, match=r"^gumbel_kl_weight=0.001 set but quantizer is 'vq', which does not use it"):
        VQGANModule(preset="micro", gumbel_kl_weight=1e-3)
    with pytest.warns(UserWarning, match=r"^beta=0.5 set but quantizer is 'gumbel', which does not use it"):
        VQGANModule(preset="micro", quantizer="gumbel", beta=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings that are used: no warning
        VQGANModule(preset="micro", disc_weight=0.5, disc_start=2, disc_layers=1, gradient_clip_val=0.0)
        VQGANModule(preset="micro", quantizer="gumbel", gumbel_kl_weight=1e-3, gumbel_temperature=0.5)
        VQGANModule(preset="micro", beta=0.5)


def test_hinge_loss_and_adaptive_weight_values() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    weight = adaptive_weight((3 * w).sum(), (4 * w).sum(), w)  # |grad| ratio 3/4 (up to the 1e-4 guard)
    assert weight.item() == pytest.approx(3 * 2**0.5 / (4 * 2**0.5 + 1e-4))
    disc = NLayerDiscriminator(3, ndf=8, n_layers=3)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert {"main.0.weight", "main.2.weight", "main.3.running_mean", "main.11.bias"} <= set(disc.state_dict())
    assert adaptive_weight((3 * w).sum(), (0 * w).sum(), w).item() == 1e4  # taming's clamp to [0, 1e4]
    assert not weight.requires_grad  # detached: no gradient flows through lambda


def test_discriminator_and_lpips_name_images_too_small_or_mismatched(tmp_path: Path) -> None:
    """``VQGANModule(preset="micro", disc_weight=0.5)`` (16 px, default ``disc_layers=3``) trained until
    ``disc_start`` and then stopped on torch's "Kernel size can't be greater than actual input size"; LPIPS below 16 px
    stopped on "Output size is too small", and LPIPS of one image against a batch broadcast it silently."""
    assert [NLayerDiscriminator.min_input_size(n) for n in (1, 2, 3)] == [6, 12, 24]
    disc = NLayerDiscriminator(3, ndf=8, n_layers=3).eval()
    assert disc(torch.zeros(2, 3, 24, 24)).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"16x16 are too small .* n_layers=3 \(VQGANModule disc_layers\).* 24x24"):
        disc(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"n_layers >= 1, got ndf=8, n_layers=0"):
        NLayerDiscriminator(3, ndf=8, n_layers=0)
    lp = LPIPS(_random_lpips_weights(tmp_path / "lpips.safetensors"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"of one shape .* got \(2, 3, 16, 16\) and \(1, 3, 16, 16\)"):
        lp(x, x[:1])
    with pytest.raises(ValueError, match=r"H, W >= 16 .* got \(2, 3, 8, 8\)"):
        lp(x[..., :8, :8], x[..., :8, :8])


def test_squared_error_and_cosine_decay(tmp_path: Path) -> None:
    """``rec_loss="l2"`` logs the mean squared error; ``lr_decay="cosine"`` ends at ``min_lr_ratio * lr``."""
    module = VQGANModule(preset="micro", lr=1e-3, rec_loss="l2", lr_decay="cosine", min_lr_ratio=0.25,
                         num_logged_images=0)  # fmt: skip
    module.configure_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.zeros_like(x)
    assert module.reconstruction_loss(x, y).item() == pytest.approx(x.pow(2).mean().item())
    data = ImageDataModule(synthetic=8, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    # the 4th batch ran at progress 3/4: lr * (0.25 + 0.75 * (1 + cos(3 pi / 4)) / 2)
    assert lrs[0] == pytest.approx(1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(3 * math.pi / 4))))
    assert module.learning_rate() == pytest.approx(0.25e-3)  # after the last step: the floor
    with pytest.raises(ValueError, match="rec_loss must be 'l1' or 'l2'"):
        VQGANModule(preset="micro", rec_loss="huber")
    with pytest.raises(ValueError, match="lr_decay must be"):
        VQGANModule(preset="micro", lr_decay="step")


def test_cosine_decay_with_discriminator_reaches_floor(tmp_path: Path) -> None:
    """With the discriminator on, ``max_steps`` counts two optimizer steps per batch; the decay still ends at the
    floor."""
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", lr=1e-3, lr_decay="cosine", min_lr_ratio=0.25, disc_weight=0.5, disc_start=0,
                         disc_ndf=8, disc_layers=1, num_logged_images=0)  # fmt: skip
    data = ImageDataModule(synthetic=64, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=8, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert int(module.train_steps) == 4 and trainer.global_step == 8
    # the 4th (last) batch ran at progress 3/4 of the 4 batches, for both optimizers
    expected = 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(expected)
    assert module.learning_rate() == pytest.approx(0.25e-3)  # after the last batch: the floor
    # batches per run: one optimizer step per batch before disc_start, two from it on
    assert [module.total_batches(m) for m in (1, 7, 8)] == [1, 4, 4]
    late = VQGANModule(preset="micro", disc_weight=0.5, disc_start=2, disc_layers=2)
    assert [late.total_batches(m) for m in (2, 5, 6)] == [2, 4, 4]
    assert VQGANModule(preset="micro", disc_start=2).total_batches(6) == 6  # no discriminator


def test_cosine_decay_spans_max_epochs_and_disc_lr_zero_is_a_rate(tmp_path: Path) -> None:
    """Bounded by max_epochs (max_steps -1) the cosine decay fell back to a constant rate; now it spans the epochs'
    batches. ``disc_lr=0`` was read as unset (``lr``)."""
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", lr=1e-3, lr_decay="cosine", min_lr_ratio=0.25, disc_weight=0.5, disc_start=0,
                         disc_lr=0.0, disc_ndf=8, disc_layers=1, num_logged_images=0)  # fmt: skip
    data = ImageDataModule(synthetic=16, image_size=16, batch_size=4)  # 4 batches per epoch
    trainer = _trainer(tmp_path, max_steps=-1, max_epochs=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert int(module.train_steps) == 8 and module.run_batches() == 8
    # the 8th (last) batch ran at progress 7/8
    expected = 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(7 * math.pi / 8)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert trainer.optimizers[1].param_groups[0]["lr"] == 0.0
    assert module.learning_rate() == pytest.approx(0.25e-3)

    class Stream(torch.utils.data.IterableDataset):  # no __len__: an epoch of unknown length
        def __iter__(self):
            yield from (torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2))

    stream = torch.utils.data.DataLoader(Stream(), batch_size=None)
    unknown = VQGANModule(preset="micro", lr_decay="cosine", num_logged_images=0)
    with pytest.raises(ValueError, match="lr_decay='cosine' needs the length of training"):
        _trainer(tmp_path, max_steps=-1, max_epochs=1, enable_checkpointing=False).fit(unknown, stream)
    constant = VQGANModule(preset="micro", num_logged_images=0)
    _trainer(tmp_path, max_steps=-1, max_epochs=1, enable_checkpointing=False).fit(constant, stream)
    assert int(constant.train_steps) == 2


def test_cosine_decay_spans_max_epochs_when_they_end_the_run_before_max_steps(tmp_path: Path) -> None:
    """Given both, ``max_steps`` alone set the decay's length: 2 epochs of 4 batches with ``max_steps=100`` ended at
    lr 0.99e-3 of 1e-3 instead of at the floor."""
    module = VQGANModule(preset="micro", lr=1e-3, lr_decay="cosine", min_lr_ratio=0.25, num_logged_images=0)
    data = ImageDataModule(synthetic=16, image_size=16, batch_size=4)  # 4 batches per epoch
    trainer = _trainer(tmp_path, max_steps=100, max_epochs=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert int(module.train_steps) == 8 and module.run_batches() == 8
    expected = 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(7 * math.pi / 8)))  # the 8th (last) batch: progress 7/8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert module.learning_rate() == pytest.approx(0.25e-3)
    # max_steps ends it first: its batches (3 x 2 optimizer steps from disc_start 0), not the epochs'
    gan = VQGANModule(preset="micro", disc_weight=0.5, disc_layers=1, disc_ndf=8, num_logged_images=0)
    trainer = _trainer(tmp_path, max_steps=6, max_epochs=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(gan, datamodule=data)
    assert int(gan.train_steps) == 3 and gan.run_batches() == 3


def test_training_checkpoint_loads_with_from_pretrained(tmp_path: Path) -> None:
    """``VQGAN.from_pretrained`` reads a VQGANModule ``last.ckpt``: ``vqgan.*`` weights, architecture from hparams."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cm3leon_lightning.tokenization.vqgan import VQGAN
    from cm3leon_lightning.tokenization.vqgan_io import read_checkpoint

    torch.manual_seed(0)
    module = VQGANModule(preset="micro", n_embed=16, l2_normalize=True, disc_weight=0.5, disc_ndf=8, disc_layers=1,
                         num_logged_images=0)  # fmt: skip
    data = ImageDataModule(synthetic=8, image_size=16, batch_size=4)
    run = tmp_path / "run"
    trainer = _trainer(
        tmp_path, 2, limit_val_batches=0, callbacks=[ModelCheckpoint(run / "checkpoints", save_last=True)]
    )
    trainer.fit(module, data)
    ckpt = run / "checkpoints" / "last.ckpt"
    state, config = read_checkpoint(ckpt)
    assert config == module.config and config.n_embed == 16 and config.l2_normalize
    assert set(state) == set(module.vqgan.state_dict())  # prefix stripped; discriminator, train_steps dropped
    x = torch.from_numpy(synthetic_images(4, 16, seed=5)).permute(0, 3, 1, 2)
    expected = module.vqgan.eval().encode(x)
    for source in (ckpt, run):  # the file, or the run directory holding checkpoints/last.ckpt
        loaded = VQGAN.from_pretrained(source)
        assert loaded.config == module.config and not loaded.training
        assert torch.equal(loaded.encode(x), expected)
        for k, v in module.vqgan.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    # an explicit architecture still wins over the recorded one
    with pytest.raises(ValueError, match="shapes"):
        VQGAN.from_pretrained(ckpt, preset="micro")


def test_lpips_refuses_pickled_checkpoint_with_conversion_hint(tmp_path: Path) -> None:
    """A Lightning 1.x checkpoint as ``lpips_weights``: a ValueError naming the argument and the file, and the
    conversion command it suggests produces weights LPIPS loads."""
    import argparse
    import re
    import subprocess
    import sys

    from safetensors.torch import load_file

    tensors = load_file(str(_random_lpips_weights(tmp_path / "ref.safetensors")))
    ckpt = tmp_path / "taming.ckpt"
    torch.save({"state_dict": tensors, "hparams": argparse.Namespace(lr=1.0)}, ckpt)  # pickles a Python object
    with pytest.raises(ValueError, match=f"lpips_weights='{re.escape(str(ckpt))}' holds pickled") as info:
        LPIPS(ckpt)
    command = re.search(r'python -c "(.*)"\. Details', str(info.value)).group(1)
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True)
    converted = LPIPS(tmp_path / "lpips.safetensors")
    reference = LPIPS(tmp_path / "ref.safetensors")
    for k, v in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k


def test_gumbel_temperature_anneals_over_the_run(tmp_path: Path) -> None:
    """``gumbel_temperature_end`` anneals the Gumbel-softmax temperature with a cosine over the run's batches (taming's
    gumbel_f8 schedule); each batch's temperature is logged and reaches the quantizer."""
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", quantizer="gumbel", gumbel_temperature=0.9, gumbel_temperature_end=0.1,
                         num_logged_images=0)  # fmt: skip
    assert module.config.gumbel_temperature == 0.9
    data = ImageDataModule(synthetic=16, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    expected = [0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]
    assert module.vqgan.quantize.temperature == pytest.approx(expected[-1])  # the 4th batch ran at progress 3/4
    assert module.gumbel_temperature() == pytest.approx(0.1)  # after the last batch: the end value
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("train/gumbel_temperature")
    logged = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert logged == pytest.approx(expected)
    constant = VQGANModule(preset="micro", quantizer="gumbel", gumbel_temperature=0.5)
    assert constant.gumbel_temperature() == 0.5
    assert VQGANModule(preset="micro").gumbel_temperature() is None

    class Stream(torch.utils.data.IterableDataset):  # no __len__: an epoch of unknown length
        def __iter__(self):
            yield from (torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2))

    unknown = VQGANModule(preset="micro", quantizer="gumbel", gumbel_temperature_end=0.1, num_logged_images=0)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=None)
    with pytest.raises(ValueError, match="gumbel_temperature_end anneals over the length of training"):
        _trainer(tmp_path, max_steps=-1, max_epochs=1, enable_checkpointing=False).fit(unknown, stream)


def test_gumbel_temperature_argument_errors() -> None:
    """The annealing needs the Gumbel quantizer and a positive end; the temperature itself must be positive."""
    with pytest.raises(ValueError, match="gumbel_temperature_end anneals the Gumbel-softmax quantizer, but quantizer"):
        VQGANModule(preset="micro", gumbel_temperature_end=0.1)
    with pytest.raises(ValueError, match="gumbel_temperature_end must be a finite number > 0"):
        VQGANModule(preset="micro", quantizer="gumbel", gumbel_temperature_end=0.0)
    with pytest.raises(ValueError, match="gumbel_temperature must be a finite number > 0"):
        VQGANModule(preset="micro", quantizer="gumbel", gumbel_temperature=0.0)
    # settings of the nearest-neighbour quantizer were silently ignored by the Gumbel one (as taming's recipe in
    # configs/vqgan/f8_8192.yaml reads if only quantizer: gumbel is changed)
    with pytest.raises(
        ValueError, match=r"l2_normalize=True, dead_code_after=1000 set the nearest-neighbour quantizer"
    ):
        VQGANModule(preset="micro", quantizer="gumbel", l2_normalize=True, dead_code_after=1000)
    with pytest.raises(ValueError, match=r"ema_decay=0.99 set the nearest-neighbour quantizer \(quantizer: vq\)"):
        VQGANModule(preset="micro", quantizer="gumbel", ema_decay=0.99)
    assert VQGANModule(preset="micro", quantizer="gumbel", l2_normalize=False, dead_code_after=0).config.quantizer == (
        "gumbel"
    )


def test_lpips_equals_taming_formula_on_torchvision_vgg16(tmp_path: Path) -> None:
    """LPIPS by hand on torchvision's VGG16 (taming's lpips.py): scale ``(x - shift) / scale``, features after
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each unit-normalised over channels (``x / (|x| + 1e-10)``), squared
    difference, 1x1 ``lin`` conv, spatial mean, summed over the five layers."""
    from safetensors.torch import load_file
    from torchvision.models import vgg16

    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    tensors = {k.removeprefix("loss.perceptual_loss."): v for k, v in load_file(str(weights)).items()}
    features = vgg16(weights=None).features.eval()
    features.load_state_dict(
        {f"{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in tensors.items() if k.startswith("net.")}
    )
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h_x, h_y, expected = (x - shift) / scale, (y - shift) / scale, torch.zeros(2)
    with torch.no_grad():
        for n, end in enumerate((4, 9, 16, 23, 30)):
            for i in range((0, 4, 9, 16, 23)[n], end):
                h_x, h_y = features[i](h_x), features[i](h_y)
            unit_x = h_x / (h_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            unit_y = h_y / (h_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            lin = tensors[f"lin{n}.model.1.weight"]
            expected += torch.nn.functional.conv2d((unit_x - unit_y).pow(2), lin).mean(dim=(1, 2, 3))
        got = LPIPS(weights)(x, y)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0), (got, expected)


def test_lpips_stays_deterministic_when_its_parent_trains(tmp_path: Path) -> None:
    """``module.train()`` (a plain training loop, Fabric) put LPIPS' dropout back on: the perceptual loss of the same
    pair changed from call to call. LPIPS stays in eval mode."""
    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    module = VQGANModule(preset="micro", perceptual_weight=1.0, lpips_weights=str(weights))
    module.configure_model()
    module.train()
    assert module.vqgan.training and not any(m.training for m in module.lpips.modules())
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        first = module.lpips(x, y)
        assert torch.equal(module.lpips(x, y), first)
        assert torch.equal(module.lpips.eval()(x, y), first)


def test_generator_loss_is_taming_composition(tmp_path: Path) -> None:
    """The logged autoencoder loss of a step equals taming's ``VQLPIPSWithDiscriminator`` by hand: ``nll = |x - x'| +
    w_p LPIPS``, ``+ w_c (codebook + commitment)``, ``+ w_d lambda (-mean D(x'))`` with ``lambda`` the clamped
    gradient-norm ratio at the decoder's last layer (learning rates 0, so the weights after the step are those the
    step used)."""

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batch = batch

    torch.manual_seed(0)
    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    module = VQGANModule(preset="micro", lr=0.0, codebook_weight=0.5, perceptual_weight=0.7,
                         lpips_weights=str(weights), disc_weight=0.3, disc_start=0, disc_ndf=8, disc_layers=1,
                         num_logged_images=0)  # fmt: skip
    keep = Keep()
    trainer = _trainer(tmp_path, 2, limit_val_batches=0, enable_checkpointing=False, callbacks=[keep])
    trainer.fit(module, ImageDataModule(synthetic=8, image_size=16, batch_size=4))
    assert int(module.train_steps) == 1
    module.train()
    vq = module.vqgan
    x = vq.preprocess(batch_images(keep.batch))
    q = vq.quantize(vq.encode_latent(x))
    x_rec = vq.decode_latent(q.z_q)
    nll = (x - x_rec).abs().mean() + 0.7 * module.lpips(x, x_rec).mean()
    g_loss = -module.discriminator(x_rec).mean()
    nll_grad = torch.autograd.grad(nll, vq.decoder.conv_out.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, vq.decoder.conv_out.weight, retain_graph=True)[0]
    d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4) * 0.3
    expected = nll + 0.5 * (q.codebook_loss + q.commitment_loss) + d_weight * g_loss
    metrics = trainer.callback_metrics
    assert metrics["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_clipping_applies_to_unscaled_gradients_under_16_mixed(tmp_path: Path) -> None:
    """With ``16-mixed``'s grad scaler, ``clip_gradients`` before ``opt.step()`` clipped the gradients while still
    multiplied by 2^16: the step used a norm of ``gradient_clip_val / 65536``. The step's gradients (the autoencoder's
    stay in ``.grad`` until the next batch) now have norm ``gradient_clip_val``."""
    from lightning.pytorch.plugins import MixedPrecision

    class StepNorms(L.Callback):
        norms: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            grads = [p.grad for p in pl_module.vqgan.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    torch.manual_seed(0)
    module = VQGANModule(preset="micro", gradient_clip_val=0.01, num_logged_images=0)
    norms = StepNorms()
    trainer = _trainer(tmp_path, 2, limit_val_batches=0, enable_checkpointing=False, callbacks=[norms],
                       plugins=[MixedPrecision("16-mixed", "cpu")])  # fmt: skip
    assert trainer.precision_plugin.scaler is not None
    trainer.fit(module, ImageDataModule(synthetic=8, image_size=16, batch_size=4))
    assert norms.norms == pytest.approx([0.01, 0.01], rel=1e-4)


RESTARTS = {"dead_code_after": 2, "ema_decay": 0.9}  # restarts: counters and the latents they draw
GUMBEL = {"quantizer": "gumbel", "gumbel_temperature_end": 0.1}  # Gumbel noise and the annealed temperature


@pytest.mark.parametrize(
    ("overrides", "images"),
    [
        (RESTARTS, 64),  # the checkpoint after batch 4 of 16: mid-epoch
        (GUMBEL, 64),
        (RESTARTS, 16),  # after batch 4 of 4: at the epoch's end, as the default checkpoint cadence saves
        (GUMBEL, 16),
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, overrides: dict, images: int) -> None:
    """A run resumed from a mid-run checkpoint ends with the weights of the uninterrupted run. The quantizer's
    dead-code counters (not in the state dict) restarted at 0 and the RNG (Gumbel noise, restart picks) at the seed,
    so restarts and Gumbel samples differed after a resume. From a checkpoint at an epoch's end the restored RNG still
    differed: the uninterrupted run drew the next epoch's DataLoader seed from it after the save (131 of 134 tensors
    differed), so the module draws from a stream of its own."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root: Path, ckpt: Path | None = None) -> VQGANModule:
        L.seed_everything(0)
        module = VQGANModule(preset="micro", n_embed=32, lr=3e-3, lr_decay="cosine", disc_weight=0.5, disc_start=2,
                             disc_ndf=8, disc_layers=1, num_logged_images=0, **overrides)  # fmt: skip
        every_step = ModelCheckpoint(root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = _trainer(tmp_path, 14, limit_val_batches=0, callbacks=[every_step])  # 8 batches
        trainer.fit(module, ImageDataModule(synthetic=images, image_size=16, batch_size=4), ckpt_path=ckpt)
        return module

    full = fit(tmp_path / "full")
    resumed = fit(tmp_path / "resumed", tmp_path / "full" / "step=6.ckpt")  # after batch 4 (2 + 2 x 2 steps)
    assert int(full.train_steps) == int(resumed.train_steps) == 8
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    if overrides is RESTARTS:
        assert torch.equal(resumed.vqgan.quantize.steps_unused, full.vqgan.quantize.steps_unused)


def test_image_grid_is_logged_at_the_step_of_the_validation_scalars(tmp_path: Path) -> None:
    """The reconstruction grid went to ``global_step`` (two optimizer steps per batch with the discriminator) while
    Lightning logs every scalar at the batch count: after 2 GAN batches the grid sat at step 4, ``val/rec_loss``
    at 1."""
    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):  # a logger with Weights & Biases' log_image
        name, version = "recorder", 0
        steps: dict[str, list[int]] = {}

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            for key in metrics:
                self.steps.setdefault(key, []).append(step)

        def log_image(self, key, images, step=None) -> None:
            self.steps.setdefault(key, []).append(step)

    torch.manual_seed(0)
    module = VQGANModule(preset="micro", disc_weight=0.5, disc_start=0, disc_ndf=8, disc_layers=1, num_logged_images=2)
    recorder = Recorder()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=recorder, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2,
                        check_val_every_n_epoch=None, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, ImageDataModule(synthetic=16, synthetic_val=4, image_size=16, batch_size=4))
    assert trainer.global_step == 4 and recorder.steps["val/rec_loss"] == [1]
    assert recorder.steps["val/reconstructions"] == [1]


def test_a_fit_from_a_loaded_checkpoint_counts_its_batches_from_zero(tmp_path: Path) -> None:
    """After load_from_checkpoint, a new fit (step 0) kept the checkpoint's batch count: the cosine decay of its
    4 batches ran at the floor rate throughout, and disc_start counted the old run's batches. A resume keeps it."""
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", lr=1e-3, lr_decay="cosine", min_lr_ratio=0.25, disc_weight=0.5, disc_start=6,
                         disc_ndf=8, disc_layers=1, num_logged_images=0)  # fmt: skip
    data = ImageDataModule(synthetic=64, image_size=16, batch_size=4)
    trainer = _trainer(tmp_path, max_steps=8, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert (int(module.train_steps), trainer.global_step) == (7, 8)  # batches 6 and 7 stepped the discriminator too
    trainer.save_checkpoint(tmp_path / "v.ckpt")
    reloaded = VQGANModule.load_from_checkpoint(tmp_path / "v.ckpt")
    again = _trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False)
    again.fit(reloaded, datamodule=data)
    # 4 batches before disc_start: one optimizer step each; the 4th ran at progress 3/4
    assert (int(reloaded.train_steps), again.global_step) == (4, 4)
    expected = 1e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert again.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    resumed = VQGANModule.load_from_checkpoint(tmp_path / "v.ckpt")
    later = _trainer(tmp_path, max_steps=10, limit_val_batches=0, enable_checkpointing=False)
    later.fit(resumed, datamodule=data, ckpt_path=tmp_path / "v.ckpt")
    assert (int(resumed.train_steps), later.global_step) == (8, 10)  # one more batch, with the discriminator


def test_a_frozen_autoencoder_trains_the_discriminator_on_the_cosine_decay(tmp_path: Path) -> None:
    """``lr=0`` with ``disc_lr`` trains the discriminator alone; under ``lr_decay="cosine"`` the rates were scaled by
    ``learning_rate() / lr``, which divided by zero at the first batch."""
    torch.manual_seed(0)
    module = VQGANModule(preset="micro", lr=0.0, disc_lr=1e-3, lr_decay="cosine", min_lr_ratio=0.25, disc_weight=0.5,
                         disc_start=0, disc_ndf=8, disc_layers=1, num_logged_images=0)  # fmt: skip
    module.configure_model()
    before = module.vqgan.decoder.conv_out.weight.detach().clone()
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=ImageDataModule(synthetic=16, image_size=16, batch_size=4))
    assert int(module.train_steps) == 2 and module.learning_rate() == 0.0
    # the 2nd (last) batch ran at progress 1/2 of the 2 batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    assert trainer.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 * (0.25 + 0.75 * 0.5))
    assert torch.equal(module.vqgan.decoder.conv_out.weight, before)


def test_a_discriminator_or_lpips_too_deep_for_the_resolution_is_refused_at_construction(tmp_path: Path) -> None:
    """``preset: micro`` (16 px) with the default ``disc_layers: 3`` (24 px at least) trained until ``disc_start``
    and then stopped with torch's "Kernel size can't be greater than actual input size"; it is refused at once."""
    with pytest.raises(ValueError, match=r"^disc_layers=3 needs images of at least 24 pixels per side, but the "
                       r"VQGAN's resolution is 16: lower disc_layers$"):  # fmt: skip
        VQGANModule(preset="micro", disc_weight=0.5, disc_start=30000)
    assert VQGANModule(preset="micro", disc_weight=0.5, disc_layers=2).hparams.disc_layers == 2  # 12 px: fits
    assert VQGANModule(preset="micro", disc_layers=3).hparams.disc_weight == 0  # no discriminator: no check
    weights = _random_lpips_weights(tmp_path / "lpips.safetensors")
    with pytest.raises(ValueError, match=r"LPIPS, VGG16\) needs images of at least 16 pixels per side, but the "
                       r"VQGAN's resolution is 8: set perceptual_weight: 0"):  # fmt: skip
        VQGANModule(preset="micro", resolution=8, perceptual_weight=1.0, lpips_weights=str(weights))
