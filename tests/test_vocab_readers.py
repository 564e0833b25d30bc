"""Every reader of a saved vocabulary (generate/serve's load_checkpoint, predict's vocab_from, export) requires all
its fields: a description missing ``grid_h`` used to take the default 32, a silently different image grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.export import export_model
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.predict import load_vocab
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.pretrained import save_pretrained

VOCAB = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}


@pytest.fixture(scope="module")
def partial_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory whose recorded vocabulary lacks ``grid_h`` (a hand-edited ``config.json``)."""
    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128))
    vocab = {k: v for k, v in VOCAB.items() if k != "grid_h"}
    root = tmp_path_factory.mktemp("partial")
    return save_pretrained(model.state_dict(), root / "m", model.config.to_dict(), vocab)


def test_whole_vocabularies_still_load(tmp_path: Path) -> None:
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128))
    path = save_pretrained(model.state_dict(), tmp_path / "m", model.config.to_dict(), VOCAB)
    assert load_checkpoint(path)[1].to_dict() == VOCAB
    assert load_vocab(path).to_dict() == VOCAB


def test_generate_and_serve_name_the_missing_field(partial_vocab_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"--ckpt .*: vocab: missing field\(s\) \['grid_h'\]"):
        load_checkpoint(partial_vocab_dir)


def test_predict_names_the_missing_field(partial_vocab_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_from: .*: vocab: missing field\(s\) \['grid_h'\]"):
        load_vocab(partial_vocab_dir)


def test_export_names_the_missing_field_and_writes_nothing(partial_vocab_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--ckpt: .*: vocab: missing field\(s\) \['grid_h'\]"):
        export_model(partial_vocab_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
