"""VQGAN checkpoint I/O: saving never replaces a saved VQGAN unasked, and unreadable files or configs are named."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from cm3leon_lightning.tokenization import vqgan_io
from cm3leon_lightning.tokenization.vqgan import PRESETS, VQGAN, VQGANConfig
from cm3leon_lightning.tokenization.vqgan_io import config_from_taming_yaml, load_vqgan


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _model(seed: int, **overrides: object) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN.from_name("micro", **overrides).eval()


def _taming_yaml(cfg: VQGANConfig, **ddconfig: object) -> str:
    extra = "".join(f"      {k}: {json.dumps(v)}\n" for k, v in ddconfig.items())
    return (
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n"
        f"    embed_dim: {cfg.embed_dim}\n    n_embed: {cfg.n_embed}\n    ddconfig:\n      double_z: false\n"
        f"      z_channels: {cfg.z_channels}\n      resolution: {cfg.resolution}\n"
        "      in_channels: 3\n      out_ch: 3\n"
        f"      ch: {cfg.ch}\n      ch_mult: {list(cfg.ch_mult)}\n      num_res_blocks: {cfg.num_res_blocks}\n"
        f"      attn_resolutions: {list(cfg.attn_resolutions)}\n      dropout: 0.0\n{extra}"
    )


def test_save_refuses_to_replace_a_saved_vqgan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second, x = _model(0), _model(1, n_embed=64), _images(2, 16)
    (tmp_path / "vq").mkdir()  # an existing empty directory is fine
    first.save_pretrained(tmp_path / "vq")
    with pytest.raises(FileExistsError, match=r"already holds a VQGAN \(config.json, model.safetensors\); pass "):
        second.save_pretrained(tmp_path / "vq")
    kept = VQGAN.from_pretrained(tmp_path / "vq")
    assert kept.config.n_embed == 32 and torch.equal(kept.encode(x), first.encode(x))

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(vqgan_io, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(tmp_path / "vq", overwrite=True)  # a failed write leaves the saved VQGAN whole
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(VQGAN.from_pretrained(tmp_path / "vq").encode(x), first.encode(x))
    second.save_pretrained(tmp_path / "vq", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "model.safetensors"]
    replaced = VQGAN.from_pretrained(tmp_path / "vq")
    codes = second.encode(x)
    assert replaced.config.n_embed == 64 and torch.equal(replaced.encode(x), codes)
    assert torch.equal(replaced.decode(codes), second.decode(codes))


def test_latent_channels_need_not_be_a_multiple_of_32(tmp_path: Path) -> None:
    """Taming-layout VQ-f4/f8 models (latent-diffusion's, listed by taming-transformers) have 3 or 4 latent
    channels; no GroupNorm sees them, so only ``ch`` must be a multiple of 32."""
    ref = _model(0, z_channels=4, embed_dim=4)
    assert tuple(ref.state_dict()["encoder.conv_out.weight"].shape) == (4, 32, 3, 3)
    (tmp_path / "vqgan.yaml").write_text(_taming_yaml(ref.config))
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "vqgan.ckpt")
    assert config_from_taming_yaml(tmp_path / "vqgan.yaml") == VQGANConfig.from_name(
        "micro", z_channels=4, embed_dim=4, dead_code_after=0
    )
    x = _images(2, 16)
    assert torch.equal(VQGAN.from_pretrained(tmp_path).encode(x), ref.encode(x))
    with pytest.raises(ValueError, match="ch must be a multiple of 32"):
        VQGANConfig(ch=48)


@pytest.mark.parametrize(
    ("option", "value"),
    [("tanh_out", True), ("attn_type", "linear"), ("resamp_with_conv", False), ("use_linear_attn", True)],
)
def test_yaml_options_this_vqgan_does_not_build_are_refused(tmp_path: Path, option: str, value: object) -> None:
    """These load the same (or no) weights into another network; silently ignored they gave other pixels."""
    cfg = VQGANConfig.from_name("micro")
    path = tmp_path / "model.yaml"
    path.write_text(_taming_yaml(cfg, **{option: value}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: ddconfig.{option} is {value!r}; this VQGAN"):
        config_from_taming_yaml(path)
    path.write_text(_taming_yaml(cfg, attn_type="vanilla-xformers", tanh_out=False))
    assert config_from_taming_yaml(path) == VQGANConfig.from_name("micro", dead_code_after=0)


def test_invalid_yaml_values_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    for bad, message in (
        ({"ch": "abc"}, "invalid literal for int()"),
        ({"ch": 48}, "ch must be a multiple of 32"),
        ({"ch_mult": 2}, "'int' object is not iterable"),
    ):
        text = _taming_yaml(VQGANConfig.from_name("micro"))
        for key, value in bad.items():
            text = re.sub(rf"(\n      {key}: )[^\n]*", rf"\g<1>{value}", text)
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{re.escape(message)}"):
            config_from_taming_yaml(path)


def test_unreadable_weights_files_name_the_file(tmp_path: Path) -> None:
    model = _model(0)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "full.ckpt").read_bytes()[:1000])
    (tmp_path / "text.ckpt").write_text("this is not a checkpoint\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cases = [
        ("cut.ckpt", False, "cannot be read as a torch checkpoint (RuntimeError: PytorchStreamReader failed"),
        ("text.ckpt", False, "not a VQGAN checkpoint (it begins with b'this', not a zip archive or a pickle)"),
        ("text.ckpt", True, "not a VQGAN checkpoint (it begins with b'this', not a zip archive or a pickle)"),
        ("empty.ckpt", False, "not a VQGAN checkpoint (it is empty)"),
        ("bad.safetensors", False, "cannot be read as safetensors (SafetensorError: Error while deserializing"),
    ]
    for name, trust, message in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: {re.escape(message)}"):
            load_vqgan(tmp_path / name, preset="micro", trust_pickle=trust)


def test_a_file_that_is_no_checkpoint_is_named_so_not_called_a_pickle(tmp_path: Path) -> None:
    """An image passed as the VQGAN got "holds pickled Python objects ... trust_pickle"; only a real torch file
    that pickles Python objects should."""
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for trust in (False, True):
        with pytest.raises(ValueError) as info:
            VQGAN.from_pretrained(image, preset="micro", trust_pickle=trust)
        assert str(info.value) == (
            f"{image}: not a VQGAN checkpoint (it begins with b'\\x89PNG', not a zip archive or a pickle); expected a "
            "torch .ckpt / .pt, a .safetensors file, or a directory holding model.safetensors and config.json"
        )
    pickled = tmp_path / "pl1.ckpt"  # a zip checkpoint holding a Python object: the pickle message stays
    torch.save({"state_dict": _model(0).state_dict(), "hparams": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(pickled))} holds pickled Python objects .* trust_pickle"):
        VQGAN.from_pretrained(pickled, preset="micro")
    assert VQGAN.from_pretrained(pickled, preset="micro", trust_pickle=True).config.n_embed == 32


def test_invalid_config_json_names_the_file_and_field(tmp_path: Path) -> None:
    model = _model(0)
    model.save_pretrained(tmp_path / "vq")
    config = tmp_path / "vq" / "config.json"
    good = json.loads(config.read_text())
    where = re.escape(str(config))
    cases: list[tuple[str, str]] = [
        ('{"format": "cm3leon_lightning.vqgan", ', rf"^{where}: not valid JSON \(Expecting property name"),
        ("[1, 2]", rf"^{where}: not a cm3leon_lightning.vqgan config \(format None, version None;"),
        (json.dumps({**good, "config": None}), rf"^{where} field 'config': the VQGAN config must be an object"),
        (json.dumps({k: v for k, v in good.items() if k != "config"}), rf"^{where}: lacks the field 'config'"),
    ]
    for field, value, kind in (
        ("ch", "32", "an int"),
        ("resolution", 16.0, "an int"),
        ("l2_normalize", 1, "true or false"),
        ("ch_mult", 2, "a list of ints"),
        ("ema_decay", "0.9", "a number or null"),
    ):
        doc = {**good, "config": {**good["config"], field: value}}
        cases.append((json.dumps(doc), rf"^{where} field 'config': VQGAN config field '{field}' must be {kind}, got "))
    doc = {**good, "config": {**good["config"], "quantizer": "fsq"}}
    cases.append((json.dumps(doc), rf"^{where} field 'config': quantizer must be 'vq' or 'gumbel', got 'fsq'"))
    for text, pattern in cases:
        config.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            VQGAN.from_pretrained(tmp_path / "vq")
    config.write_text(json.dumps(good))
    x = _images(1, 16)
    assert torch.equal(VQGAN.from_pretrained(tmp_path / "vq").encode(x), model.encode(x))


def test_half_precision_model_reloads_in_float32_with_the_same_weights(tmp_path: Path) -> None:
    """As ``load_vqgan`` documents: float32 back, the bf16 weights widened exactly; cast back, the codes are equal."""
    model = VQGAN.from_name("tiny").eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "vq")
    loaded = VQGAN.from_pretrained(tmp_path / "vq")
    assert {v.dtype for v in loaded.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.equal(v.float(), loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = _images(4, 32)
    assert torch.equal(loaded.to(torch.bfloat16).encode(x), model.encode(x))


def test_every_config_field_has_a_type_check() -> None:
    """A field added to VQGANConfig without a check in ``_FIELD_CHECKS`` would read JSON values unchecked."""
    import dataclasses

    from cm3leon_lightning.tokenization.vqgan_config import _FIELD_CHECKS, VQGANConfig

    assert {f.name for f in dataclasses.fields(VQGANConfig)} == set(_FIELD_CHECKS)


def test_key_or_shape_mismatch_names_where_the_architecture_came_from(tmp_path: Path) -> None:
    """The architecture of a weights file may come from a yaml found beside it (a taming log directory's
    ``configs/model.yaml``), and a mismatch named only the weights: the file that described the wrong network was
    not named, nor that one had been read."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": _model(0).state_dict()}, ckpt)
    (run / "configs" / "model.yaml").write_text(_taming_yaml(VQGANConfig.from_name("micro", n_embed=64)))
    other = tmp_path / "other.yaml"
    other.write_text(_taming_yaml(VQGANConfig.from_name("micro", embed_dim=16)))
    cases = [
        ({}, f"{run / 'configs' / 'model.yaml'}, found with the weights): tensor shapes (file vs config) differ"),
        ({"config_path": other}, f"config_path {other}): tensor shapes"),
        ({"preset": "tiny"}, "preset 'tiny'): state dict does not match"),
        ({"preset": VQGANConfig.from_name("micro", ema_decay=0.9, n_embed=8)}, "the VQGANConfig passed as preset)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(ckpt))} \(architecture from {re.escape(message)}"):
            load_vqgan(run, **kwargs)


def test_yaml_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\xff\xfe\x00model: {}")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a UTF-8 text file"):
        config_from_taming_yaml(path)


def test_other_files_of_the_package_are_named_not_taken_for_a_vqgan(tmp_path: Path) -> None:
    """A CM3Leon checkpoint, model directory or CLIP file passed as the VQGAN got "cannot tell the architecture of
    ...: pass preset=", or (with a preset) a list of missing keys; a model directory "config.json: not a
    cm3leon_lightning.vqgan config". Each now says what the file is, and where the VQGAN is when it bundles one."""
    from support.checkpoint_setup import write_checkpoint_assets

    from cm3leon_lightning.export import export_model
    from cm3leon_lightning.modules.clip import ClipModule

    root = write_checkpoint_assets(tmp_path)
    export_model(root / "model.ckpt", root / "bundled", vqgan=root / "vqgan")
    export_model(root / "model.ckpt", root / "bare")
    clip = ClipModule(model_name="cm3leon-clip-tiny")
    clip.configure_model()
    clip.export_weights(root / "clip.safetensors")
    vqgan = "give the VQGAN the model was trained with (a VQGAN directory, or a VQGANModule checkpoint)"
    cases = {
        root / "model.ckpt": f"a CM3Leon model checkpoint, not a VQGAN: it is what --ckpt takes (cm3leon generate, "
        f"serve, export); {vqgan}",
        root / "bundled": f"a CM3Leon model directory, not a VQGAN: its VQGAN is {root / 'bundled' / 'vqgan'}",
        root / "bundled" / "model.safetensors": f"the weights of the CM3Leon model directory {root / 'bundled'}, not "
        f"a VQGAN: its VQGAN is {root / 'bundled' / 'vqgan'}",
        root / "bare": f"a CM3Leon model directory, not a VQGAN: it is what --ckpt takes (it bundles no VQGAN); "
        f"{vqgan}",
        root / "clip.safetensors": "a CLIP model (cm3leon-clip-tiny), not a VQGAN: it is the retriever's weights "
        "(--clip-pretrained, ClipEncoder(model_name, pretrained=PATH))",
        root / "tok": f"a text tokenizer, not a VQGAN: {vqgan}",
    }
    for path, message in cases.items():
        for preset in (None, "micro"):  # with a preset it failed on the keys instead
            with pytest.raises(ValueError) as e:
                VQGAN.from_pretrained(path, preset=preset)
            assert str(e.value) == f"{path} is {message}"
    assert VQGAN.from_pretrained(root / "bundled" / "vqgan").n_embed == 32  # the VQGAN it names loads
    with pytest.raises(FileNotFoundError, match=r"^VQGAN checkpoint not found: "):  # what it does not know: as before
        VQGAN.from_pretrained(root / "nope")


def test_invalid_shapes_and_weights_are_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    """Accepted before: ``resolution`` 0 or -16 (a grid of (0, 0) or (-8, -8) codes), ``ch`` or ``z_channels`` 0 (a
    network of empty convolutions), ``ch_mult`` 1.5 built as 1 and ``attn_resolutions`` 8.7 as 8, negative loss
    weights; ``dropout``, ``ema_decay`` and ``dead_code_after`` out of range failed only when the network was built,
    without the file's name."""
    cases = [
        ({"resolution": 0}, "resolution must be >= 1, got 0"),
        ({"resolution": -16}, "resolution must be >= 1, got -16"),
        ({"ch": 0}, "ch must be a multiple of 32 (GroupNorm with 32 groups) and >= 32, got 0"),
        ({"z_channels": 0}, "z_channels must be >= 1, got 0"),
        ({"ch_mult": (1, 1.5)}, "ch_mult must be a list of ints, got (1, 1.5)"),
        ({"attn_resolutions": (8.7,)}, "attn_resolutions must be a list of ints, got (8.7,)"),
        ({"ch_mult": (True, 2)}, "ch_mult must be a list of ints, got (True, 2)"),
        ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
        ({"beta": -0.25}, "beta must be a finite number >= 0, got -0.25"),
        ({"gumbel_kl_weight": float("inf")}, "gumbel_kl_weight must be a finite number >= 0, got inf"),
        ({"ema_decay": 1.5}, "ema_decay must be in (0, 1) or None, got 1.5"),
        ({"dead_code_after": -1}, "dead_code_after must be >= 0, got -1"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError) as e:
            VQGANConfig.from_name("micro", **override)
        assert str(e.value) == message
    path = tmp_path / "model.yaml"
    path.write_text(_taming_yaml(VQGANConfig.from_name("micro")).replace("resolution: 16", "resolution: 0"))
    with pytest.raises(ValueError) as e:
        config_from_taming_yaml(path)
    assert str(e.value) == f"{path}: model.params / ddconfig do not describe a VQGAN: resolution must be >= 1, got 0"
    doc = {"format": vqgan_io.FORMAT_NAME, "format_version": vqgan_io.FORMAT_VERSION}
    (tmp_path / "config.json").write_text(json.dumps({**doc, "config": {"ema_decay": 1.5}}))
    with pytest.raises(ValueError) as e:
        vqgan_io.read_config(tmp_path / "config.json")
    assert str(e.value) == f"{tmp_path / 'config.json'} field 'config': ema_decay must be in (0, 1) or None, got 1.5"
    assert VQGANConfig.from_name("micro", ch_mult=[1, 2], attn_resolutions=[8]).ch_mult == (1, 2)  # lists as before


# Published taming-format configs (resolution, ch_mult, attn_resolutions): taming's vqgan_imagenet_f16_1024 /
# f16_16384 and vqgan_gumbel_f8, latent-diffusion's vq-f4 / vq-f8 / vq-f16, Chameleon's vqgan.yaml.
PUBLISHED = [
    (256, (1, 1, 2, 2, 4), (16,)),
    (256, (1, 1, 2, 4), (32,)),
    (256, (1, 2, 4), ()),
    (256, (1, 2, 2, 4), (32,)),
    (512, (1, 1, 2, 2, 4), ()),
]


def test_attn_resolutions_matching_no_level_are_refused_naming_the_levels() -> None:
    """``attn_resolutions`` that are the side of no level built no attention block, without a word: the ``tiny``
    preset moved to 64 px (levels 64, 32, 16) kept its attention at 8 and so had none outside the middle."""
    cases = [
        ({"resolution": 64}, "[8]", 64, "[1, 2, 2]", "[64, 32, 16]", 16),
        ({"attn_resolutions": (16, 4, 3)}, "[4, 3]", 32, "[1, 2, 2]", "[32, 16, 8]", 8),
        ({"ch_mult": (1, 2)}, "[8]", 32, "[1, 2]", "[32, 16]", 16),
    ]
    for override, unused, resolution, ch_mult, levels, middle in cases:
        with pytest.raises(ValueError) as e:
            VQGANConfig.from_name("tiny", **override)
        assert str(e.value) == (
            f"attn_resolutions {unused} match no level of this VQGAN: with resolution {resolution} and ch_mult "
            f"{ch_mult} the levels have side lengths {levels} (the middle blocks, at {middle}, always have attention); "
            "give values from that list, or [] for attention in the middle blocks only"
        )
    assert VQGANConfig.from_name("tiny", resolution=64, attn_resolutions=[16]).level_resolutions == (64, 32, 16)
    for config in PRESETS.values():
        assert set(config.attn_resolutions) <= set(config.level_resolutions)
    for resolution, ch_mult, attn in PUBLISHED:
        assert VQGANConfig(resolution=resolution, ch_mult=ch_mult, attn_resolutions=attn).attn_resolutions == attn


def test_loaded_configs_with_unused_attn_resolutions_warn_and_load(tmp_path: Path) -> None:
    """Configs written elsewhere or earlier (a taming yaml trained at another size, a saved config.json, a
    VQGANModule checkpoint's hyper-parameters) may list sides no level has: they load, with a warning naming the
    file, and the values that built nothing are dropped, so the model encodes as the one that wrote the weights."""
    model = _model(0)  # micro: levels 16 and 8
    x = _images(2, 16)
    message = (
        "attn_resolutions [32, 4] match no level of this VQGAN: with resolution 16 and ch_mult [1, 1] the levels have "
        "side lengths [16, 8] (the middle blocks, at 8, always have attention); they build no attention block and "
        "are dropped"
    )
    ckpt = tmp_path / "taming" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": model.state_dict()}, ckpt)
    yaml_path = ckpt.with_suffix(".yaml")
    yaml_path.write_text(_taming_yaml(model.config).replace("attn_resolutions: []", "attn_resolutions: [32, 4]"))
    model.save_pretrained(tmp_path / "ours")
    config_json = tmp_path / "ours" / "config.json"
    doc = json.loads(config_json.read_text())
    doc["config"]["attn_resolutions"] = [32, 4]
    config_json.write_text(json.dumps(doc))
    module_ckpt = tmp_path / "module.ckpt"
    state = {f"vqgan.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"preset": "micro", "attn_resolutions": [32, 4]}}, module_ckpt)
    for path, source in ((ckpt, yaml_path), (tmp_path / "ours", config_json), (module_ckpt, module_ckpt)):
        with pytest.warns(UserWarning) as record:
            loaded = load_vqgan(path)
        assert [str(w.message) for w in record] == [f"{source}: {message}"]
        assert loaded.config.attn_resolutions == ()
        assert torch.equal(loaded.encode(x), model.encode(x))


def test_scalar_fields_must_be_numbers_and_become_plain_ones(tmp_path: Path) -> None:
    """``resolution=16.0`` built a VQGAN that encoded and then failed in ``decode`` with torch's "view(): argument
    'size' ... must be tuple of ints"; ``ch=32.0`` failed inside torch; a numpy int (``n_embed=np.int64(16)``, e.g.
    read from an array) trained and then failed in ``save_pretrained`` with "Object of type int64 is not JSON
    serializable"; ``beta="0.25"`` with a TypeError naming no field."""
    import numpy as np

    for override, message in (
        ({"resolution": 16.0}, "resolution must be an int, got 16.0"),
        ({"ch": 32.0}, "ch must be an int, got 32.0"),
        ({"dead_code_after": True}, "dead_code_after must be an int, got True"),
        ({"n_embed": "32"}, "n_embed must be an int, got '32'"),
        ({"beta": "0.25"}, "beta must be a number, got '0.25'"),
        ({"ema_decay": False}, "ema_decay must be a number, got False"),
    ):
        with pytest.raises(ValueError) as e:
            VQGANConfig.from_name("micro", **override)
        assert str(e.value) == message
    config = VQGANConfig.from_name("micro", n_embed=np.int64(16), beta=np.float32(0.5), ema_decay=np.float64(0.9))
    assert [type(v) for v in (config.n_embed, config.beta, config.ema_decay)] == [int, float, float]
    VQGAN(config).save_pretrained(tmp_path / "vq")
    assert VQGAN.from_pretrained(tmp_path / "vq").config == config


def test_saved_vqgan_files_are_readable_by_group_and_others(tmp_path: Path) -> None:
    """Under umask 022 both files of a saved VQGAN are 0o644 (the weights were 0o600, safetensors' private mode)."""
    import os

    previous = os.umask(0o022)
    try:
        _model(0).save_pretrained(tmp_path / "vq")
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "vq").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644,
    }  # fmt: skip
