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
from cm3leon_lightning.model.pretrained import save_pretrained
from cm3leon_lightning.model.weights import TIED, fit_state, read_sharded, read_weights
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


def test_fit_state_checks_shapes_on_a_meta_skeleton() -> None:
    config = CM3LeonConfig.from_preset("tiny")
    with torch.device("meta"):
        skeleton = CM3Leon(config)
    state = {k: torch.zeros(v.shape) for k, v in skeleton.state_dict().items()}
    assert fit_state(skeleton, state, "x").keys() == state.keys()
    state["wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"x: the weights do not fit the model: wrong shapes .*'wpe.weight': \(\(3, "):
        fit_state(skeleton, state, "x")
