"""CM3LeonModule(init_from=...): fine-tuning starts from pretrained weights (tiny model, CPU, seconds)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_model
from support.token_data import TokenDataModule, cpu_trainer, write_fit_config

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import weights as weights_mod
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

DATA_VOCAB = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=3)  # TokenDataModule's
OTHER_VOCAB = MultimodalVocab(n_text=64, n_codes=40, grid_h=2, grid_w=3)  # same padded size (128), other codes


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return cpu_trainer(root, **{"enable_checkpointing": False, "limit_val_batches": 0, **kwargs})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint written by Trainer.save_checkpoint after 2 steps (so the zero-initialized output layers are not
    zero any more), and its network weights."""
    root = tmp_path_factory.mktemp("pretrained")
    L.seed_everything(0)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=1)
    trainer = _trainer(root, max_steps=2)
    trainer.fit(module, datamodule=TokenDataModule(n_train=8, batch_size=4))
    path = root / "pretrained.ckpt"
    trainer.save_checkpoint(path)
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert all(w.abs().sum() > 0 for w in weights.values())
    return path, weights


def assert_weights_equal(module: CM3LeonModule, want: dict[str, torch.Tensor]) -> None:
    got = module.model.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value.to(got[name].dtype)), name
    assert module.model.lm_head.weight is module.model.wte.weight  # still tied
    assert len(list(module.model.parameters())) == 10


def test_lightning_checkpoint_weights_are_loaded(pretrained) -> None:
    path, want = pretrained
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    assert module.hparams.init_from == str(path)
    module.configure_model()
    assert_weights_equal(module, want)
    assert weights_mod.read_weights(path).kind == "lightning checkpoint"
    fresh = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict())
    fresh.configure_model()
    assert not torch.equal(fresh.model.blocks[0].attn.out_proj.weight, want["blocks.0.attn.out_proj.weight"])


def test_module_without_vocab_adopts_the_checkpoints(pretrained) -> None:
    config = CM3LeonConfig.from_preset("tiny", vocab_size=128)
    module = CM3LeonModule(config=config, init_from=str(pretrained[0]))
    assert module.hparams.vocab is None
    module.configure_model()
    assert module.hparams.vocab == DATA_VOCAB.to_dict()


@pytest.mark.parametrize("kind", ["safetensors", "safetensors_named_pt", "torch", "torch_legacy", "module_state"])
def test_bare_state_dict_files(pretrained, tmp_path: Path, kind: str) -> None:
    """Safetensors (one of the tied pair, as save_model writes) and torch.save'd state dicts, told by content."""
    _, want = pretrained
    source = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict())
    source.configure_model()
    source.model.load_state_dict(want)
    path = tmp_path / {"safetensors": "w.safetensors", "safetensors_named_pt": "w.pt"}.get(kind, "w.bin")
    if kind.startswith("safetensors"):
        save_model(source.model, str(path))
    elif kind == "module_state":
        torch.save(source.state_dict(), path)  # "model."-prefixed keys
    else:
        torch.save(source.model.state_dict(), path, _use_new_zipfile_serialization=kind == "torch")
    assert weights_mod.read_weights(path).kind == ("safetensors" if kind.startswith("safetensors") else "state dict")
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    module.configure_model()
    assert_weights_equal(module, want)


def test_meta_device_build_takes_the_loaded_tensors(pretrained) -> None:
    """Built under an empty-init (meta) context, the loaded tensors become the parameters, in the dtype the module
    was built in, and the embedding stays tied."""
    path, want = pretrained
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as a "bf16-true" precision plugin's init context does
    try:
        with torch.device("meta"):
            module.configure_model()
    finally:
        torch.set_default_dtype(previous)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in module.parameters())
    assert_weights_equal(module, want)
    ids = TokenDataModule(n_train=2).train_rows
    reference = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    reference.configure_model()
    reference.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(module(ids), reference(ids))


def test_configure_model_loads_once(pretrained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "copy.ckpt"
    shutil.copy(pretrained[0], path)
    calls = []
    read = weights_mod.read_weights
    monkeypatch.setattr(
        "cm3leon_lightning.modules.network.read_weights", lambda *a, **kw: calls.append(a) or read(*a, **kw)
    )
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    module.configure_model()
    with torch.no_grad():
        module.model.wpe.weight.zero_()
    path.unlink()
    module.configure_model()
    assert len(calls) == 1
    assert module.model.wpe.weight.abs().sum() == 0


def test_missing_file_names_the_argument_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    module = CM3LeonModule(preset="tiny", init_from=str(missing))
    with pytest.raises(FileNotFoundError, match=rf"init_from: '{missing}' does not exist"):
        module.configure_model()
    assert module.model is None


def test_architecture_mismatch_lists_each_field(pretrained) -> None:
    path = pretrained[0]
    config = CM3LeonConfig.from_preset("tiny", n_layer=3, d_ff=128)
    module = CM3LeonModule(config=config, vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value) == (
        f"architecture mismatch between init_from checkpoint '{path}' and module (checkpoint, module): "
        "{'n_layer': (2, 3), 'd_ff': (256, 128)}"
    )
    assert module.model is None  # not left half-initialized: a second call fails the same way
    with pytest.raises(ValueError, match="architecture mismatch"):
        module.configure_model()


def test_init_only_fields_are_not_an_architecture_mismatch(pretrained, tmp_path: Path) -> None:
    """An exported model directory trained with another ``init_std`` / ``pos_init_std`` (or a checkpoint of a version
    that did not record them) loads: its weights replace the initialisation those fields set. A real difference
    (``layer_norm_eps`` changes every LayerNorm) is still refused, naming only that field."""
    from cm3leon_lightning.model.pretrained import save_pretrained

    _, want = pretrained
    config = CM3LeonConfig.from_preset("tiny", vocab_size=128)
    for name, saved in (
        ("other_init", {**config.to_dict(), "init_std": 0.02, "pos_init_std": 0.01}),
        ("no_init", {k: v for k, v in config.to_dict().items() if k not in ("init_std", "pos_init_std")}),
        ("other_eps", {**config.to_dict(), "init_std": 0.02, "layer_norm_eps": 1e-6}),
    ):
        save_pretrained(want, tmp_path / name, saved, DATA_VOCAB.to_dict())
        module = CM3LeonModule(config=config, vocab=DATA_VOCAB.to_dict(), init_from=str(tmp_path / name))
        if name == "other_eps":
            with pytest.raises(ValueError) as err:
                module.configure_model()
            assert str(err.value) == (
                f"architecture mismatch between init_from checkpoint '{tmp_path / name}' and module "
                "(checkpoint, module): {'layer_norm_eps': (1e-06, 1e-05)}"
            )
            continue
        module.configure_model()
        assert_weights_equal(module, want)
        assert module.config.init_std == 0.006  # the module's own settings stay


def test_vocabulary_mismatch_prints_both(pretrained) -> None:
    path = pretrained[0]
    module = CM3LeonModule(preset="tiny", vocab=OTHER_VOCAB.to_dict(), init_from=str(path))
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value) == (
        f"vocabulary mismatch: init_from checkpoint '{path}' was trained with {DATA_VOCAB.to_dict()}, "
        f"the data has {OTHER_VOCAB.to_dict()}"
    )


def test_vocabulary_mismatch_with_the_data_module_fails_before_training(pretrained, tmp_path: Path) -> None:
    """The module learns the data's vocabulary in setup(), which Lightning runs before configure_model: the
    init_from checkpoint is checked against it there. Built earlier, it adopts the checkpoint's, and setup refuses."""
    path = tmp_path / "other_vocab.ckpt"
    ckpt = torch.load(pretrained[0], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["vocab"] = OTHER_VOCAB.to_dict()
    torch.save(ckpt, path)
    data = TokenDataModule(n_train=4, batch_size=4)

    module = CM3LeonModule(preset="tiny", init_from=str(path))
    with pytest.raises(ValueError, match="vocabulary mismatch: init_from checkpoint") as err:
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    assert f"'{path}'" in str(err.value) and "'n_codes': 40" in str(err.value) and "'n_codes': 32" in str(err.value)
    assert module.model is None

    early = CM3LeonModule(preset="tiny", config=CM3LeonConfig.from_preset("tiny", vocab_size=128), init_from=str(path))
    early.configure_model()
    with pytest.raises(ValueError, match=r"vocabulary mismatch: the model was built for .*'n_codes': 40"):
        _trainer(tmp_path, max_steps=1).fit(early, datamodule=data)


def test_state_dict_that_does_not_fit_names_the_keys(pretrained, tmp_path: Path) -> None:
    _, want = pretrained
    state = {k: v.clone() for k, v in want.items()}
    state.pop("blocks.1.mlp.fc_in.weight")
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:10]
    state["blocks.9.extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value) == (
        f"init_from '{path}': the weights do not fit the model: missing keys ['blocks.1.mlp.fc_in.weight']; "
        "unexpected keys ['blocks.9.extra.weight']; wrong shapes (file, model) "
        "{'blocks.0.attn.qkv.weight': ((10, 64), (192, 64))}"
    )
    many = {f"x{i}": torch.zeros(1) for i in range(7)}
    torch.save(many, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['x0', 'x1', 'x2', 'x3', 'x4'\] \(\+2 more\)"):
        module.configure_model()


def test_tied_pair_that_differs_is_refused(pretrained, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in pretrained[1].items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "untied.pt")
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(tmp_path / "untied.pt"))
    with pytest.raises(ValueError, match="'wte.weight' and 'lm_head.weight' differ, but the model ties them"):
        module.configure_model()


def test_files_that_hold_no_weights(tmp_path: Path) -> None:
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "dict.pt")
    (tmp_path / "sharded.ckpt").mkdir()
    cases = {
        "text.ckpt": "cannot be read as a Lightning checkpoint, a .safetensors file or a torch.save'd state dict",
        "list.pt": "holds list, not a Lightning checkpoint",
        "dict.pt": r"holds a dict with keys \['epoch'\], not a Lightning checkpoint",
        "sharded.ckpt": "is a directory but neither a model directory .* nor a sharded Lightning checkpoint",
    }
    for name, message in cases.items():
        module = CM3LeonModule(preset="tiny", init_from=str(tmp_path / name))
        with pytest.raises(ValueError, match=f"init_from: '{tmp_path / name}' {message}"):
            module.configure_model()


def test_fit_starts_from_the_weights_with_a_fresh_optimizer(pretrained, tmp_path: Path) -> None:
    """The weights before the first optimizer step are the source's, and so is the first step's loss."""
    path, want = pretrained
    seen: dict[str, object] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step == 0:
                seen["weights"] = {k: v.clone() for k, v in module.model.state_dict().items()}
                seen["batch"] = batch

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            seen.setdefault("loss", outputs["loss"].detach().clone())

    L.seed_everything(0)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2, init_from=str(path))  # vocab from the data
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[Probe()])
    trainer.fit(module, datamodule=TokenDataModule(n_train=8, batch_size=4))
    assert trainer.global_step == 2
    assert seen["weights"].keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(seen["weights"][name], value), name
    source = CM3LeonModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    inputs, targets = source.build_sequence(seen["batch"])
    with torch.no_grad():
        assert torch.equal(source.compute_loss(source(inputs), targets, seen["batch"])["loss"], seen["loss"])
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # a new schedule, from step 0


def test_resume_with_ckpt_path_overrides_init_from(pretrained, tmp_path: Path) -> None:
    init = tmp_path / "init.ckpt"
    shutil.copy(pretrained[0], init)
    L.seed_everything(0)
    first = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2, init_from=str(init))
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(first, datamodule=TokenDataModule(n_train=8, batch_size=4))
    trainer.save_checkpoint(tmp_path / "sft3.ckpt")
    sft3 = {k: v.clone() for k, v in first.model.state_dict().items()}
    assert not torch.equal(sft3["wpe.weight"], pretrained[1]["wpe.weight"])
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.clone() for k, v in module.model.state_dict().items()}

    resumed = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2, init_from=str(init))
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[Probe()])
    trainer.fit(resumed, datamodule=TokenDataModule(n_train=8, batch_size=4), ckpt_path=tmp_path / "sft3.ckpt")
    assert seen["step"] == 3 and trainer.global_step == 5
    for name, value in sft3.items():
        assert torch.equal(seen["weights"][name], value), name

    # Loading the fine-tuned checkpoint does not read init_from again (the file may be gone).
    init.unlink()
    loaded = CM3LeonModule.load_from_checkpoint(tmp_path / "sft3.ckpt", map_location="cpu", weights_only=True)
    assert loaded.hparams.init_from is None
    for name, value in sft3.items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_cli_fit_with_init_from_then_resume_without_the_file(
    pretrained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cm3leon fit --model.init_args.init_from PATH`` (lr 0: the weights stay the source's), then a
    ``--ckpt_path`` resume, whose checkpoint names an init_from that no longer exists."""
    from cm3leon_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["cm3leon"])  # pytest's own arguments would make LightningCLI warn
    root = Path(__file__).resolve().parents[2]
    init = tmp_path / "init.ckpt"
    shutil.copy(pretrained[0], init)
    cfg = write_fit_config(tmp_path, max_steps=1, n_train=4)
    base = ["fit", "--config", str(root / "configs" / "model" / "tiny.yaml"), "--config", str(cfg)]
    main([*base, "--model.init_args.init_from", str(init), "--model.init_args.lr", "0"])
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["init_from"] == str(init)
    for name, value in pretrained[1].items():
        assert torch.equal(ckpt["state_dict"][f"model.{name}"], value), name

    init.unlink()
    main([*base, "--trainer.max_steps", "2", "--ckpt_path", str(last)])
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2


def test_weights_from_a_file_skip_the_random_initialisation(pretrained, monkeypatch: pytest.MonkeyPatch) -> None:
    """With init_from (and in load_checkpoint) the network is built on the meta device, so the paper's initialisation
    (13 s at 350m on a CPU, minutes at 7B) never runs on real tensors; the weights are still the file's."""
    from cm3leon_lightning.generation.cli import load_checkpoint

    devices: list[str] = []
    original = torch.nn.init.trunc_normal_

    def recording(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", recording)
    path, want = pretrained
    module = CM3LeonModule(preset="tiny", vocab=DATA_VOCAB.to_dict(), init_from=str(path))
    module.configure_model()
    assert_weights_equal(module, want)
    model, _ = load_checkpoint(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert devices and set(devices) == {"meta"}
    CM3LeonModule(preset="tiny").configure_model()  # without a file: initialised for real
    assert devices[-1] == "cpu"


def test_from_pretrained_builds_the_module_of_a_checkpoint_or_model_directory(pretrained, tmp_path: Path) -> None:
    """Architecture and vocabulary from the file, its weights loaded once; the module validates and fine-tunes
    (fresh optimizer, step 0) and its own checkpoints do not name the source."""
    from cm3leon_lightning.export import export_model

    path, want = pretrained
    export_model(path, tmp_path / "model", dtype=torch.bfloat16)
    half = {k: v.to(torch.bfloat16).float() for k, v in want.items()}
    for source, weights in ((path, want), (tmp_path / "model", half)):
        module = CM3LeonModule.from_pretrained(str(source), lr=1e-4, warmup_steps=1)
        assert module.hparams.vocab == DATA_VOCAB.to_dict() and module.hparams.init_from is None
        assert (
            module.hparams.lr == 1e-4
            and module.config.to_dict() == CM3LeonConfig.from_preset("tiny", vocab_size=128).to_dict()
        )
        assert_weights_equal(module, weights)
        trainer = _trainer(tmp_path / "fit", max_steps=1)
        trainer.fit(module, datamodule=TokenDataModule(n_train=4, batch_size=4))
        assert trainer.global_step == 1
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    assert torch.load(tmp_path / "tuned.ckpt", weights_only=True)["hyper_parameters"]["init_from"] is None
    save_model(CM3LeonModule.from_pretrained(str(path)).model, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match=r"bare.safetensors \(safetensors\) records no architecture and vocabulary"):
        CM3LeonModule.from_pretrained(str(tmp_path / "bare.safetensors"))
