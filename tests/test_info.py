"""``cm3leon info``: every kind of file the package writes is recognised and described from its metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_model
from support.checkpoint_setup import save_sharded
from support.retrieval_setup import write_retrieval_assets
from support.token_data import TokenDataModule, cpu_trainer

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.export import export_model
from cm3leon_lightning.info import describe, main
from cm3leon_lightning.modules.cm3leon import CM3LeonModule


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("info")
    setup = write_retrieval_assets(root)  # tok/, vqgan/, model.ckpt, shards/, clip.safetensors, bank/
    export_model(root / "model.ckpt", root / "exported", root / "tok", root / "vqgan", dtype=torch.bfloat16)
    export_model(root / "model.ckpt", root / "hf", format="hf")
    L.seed_everything(0)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=1)
    trainer = cpu_trainer(root / "fit", max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=TokenDataModule(n_train=8, batch_size=4))
    trainer.save_checkpoint(root / "trained.ckpt")
    save_sharded(trainer, root / "sharded.ckpt")
    shutil.copytree(root / "shards", root / "prepared" / "train")
    save_model(module.model, str(root / "bare.safetensors"))
    torch.save(module.model.state_dict(), root / "bare.pt")
    return {"root": root, "vocab": setup["vocab"].to_dict(), "module": module}


def test_checkpoints_and_models_give_architecture_vocabulary_and_step(assets: dict) -> None:
    root, vocab, module = assets["root"], assets["vocab"], assets["module"]
    params = module.config.num_parameters()
    trained = describe(root / "trained.ckpt")
    assert trained["kind"] == "lightning checkpoint" and trained["global_step"] == 2 and trained["epoch"] == 1
    assert trained["optimizer_state"] is True and trained["parameters"] == params
    assert trained["architecture"]["n_layer"] == 2 and trained["vocab"] == module.hparams.vocab
    sharded = describe(root / "sharded.ckpt")
    assert (sharded["kind"], sharded["global_step"], sharded["parameters"]) == ("sharded checkpoint", 2, params)
    exported = describe(root / "exported")
    assert exported["kind"] == "model directory" and exported["dtype"] == "bfloat16" and exported["vocab"] == vocab
    assert exported["bundled"] == ["tokenizer", "vqgan"] and exported["source"]["kind"] == "lightning checkpoint"
    hf = describe(root / "hf")
    assert hf["kind"] == "model directory (Hugging Face OPT layout)" and hf["dtype"] == "float32"
    assert hf["bundled"] == [] and hf["parameters"] == exported["parameters"]
    assert describe(root / "bare.safetensors")["kind"] == "safetensors"
    assert describe(root / "bare.safetensors")["elements"] == params  # the tied pair stored once
    assert describe(root / "bare.pt")["kind"] == "state dict"


def test_data_tokenizers_and_banks(assets: dict) -> None:
    root, vocab = assets["root"], assets["vocab"]
    data = describe(root / "shards")
    assert (data["kind"], data["samples"], data["shards"], data["vocab"]) == ("prepared dataset", 12, 3, vocab)
    assert describe(root / "shards" / "manifest.json")["samples"] == 12
    assert describe(root / "prepared") == {"kind": "prepare output", "train_samples": 12, "vocab": vocab,
                                           "bytes": describe(root / "prepared")["bytes"]}  # fmt: skip
    bank = describe(root / "bank")
    assert bank["kind"] == "memory bank" and bank["count"] == 12 and bank["model_name"] == "cm3leon-clip-tiny"
    tok = describe(root / "tok")
    assert tok["kind"] == "text tokenizer" and tok["vocab_size"] == vocab["n_text"]
    assert describe(root / "vqgan") == {"kind": "VQGAN", "resolution": 16, "codes": 32, "grid": 8,
                                        "bytes": describe(root / "vqgan")["bytes"]}  # fmt: skip


def test_the_command_prints_lines_or_json_and_refuses_unknown_paths(assets: dict, tmp_path: Path, capsys) -> None:
    root = assets["root"]
    assert cm3leon_main(["info", str(root / "exported")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kind:", "model", "directory"] and any(x.startswith("size:") for x in lines)
    assert any(
        x.split()[:2] == ["parameters:", f"{assets['module'].config.num_parameters() / 1e6:.1f}M"] for x in lines
    )
    assert main([str(root / "trained.ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "is a directory this package does not know" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"cm3leon info: error: PATH: {tmp_path / 'nope'} does not exist"
    (tmp_path / "junk.ckpt").write_text("junk")
    assert main([str(tmp_path / "junk.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cm3leon info: error: ") and err.count("\n") == 1
