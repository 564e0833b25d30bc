"""Reading weights from every kind of file training and export write (``model/weights.py``), sharded FSDP
checkpoints above all; the init_from tests (tests/modules/test_cm3leon_init_from.py) cover the single-file kinds."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from support.checkpoint_setup import save_sharded
from support.token_data import TokenDataModule, cpu_trainer
from torch.distributed.checkpoint import FileSystemReader

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model import weights as weights_mod
from cm3leon_lightning.model.pretrained import save_pretrained
from cm3leon_lightning.model.weights import TIED, fit_state, load_weights, read_sharded, read_weights
from cm3leon_lightning.modules.cm3leon import CM3LeonModule


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CM3LeonModule]:
    """A tiny module after 2 steps, saved as a sharded directory (FSDPStrategy's format) and as one file."""
    root = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=1)
    trainer = cpu_trainer(root, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=TokenDataModule(n_train=8, batch_size=4))
    trainer.save_checkpoint(root / "one.ckpt")
    return save_sharded(trainer, root / "sharded.ckpt"), root / "one.ckpt", module


def test_sharded_checkpoint_gives_the_network_weights_architecture_and_step(trained) -> None:
    sharded, _, module = trained
    stored = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer_0.") for k in stored)  # the moments are there, and must not be read
    weights = read_weights(sharded, "--ckpt")
    assert weights.kind == "sharded checkpoint"
    want = module.model.state_dict()
    assert weights.state_dict.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(weights.state_dict[name], value), name
    assert weights.config == module.config.to_dict() and weights.vocab == module.hparams.vocab
    assert weights.source == {"global_step": 2, "epoch": 1}


def test_single_file_and_sharded_checkpoints_read_the_same(trained) -> None:
    sharded, single, _ = trained
    a, b = read_weights(sharded), read_weights(single)
    assert b.kind == "lightning checkpoint" and a.source == b.source
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert (a.config, a.vocab) == (b.config, b.vocab)


def test_lazy_reading_gives_meta_tensors_and_reads_named_ones(trained, tmp_path: Path) -> None:
    sharded, single, module = trained
    want = module.model.state_dict()
    save_pretrained(want, tmp_path / "m", module.config.to_dict(), module.hparams.vocab)
    sources = {
        sharded: "sharded checkpoint",
        tmp_path / "m": "model directory",
        tmp_path / "m" / "model.safetensors": "safetensors",
    }
    for path, kind in sources.items():
        lazy = read_weights(path, "--ckpt", lazy=True)
        assert lazy.kind == kind and lazy.fetch is not None
        assert all(v.is_meta for v in lazy.state_dict.values())
        assert {k: (v.shape, v.dtype) for k, v in lazy.state_dict.items()} == {
            k: (want[k].shape, want[k].dtype) for k in lazy.state_dict
        }
        names = list(lazy.state_dict)[1:3]
        got = lazy.fetch(names)
        assert list(got) == names and all(torch.equal(got[k], want[k]) for k in names)
    assert read_weights(single, lazy=True).fetch is None  # memory-mapped already


@pytest.mark.parametrize("on_meta", [True, False])
def test_load_weights_reads_a_lazy_source_a_chunk_at_a_time(trained, monkeypatch, on_meta: bool) -> None:
    sharded, _, module = trained
    lazy = read_weights(sharded, lazy=True)
    sizes = {k: v.numel() * v.element_size() for k, v in lazy.state_dict.items()}
    monkeypatch.setattr(weights_mod, "CHUNK_BYTES", max(sizes.values()))
    calls: list[list[str]] = []

    def fetch(names):
        calls.append(list(names))
        return lazy.fetch(names)

    torch.manual_seed(1)
    with torch.device("meta" if on_meta else "cpu"):
        model = CM3Leon(module.config)
    load_weights(model, lazy.state_dict, "x", fetch)
    assert len(calls) > 2 and all(sum(sizes[k] for k in c) <= max(sizes.values()) for c in calls)
    read = [k for c in calls for k in c]
    # each tensor once; the head (the shards hold the tied pair twice) alone, to be compared with the embedding
    assert sorted(read) == sorted(set(read)) and [TIED[1]] in calls
    assert model.lm_head.weight is model.wte.weight
    want = module.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_file_holding_the_tie_under_the_heads_name_loads_lazily(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    state = {k: v.clone() for k, v in model.state_dict().items() if k != TIED[0]}
    save_file(state, tmp_path / "head.safetensors")
    lazy = read_weights(tmp_path / "head.safetensors", lazy=True)
    with torch.device("meta"):
        fresh = CM3Leon(model.config)
    load_weights(fresh, lazy.state_dict, "x", lazy.fetch)
    assert torch.equal(fresh.wte.weight, model.wte.weight) and fresh.lm_head.weight is fresh.wte.weight


def test_init_from_a_sharded_checkpoint(trained) -> None:
    sharded, _, module = trained
    fine = CM3LeonModule(preset="tiny", vocab=module.hparams.vocab, init_from=str(sharded))
    fine.configure_model()
    ids = TokenDataModule(n_train=2).train_rows
    with torch.no_grad():
        assert torch.equal(fine(ids), module(ids))
    assert fine.model.lm_head.weight is fine.model.wte.weight


def test_broken_sharded_checkpoints_name_the_part(trained, tmp_path: Path) -> None:
    import shutil

    sharded, _, _ = trained
    cases = {}
    for name in ("meta", "index", "shard", "nomodel"):
        copy = tmp_path / name
        shutil.copytree(sharded, copy)
        cases[name] = copy
    (cases["meta"] / "meta.pt").write_text("garbage")
    (cases["index"] / ".metadata").unlink()
    next(cases["shard"].glob("*.distcp")).unlink()
    shutil.rmtree(cases["nomodel"])
    cases["nomodel"].mkdir()
    torch.save({}, cases["nomodel"] / "meta.pt")
    from torch.distributed.checkpoint import save

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        save({"optimizer_0": {"m": torch.zeros(2)}}, checkpoint_id=cases["nomodel"], no_dist=True)
    messages = {
        "meta": r"meta.pt is not a readable torch file",
        "index": r"has meta.pt but its shard index \(.metadata\) is unreadable",
        "shard": r"reading the shards of .* failed",
        "nomodel": r"the shards in .* hold no 'model.\*' tensors",
    }
    for name, message in messages.items():
        with pytest.raises(ValueError, match=f"^--ckpt: .*{message}"):
            read_sharded(cases[name], "--ckpt")


@pytest.mark.parametrize("lazy", [False, True])
def test_a_truncated_shard_is_refused_naming_the_file(trained, tmp_path: Path, lazy: bool) -> None:
    """A shard cut short (an interrupted copy) was refused with torch's 'failed finding central directory. This is an
    internal miniz error', naming neither the shard nor the tensor; an intact model part of a shard whose end (the
    optimizer's moments) is cut still reads exactly."""
    import shutil

    sharded, _, module = trained
    shard = next(sharded.glob("*.distcp"))
    data = shard.read_bytes()
    storage = FileSystemReader(str(sharded)).read_metadata().storage_data
    ends = {i.fqn: s.offset + s.length for i, s in storage.items()}
    model_end = max(end for fqn, end in ends.items() if fqn.startswith("model."))
    assert model_end < len(data)  # the moments come after the network's tensors
    cut, tail = tmp_path / "cut", tmp_path / "tail"
    for copy, size in ((cut, model_end - 1), (tail, model_end)):
        shutil.copytree(sharded, copy)
        (copy / shard.name).write_bytes(data[:size])
    fqn = next(fqn for fqn, end in ends.items() if end == model_end)
    message = (
        f"--ckpt: the shard {str(cut / shard.name)!r} is truncated: {model_end - 1} bytes, but the shard index "
        f"(.metadata) places {fqn!r} up to byte {model_end}"
    )
    with pytest.raises(ValueError) as err:
        read_weights(cut, "--ckpt", lazy=lazy)
    assert str(err.value) == message
    weights = read_weights(tail, "--ckpt", lazy=lazy)
    state = weights.fetch(list(weights.state_dict)) if lazy else weights.state_dict
    assert all(torch.equal(state[k], v) for k, v in module.model.state_dict().items())


def test_an_empty_or_cut_file_is_refused_saying_so(tmp_path: Path) -> None:
    """A zero-byte checkpoint (a full disk) or a legacy torch file cut short was refused with a bare 'EOFError'."""
    empty, cut = tmp_path / "empty.ckpt", tmp_path / "cut.pt"
    empty.write_bytes(b"")
    torch.save({"w": torch.ones(64)}, cut, _use_new_zipfile_serialization=False)
    cut.write_bytes(cut.read_bytes()[:40])
    for path in (empty, cut):
        with pytest.raises(ValueError) as err:
            read_weights(path, "--ckpt")
        assert str(err.value) == (
            f"--ckpt: {str(path)!r} cannot be read as a Lightning checkpoint, a .safetensors file or a torch.save'd "
            "state dict: the file ends early (empty or cut short)"
        )


def test_a_directory_of_another_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a directory but neither a model directory .* nor a sharded Lightning"):
        read_weights(tmp_path, "--ckpt")


def test_model_directory_reads_back_with_its_source(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CM3LeonConfig.from_preset("tiny")
    model = CM3Leon(config)
    vocab = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}
    save_pretrained(model.state_dict(), tmp_path / "m", config.to_dict(), vocab, source={"global_step": 7})
    weights = read_weights(tmp_path / "m")
    assert weights.kind == "model directory" and weights.source == {"global_step": 7}
    assert TIED[1] not in weights.state_dict  # one of the tied pair is stored
    assert (weights.config, weights.vocab) == (config.to_dict(), vocab)
    full = fit_state(model, weights.state_dict, "x")
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["cm3leon", "hf", "ckpt"])
def test_an_unusable_recorded_architecture_is_refused_naming_the_argument_and_file(tmp_path: Path, layout) -> None:
    """A hand-edited or newer ``config`` failed later in ``CM3LeonConfig.from_dict`` (``from_pretrained``,
    ``cm3leon generate --ckpt``) with a message naming neither the argument nor the file."""
    import json

    config = CM3LeonConfig.from_preset("tiny")
    model = CM3Leon(config)
    vocab = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}
    bad = {**config.to_dict(), "n_head": 7}
    if layout == "ckpt":
        path = tmp_path / "m.ckpt"
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "hyper_parameters": {"config": bad, "vocab": vocab}}, path)
    else:
        path = tmp_path / "m"
        save_pretrained(model.state_dict(), path, config.to_dict(), vocab, layout=layout)
        doc = json.loads((path / "config.json").read_text())
        (doc["cm3leon"] if layout == "hf" else doc)["config"] = bad
        (path / "config.json").write_text(json.dumps(doc))
    for lazy in (False, True):
        with pytest.raises(ValueError) as err:
            read_weights(path, "--ckpt", lazy=lazy)
        assert str(err.value) == (
            f"--ckpt: {path} has an unusable architecture ('config'): CM3LeonConfig.d_model (64) must be divisible "
            "by CM3LeonConfig.n_head (7)"
        )


def test_fit_state_checks_shapes_on_a_meta_skeleton() -> None:
    config = CM3LeonConfig.from_preset("tiny")
    with torch.device("meta"):
        skeleton = CM3Leon(config)
    state = {k: torch.zeros(v.shape) for k, v in skeleton.state_dict().items()}
    assert fit_state(skeleton, state, "x").keys() == state.keys()
    state["wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"x: the weights do not fit the model: wrong shapes .*'wpe.weight': \(\(3, "):
        fit_state(skeleton, state, "x")


@pytest.mark.parametrize("on_meta", [True, False])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_tied_model_refuses_a_file_whose_head_differs_read_lazily_too(tmp_path: Path, lazy: bool, on_meta) -> None:
    """An untied network's safetensors (``save_model`` keeps both) given to a tied model: refused read eagerly, and
    read lazily too, where ``fit_state`` sees only meta tensors (the head used to be dropped in silence)."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    untied = CM3Leon(CM3LeonConfig.from_preset("tiny", tie_embeddings=False))
    with torch.no_grad():
        untied.lm_head.weight.normal_()  # zero after the paper's init
    save_model(untied, str(tmp_path / "untied.safetensors"))
    weights = read_weights(tmp_path / "untied.safetensors", lazy=lazy)
    assert (weights.fetch is not None) is lazy
    with torch.device("meta" if on_meta else "cpu"):
        tied = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(ValueError, match=r"^x: 'wte.weight' and 'lm_head.weight' differ, but the model ties them$"):
        load_weights(tied, weights.state_dict, "x", weights.fetch)
    if not on_meta:  # refused before anything was copied in
        assert all(torch.equal(v, before[k]) for k, v in tied.state_dict().items())


def test_an_integer_tensor_for_a_float_weight_is_refused(tmp_path: Path) -> None:
    """A quantized file (int8 where the model has floats) is named, not cast to float and loaded as nonsense."""
    from safetensors.torch import save_file

    model = CM3Leon(CM3LeonConfig.from_preset("tiny"))
    state = {k: v.clone() for k, v in model.state_dict().items() if k != TIED[1]}
    state["blocks.0.mlp.fc_in.weight"] = torch.ones_like(state["blocks.0.mlp.fc_in.weight"], dtype=torch.int8)
    save_file(state, tmp_path / "q.safetensors")
    for lazy in (False, True):
        weights = read_weights(tmp_path / "q.safetensors", lazy=lazy)
        with torch.device("meta"):
            fresh = CM3Leon(model.config)
        with pytest.raises(ValueError) as err:
            load_weights(fresh, weights.state_dict, "x", weights.fetch)
        assert str(err.value) == (
            "x: the weights do not fit the model: wrong dtypes (file, model) "
            "{'blocks.0.mlp.fc_in.weight': ('int8', 'float32')}"
        )
