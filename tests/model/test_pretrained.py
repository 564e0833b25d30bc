"""The model directory format (``model/pretrained.py``): what ``cm3leon export`` writes and the commands read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cm3leon_lightning import __version__
from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_model_dir,
    read_model_config,
    read_pretrained,
    save_pretrained,
)
from cm3leon_lightning.model.weights import TIED, read_weights

VOCAB = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}


@pytest.fixture()
def model() -> CM3Leon:
    torch.manual_seed(0)
    return CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128))


def test_round_trip_keeps_every_tensor_and_records_the_model(tmp_path: Path) -> None:
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128, tie_embeddings=False))
    out = save_pretrained(model.state_dict(), tmp_path / "m", model.config.to_dict(), VOCAB, source={"step": 3})
    assert out == tmp_path / "m" and is_model_dir(out)
    state, doc = read_pretrained(out)
    assert doc == {
        "format": "cm3leon_lightning.model", "format_version": 1, "created_by": __version__,
        "config": model.config.to_dict(), "vocab": VOCAB, "dtype": "float32", "source": {"step": 3},
    }  # fmt: skip
    want = model.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_tied_pair_is_stored_once_and_dtype_converted(model: CM3Leon, tmp_path: Path) -> None:
    assert model.config.tie_embeddings
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert TIED[1] not in stored and TIED[0] in stored
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert torch.equal(stored["wpe.weight"], model.wpe.weight.detach().to(torch.bfloat16))
    assert read_model_config(tmp_path)["dtype"] == "bfloat16"


@pytest.mark.parametrize(("layout", "dtype"), [("cm3leon", None), ("hf", torch.bfloat16)])
def test_a_lazy_source_is_read_a_chunk_at_a_time_into_the_same_file(
    model: CM3Leon, tmp_path: Path, layout: str, dtype: torch.dtype | None
) -> None:
    state = model.state_dict()
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    budget = max(sizes.values())
    calls: list[list[str]] = []

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(names))
        return {k: state[k].clone() for k in names}

    meta = {k: v.to("meta") for k, v in state.items()}
    config = model.config.to_dict()
    save_pretrained(meta, tmp_path / "lazy", config, VOCAB, dtype, layout=layout, fetch=fetch, chunk_bytes=budget)
    save_pretrained(state, tmp_path / "whole", config, VOCAB, dtype, layout=layout, chunk_bytes=1 << 40)
    assert len(calls) > 2 and all(sum(sizes[k] for k in c) <= budget for c in calls)
    read = [k for c in calls for k in c]
    assert sorted(read) == sorted(set(read)) and set(read) == set(state) - {TIED[1]}  # each once, tie once
    lazy, whole = (tmp_path / d / WEIGHTS_FILE for d in ("lazy", "whole"))
    assert lazy.read_bytes() == whole.read_bytes()


def test_dtypes_are_checked(model: CM3Leon, tmp_path: Path) -> None:
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        save_pretrained(state, tmp_path, model.config.to_dict(), VOCAB, dtype=torch.float64)
    mixed = {**state, "wpe.weight": state["wpe.weight"].half()}
    with pytest.raises(ValueError, match=r"must share one dtype .* found \['torch.float16', 'torch.float32'\]"):
        save_pretrained(mixed, tmp_path, model.config.to_dict(), VOCAB)
    assert not (tmp_path / CONFIG_FILE).exists()  # refused before writing anything


def test_malformed_directories_name_the_file_and_field(model: CM3Leon, tmp_path: Path) -> None:
    good = save_pretrained(model.state_dict(), tmp_path / "good", model.config.to_dict(), VOCAB)
    doc = json.loads((good / CONFIG_FILE).read_text())

    def variant(name: str, text: str | None, weights: bool = True) -> Path:
        d = tmp_path / name
        d.mkdir()
        if text is not None:
            (d / CONFIG_FILE).write_text(text)
        if weights:
            (d / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes())
        return d

    cases = {
        variant("nocfg", None): (FileNotFoundError, "has no config.json; is it a model directory"),
        variant("json", "{oops"): (ValueError, "config.json is not valid JSON"),
        variant("vqgan", json.dumps({**doc, "format": "cm3leon_lightning.vqgan"})): (
            ValueError,
            "has format 'cm3leon_lightning.vqgan', not 'cm3leon_lightning.model'",
        ),
        variant("newer", json.dumps({**doc, "format_version": 2})): (ValueError, "reads up to 1 \\(upgrade"),
        variant("novocab", json.dumps({k: v for k, v in doc.items() if k != "vocab"})): (
            ValueError,
            "lacks the field 'vocab' \\(dict\\)",
        ),
        variant("dtype", json.dumps({**doc, "dtype": "int8"})): (ValueError, "field 'dtype' is 'int8'"),
        variant("noweights", json.dumps(doc), weights=False): (FileNotFoundError, "has config.json but no model"),
    }
    for path, (error, message) in cases.items():
        with pytest.raises(error, match=f"--ckpt: .*{message}"):
            read_model_config(path, "--ckpt")
    broken = variant("broken", json.dumps(doc), weights=False)
    (broken / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors}")
    with pytest.raises(ValueError, match="model.safetensors' cannot be read as safetensors"):
        read_pretrained(broken, "--ckpt")
    # a config.json that is JSON but not an object is no Hugging Face config (it crashed with AttributeError)
    for name, text in (("string", json.dumps("model_type")), ("list", json.dumps(["model_type"]))):
        with pytest.raises(ValueError, match=f"--ckpt: .*{name}/config.json has format None, not"):
            read_weights(variant(name, text), "--ckpt")


def test_a_directory_resaved_from_its_own_lazy_weights_keeps_them(model: CM3Leon, tmp_path: Path) -> None:
    """Converting a model directory in place (read lazily, saved back in bfloat16) truncated model.safetensors
    before its tensors were read: the only copy of the model was lost. A failed save leaves the old files."""
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB)
    weights = read_weights(tmp_path, "--ckpt", lazy=True)
    save_pretrained(weights.state_dict, tmp_path, weights.config, VOCAB, dtype=torch.bfloat16, fetch=weights.fetch)
    state, doc = read_pretrained(tmp_path)
    assert doc["dtype"] == "bfloat16" and sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != TIED[1]}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    before = (tmp_path / WEIGHTS_FILE).read_bytes()

    def failing(names: list[str]) -> dict[str, torch.Tensor]:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        save_pretrained(weights.state_dict, tmp_path, weights.config, VOCAB, fetch=failing)
    assert (tmp_path / WEIGHTS_FILE).read_bytes() == before and read_model_config(tmp_path)["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
