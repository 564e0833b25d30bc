"""VQGAN tokenizer: published key layout, preset grids, encode/decode contract, checkpoint formats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cm3leon_lightning.tokenization.quantize import GumbelQuantizer, VectorQuantizer, code_statistics
from cm3leon_lightning.tokenization.vqgan import PRESETS, VQGAN, VQGANConfig, to_uint8
from cm3leon_lightning.tokenization.vqgan_io import config_from_taming_yaml, load_vqgan

FIXTURES = Path(__file__).parents[1] / "fixtures" / "vqgan_keys"


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _published(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (FIXTURES / f"{name}.txt").read_text().splitlines():
        key, shape = line.split()
        out[key] = tuple(int(s) for s in shape.split(","))
    return out


@pytest.mark.parametrize("name", ["f8_8192", "f16_16384", "chameleon"])
def test_preset_keys_and_shapes_equal_published_checkpoint(name: str) -> None:
    with torch.device("meta"):
        model = VQGAN.from_name(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _published(name)


@pytest.mark.parametrize(
    ("name", "resolution", "grid", "n_embed"),
    [("f8_8192", 256, 32, 8192), ("f16_16384", 256, 16, 16384), ("chameleon", 512, 32, 8192), ("tiny", 32, 8, 64)],
)
def test_preset_maps_resolution_to_documented_grid(name: str, resolution: int, grid: int, n_embed: int) -> None:
    cfg = VQGANConfig.from_name(name)
    assert (cfg.resolution, cfg.grid_size, cfg.n_embed, cfg.num_tokens) == (resolution, (grid, grid), n_embed, grid**2)
    with torch.device("meta"):
        model = VQGAN(cfg).eval()
        codes = model.encode(torch.empty(2, 3, resolution, resolution))
        images = model.decode(codes)
    assert codes.shape == (2, grid * grid) and codes.dtype == torch.long
    assert images.shape == (2, 3, resolution, resolution)


def test_encode_deterministic_and_decode_shape_and_range() -> None:
    torch.manual_seed(0)
    model = VQGAN.from_name("tiny").eval()
    x = _images(3, 32)
    codes = model.encode(x)
    assert torch.equal(codes, model.encode(x))
    assert torch.equal(codes, model.encode(x.float() / 127.5 - 1))  # uint8 and [-1, 1] floats are the same image
    assert torch.equal(codes[1:2], model.encode(x[1:2]))  # batching does not change codes
    out = model.decode(codes)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(model.decode(codes.view(3, 8, 8)), out)
    u8 = to_uint8(out)
    assert u8.dtype == torch.uint8 and torch.equal(
        to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 128, 255, 255], dtype=torch.uint8)
    )


def test_gumbel_eval_is_argmax_without_noise() -> None:
    torch.manual_seed(0)
    q = GumbelQuantizer(8, 8, 16).eval()
    z = torch.randn(2, 8, 4, 4)
    out = q(z)
    assert torch.equal(out.codes, q.proj(z).argmax(1))
    assert torch.equal(out.z_q, q.embed.weight[out.codes].permute(0, 3, 1, 2))
    model = VQGAN.from_name("tiny", quantizer="gumbel").eval()
    x = _images(2, 32)
    assert torch.equal(model.encode(x), model.encode(x))


def test_vector_quantizer_nearest_neighbour_straight_through_and_losses() -> None:
    q = VectorQuantizer(3, 2, beta=0.25)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    z = torch.tensor([[0.9, 0.8], [-0.9, 1.7], [0.1, -0.1], [0.6, 0.6]]).T.reshape(1, 2, 2, 2).requires_grad_(True)
    out = q(z)
    assert out.codes.tolist() == [[[1, 2], [0, 1]]]
    expected = q.embedding.weight[out.codes].permute(0, 3, 1, 2)
    assert torch.allclose(out.z_q, expected)
    mse = ((expected - z) ** 2).mean()
    assert torch.allclose(out.codebook_loss, mse) and torch.allclose(out.commitment_loss, 0.25 * mse)
    out.z_q.sum().backward()  # straight-through: identity gradient to the encoder
    assert torch.equal(z.grad, torch.ones_like(z))


def test_l2_normalized_ema_and_dead_code_restart() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, l2_normalize=True)
    z = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    out = q(z)
    cosine = torch.nn.functional.normalize(q.embedding.weight, dim=1) @ torch.tensor([0.6, 0.8])
    assert out.codes.item() == cosine.argmax().item()  # lookup by cosine similarity
    assert out.z_q.flatten().norm().item() == pytest.approx(1.0)  # codes are unit length
    ema = VectorQuantizer(2, 2, ema_decay=0.5).train()
    with torch.no_grad():
        ema.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        ema.ema_embed_sum.copy_(ema.embedding.weight)
    assert not ema.embedding.weight.requires_grad
    ema(torch.tensor([2.0, 2.0]).view(1, 2, 1, 1))
    assert ema.embedding.weight[0, 0] > 0.5  # code 0 moved towards its latent without gradients
    dead = VectorQuantizer(4, 2, dead_code_after=2).train()
    z = torch.full((1, 2, 2, 2), 5.0)
    dead(z)
    dead(z)  # codes unused twice -> restart picked, written at the next forward
    dead(z)
    assert (dead.embedding.weight == 5.0).all(dim=1).sum() == 3  # the 3 unused codes now sit on the latent


def test_code_statistics() -> None:
    usage, ppl = code_statistics(torch.tensor([0, 0, 1, 1]), 4)
    assert usage.item() == 0.5 and ppl.item() == pytest.approx(2.0)


def test_errors_name_the_problem() -> None:
    model = VQGAN.from_name("micro").eval()
    with pytest.raises(ValueError, match="16x16"):
        model.encode(_images(1, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 64), -1))
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        model.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="unknown VQGAN preset"):
        VQGANConfig.from_name("f4")
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48)
    with pytest.raises(ValueError, match="divisible"):
        VQGANConfig(resolution=100, ch_mult=(1, 1, 2, 4))


def test_save_load_round_trip_gives_identical_codes(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = VQGAN.from_name("tiny").eval()
    x = _images(4, 32, seed=3)
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    ema = VQGAN.from_name("micro", ema_decay=0.9)
    ema.save_pretrained(tmp_path / "ema")
    assert VQGAN.from_pretrained(tmp_path / "ema").config.ema_decay == 0.9


def _taming_checkpoint(path: Path, model: VQGAN, pickled_extra: bool = False) -> None:
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state}
    if pickled_extra:
        ckpt["callbacks"] = {Path: {"best_model_score": 0.1}}  # a class as key, as PL 1.x stored callbacks
    torch.save(ckpt, path)


def test_taming_layout_ckpt_with_loss_entries_loads_and_encodes(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ref = VQGAN.from_name("tiny").eval()
    _taming_checkpoint(tmp_path / "last.ckpt", ref)
    loaded = VQGAN.from_pretrained(tmp_path / "last.ckpt", preset="tiny")
    x = _images(2, 32)
    assert torch.equal(loaded.encode(x), ref.encode(x))
    # a taming log directory: checkpoints/last.ckpt + configs/model.yaml
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "configs").mkdir()
    _taming_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", ref)
    cfg = ref.config
    (tmp_path / "run" / "configs" / "model.yaml").write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n"
        f"    embed_dim: {cfg.embed_dim}\n    n_embed: {cfg.n_embed}\n    ddconfig:\n      double_z: false\n"
        f"      z_channels: {cfg.z_channels}\n      resolution: {cfg.resolution}\n"
        "      in_channels: 3\n      out_ch: 3\n"
        f"      ch: {cfg.ch}\n      ch_mult: {list(cfg.ch_mult)}\n      num_res_blocks: {cfg.num_res_blocks}\n"
        f"      attn_resolutions: {list(cfg.attn_resolutions)}\n      dropout: 0.0\n"
        "    lossconfig:\n      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator\n"
    )
    assert torch.equal(VQGAN.from_pretrained(tmp_path / "run").encode(x), ref.encode(x))


def test_chameleon_ckpt_with_yaml(tmp_path: Path) -> None:
    yaml_text = (
        "model:\n  base_learning_rate: 4.5e-06\n  target: taming.models.vqgan.VQModel\n  params:\n"
        "    embed_dim: 256\n    n_embed: 8192\n    ddconfig:\n      double_z: false\n      z_channels: 256\n"
        "      resolution: 512\n      in_channels: 3\n      out_ch: 3\n      ch: 128\n      ch_mult: [1, 1, 2, 2, 4]\n"
        "      num_res_blocks: 2\n      attn_resolutions: []\n      dropout: 0.0\n"
    )
    (tmp_path / "vqgan.yaml").write_text(yaml_text)
    assert config_from_taming_yaml(tmp_path / "vqgan.yaml") == PRESETS["chameleon"]
    # the loader wiring, with a small architecture in the same yaml schema
    small = VQGAN.from_name("micro").eval()
    small_yaml = yaml_text.replace("256", "32").replace("8192", "32").replace("512", "16").replace("128", "32")
    small_yaml = small_yaml.replace("[1, 1, 2, 2, 4]", "[1, 1]").replace("num_res_blocks: 2", "num_res_blocks: 1")
    small_yaml = small_yaml.replace("embed_dim: 32", "embed_dim: 8")
    (tmp_path / "vqgan.yaml").write_text(small_yaml)
    _taming_checkpoint(tmp_path / "vqgan.ckpt", small)
    loaded = VQGAN.from_pretrained(tmp_path)
    x = _images(2, 16)
    assert torch.equal(loaded.encode(x), small.encode(x))


def test_pickled_checkpoint_refused_unless_trusted(tmp_path: Path) -> None:
    ref = VQGAN.from_name("micro").eval()
    _taming_checkpoint(tmp_path / "pl1.ckpt", ref, pickled_extra=True)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        VQGAN.from_pretrained(tmp_path / "pl1.ckpt", preset="micro")
    loaded = VQGAN.from_pretrained(tmp_path / "pl1.ckpt", preset="micro", trust_pickle=True)
    x = _images(1, 16)
    assert torch.equal(loaded.encode(x), ref.encode(x))


def test_missing_file_and_mismatched_keys(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        VQGAN.from_pretrained(tmp_path / "nope.ckpt", preset="micro")
    ref = VQGAN.from_name("micro")
    state = dict(ref.state_dict())
    state.pop("encoder.conv_in.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"missing keys 1 \(encoder.conv_in.bias\).*unexpected keys 1 \(encoder.extra"):
        VQGAN.from_pretrained(tmp_path / "bad.ckpt", preset="micro")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "ok.ckpt")
    with pytest.raises(ValueError, match="missing keys .*quantize.embedding.weight"):
        VQGAN.from_pretrained(tmp_path / "ok.ckpt", preset=VQGANConfig.from_name("micro", quantizer="gumbel"))
    with pytest.raises(ValueError, match="shapes"):
        VQGAN.from_pretrained(tmp_path / "ok.ckpt", preset=VQGANConfig.from_name("micro", n_embed=64))
    with pytest.raises(ValueError, match="pass preset="):
        load_vqgan(tmp_path / "ok.ckpt")
    (tmp_path / "cfg.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a cm3leon_lightning.vqgan config"):
        load_vqgan(tmp_path / "ok.ckpt", config_path=tmp_path / "cfg.json")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_images_refused(bad: float) -> None:
    model = VQGAN.from_name("micro").eval()
    x = _images(2, 16).float() / 127.5 - 1
    x[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        model.encode(x)


@pytest.mark.parametrize("l2", [False, True])
def test_nearest_code_under_bf16_autocast(l2: bool) -> None:
    """bf16-mixed training (configs/vqgan/f8_8192.yaml) and bf16 encoding pick the nearest code, as float32 does: the
    distances are computed in float32 (bf16 z.e products, 8 significant bits, chose a wrong code for ~1% of latents)."""
    torch.manual_seed(0)
    q = VectorQuantizer(1024, 64, l2_normalize=l2).eval()
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(8, 64, 16, 16).bfloat16()  # what quant_conv gives under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = q(z).codes
    assert torch.equal(codes, q(z.float()).codes)


def test_ema_counts_are_exact_under_bf16_autocast() -> None:
    """The EMA cluster sizes and sums are accumulated in float32: a bf16 count of 257 latents is 256."""
    q = VectorQuantizer(2, 2, ema_decay=0.5).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.ema_embed_sum.copy_(q.embedding.weight)
    z = torch.full((1, 2, 257, 1), 0.5, dtype=torch.bfloat16)  # 257 latents, all nearest to code 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(z)
    assert q.ema_cluster_size.tolist() == [0.5 * 1 + 0.5 * 257, 0.5]
    assert q.ema_embed_sum[0].tolist() == [0.5 * 257 * 0.5, 0.5 * 257 * 0.5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_uint8_and_float_images_are_the_same_input_at_any_precision(dtype: torch.dtype) -> None:
    """uint8 images are scaled in float32 and then cast, so a half-precision model sees exactly what it sees for the
    same image given as floats in [-1, 1] (scaling in bf16 moved 128 of the 256 grey levels)."""
    model = VQGAN.from_name("micro").eval().to(dtype)
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    as_float = model.preprocess(x.double() / 127.5 - 1)
    assert model.preprocess(x).dtype == dtype
    assert torch.equal(model.preprocess(x), as_float)
    assert torch.equal(to_uint8(as_float.float()), x)


def test_restart_chosen_by_the_last_training_forward_is_decoded_and_saved(tmp_path: Path) -> None:
    """Dead-code restarts wait for the next forward (the backward still needs the old codebook); decode and
    state_dict / save_pretrained write them first, so a model saved right after training encodes and decodes like
    the model in memory, and decode does not change when encode is called."""
    torch.manual_seed(0)
    model = VQGAN.from_name("micro", dead_code_after=1).train()
    x = _images(4, 16)
    with torch.no_grad():
        model(x)  # a training forward: unused codes are picked for restart
    assert model.quantize._pending_restart is not None
    model.eval()
    codes = torch.arange(64).remainder(32).view(1, 64)
    before = model.decode(codes)
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(model.decode(codes), before)
    assert torch.equal(loaded.decode(codes), before)


def test_gumbel_codes_under_bf16_autocast_and_bf16_model() -> None:
    """The Gumbel logits are computed in float32: under bf16 autocast (or in a bf16 model) their argmax chose a wrong
    code for ~2% of latents of a 1024-code book (8-bit logits tie or swap the top codes)."""
    torch.manual_seed(0)
    q = GumbelQuantizer(64, 64, 1024).eval()
    z = torch.randn(8, 64, 16, 16).bfloat16()  # what quant_conv gives under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = q(z).codes
    assert torch.equal(codes, q(z.float()).codes)
    half = GumbelQuantizer(64, 64, 1024).bfloat16().eval()
    exact = GumbelQuantizer(64, 64, 1024).eval()
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    assert torch.equal(half(z).codes, exact(z.float()).codes)
    half.train()
    out = half(z)  # sampling in a bf16 model: float32 one-hot samples meet the bf16 codebook
    assert out.z_q.dtype == torch.bfloat16 and torch.equal(out.z_q, half.lookup(out.codes))


def test_gumbel_kl_to_uniform_and_straight_through_values() -> None:
    """taming's ``GumbelQuantize``: KL(q || uniform) = sum q log(q K), averaged over positions and weighted; training
    gives hard one-hot codes forward, and the soft sample's gradient to the logits backward."""
    q = GumbelQuantizer(2, 2, 4, kl_weight=0.5, temperature=1.0)
    with torch.no_grad():
        q.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]).view(4, 2, 1, 1))
        q.proj.bias.zero_()
        q.embed.weight.copy_(torch.arange(8.0).view(4, 2))
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)  # logits (2, 0, 0, -2) and (0, 0, 0, 0)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, -2.0]), 0)
    kl_first = (p * torch.log(p * 4)).sum().item()  # the second position is uniform: KL 0
    assert q.eval()(z).commitment_loss.item() == pytest.approx(0.5 * kl_first / 2, rel=1e-5)
    assert q(z).codes.tolist() == [[[0, 0]]]  # eval: argmax, first index on ties
    torch.manual_seed(0)
    q.train()
    zz = z.clone().requires_grad_(True)
    out = q(zz)
    assert out.commitment_loss.item() == pytest.approx(0.5 * kl_first / 2, rel=1e-5)
    assert torch.allclose(out.z_q, q.lookup(out.codes), rtol=0, atol=1e-6)  # hard: the chosen codes' vectors
    out.z_q.sum().backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0  # soft gradient reaches the encoder


def test_ema_update_values_with_laplace_smoothing() -> None:
    """One EMA step by hand: N <- d N + (1 - d) n, m <- d m + (1 - d) sum z, e = m / ((N + eps) / (sum N + K eps)
    * sum N), with eps 1e-5; the returned codes are the updated ones."""
    q = VectorQuantizer(2, 2, ema_decay=0.5).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.ema_embed_sum.copy_(q.embedding.weight)
    z = torch.tensor([[2.0, 2.0], [4.0, 0.0], [9.0, 9.0]]).T.reshape(1, 2, 1, 3)
    out = q(z)
    assert out.codes.tolist() == [[[0, 0, 1]]]
    size = torch.tensor([0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1], dtype=torch.float64)  # (1.5, 1.0)
    sums = torch.tensor([[0.5 * 0 + 0.5 * 6, 0.5 * 0 + 0.5 * 2], [0.5 * 10 + 0.5 * 9] * 2], dtype=torch.float64)
    assert q.ema_cluster_size.tolist() == size.tolist() and q.ema_embed_sum.tolist() == sums.tolist()
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 2 * 1e-5) * n
    expected = (sums / smoothed[:, None]).float()
    assert torch.allclose(q.embedding.weight, expected, rtol=1e-6, atol=0)
    assert torch.allclose(out.z_q, expected[out.codes].permute(0, 3, 1, 2), rtol=1e-6, atol=0)
    assert out.codebook_loss.item() == 0.0


def test_legacy_beta_moves_beta_to_the_codebook_term() -> None:
    """taming's default legacy=True (its published VQ checkpoints) weights the codebook term by beta; ours weights
    the commitment term (the paper's form) unless legacy_beta is set. Hand values: one latent, one code."""
    z = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)  # (B, D, h, w)
    for legacy, want_codebook, want_commit in ((False, 2.5, 0.625), (True, 0.625, 2.5)):
        q = VectorQuantizer(1, 2, beta=0.25, legacy_beta=legacy)
        with torch.no_grad():
            q.embedding.weight.copy_(torch.tensor([[1.0, 2.0]]))
        out = q(z)  # mse((1, 2), (3, 1)) = (4 + 1) / 2 = 2.5
        assert out.codebook_loss.item() == pytest.approx(want_codebook)
        assert out.commitment_loss.item() == pytest.approx(want_commit)
    assert VQGAN(VQGANConfig.from_name("micro", legacy_beta=True)).quantize.legacy_beta
    from cm3leon_lightning.modules.vqgan import VQGANModule

    assert VQGANModule(preset="micro", legacy_beta=True).config.legacy_beta is True
    with pytest.raises(ValueError, match="legacy_beta weights the codebook term, which EMA updates replace"):
        VectorQuantizer(4, 2, legacy_beta=True, ema_decay=0.99)  # the commitment weight would silently become 1
    with pytest.raises(ValueError, match="legacy_beta moves beta to the codebook term"):
        VQGANConfig.from_name("micro", legacy_beta=True, ema_decay=0.99)
    with pytest.raises(ValueError, match="quantizer='gumbel'"):
        VQGANConfig.from_name("micro", legacy_beta=True, quantizer="gumbel")
