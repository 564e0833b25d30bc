"""Reading a Hugging Face (OPT) layout directory lazily (``model/hf_lazy.py``): meta tensors up front, and a
``fetch(names)`` that reads only the safetensors entries those names come from, giving the whole read's tensors bit
for bit. It used to read every tensor at once, so loading a 7B directory held the whole model beside the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model import weights as weights_mod
from cm3leon_lightning.model.hf_lazy import opt_sources
from cm3leon_lightning.model.pretrained import save_pretrained
from cm3leon_lightning.model.weights import chunk_names, load_weights, read_weights

VOCAB = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}
LAYER = "model.decoder.layers.{}."


def export_hf(directory: Path, dtype: torch.dtype | None = None, **overrides) -> CM3Leon:
    """A tiny random network written in the ``hf`` layout by the project's own export code; returned."""
    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_pretrained(model.state_dict(), directory, model.config.to_dict(), VOCAB, dtype=dtype, layout="hf")
    return model


def reshard(directory: Path) -> dict[str, str]:
    """Split ``model.safetensors`` into three shards as ``transformers`` does (layer 0, layer 1, the rest) with a
    ``model.safetensors.index.json``; returns the weight map."""

    def shard_of(name: str) -> str:
        return next((f"model-0000{i + 1}-of-00003.safetensors" for i in (0, 1) if LAYER.format(i) in name), "")

    state = load_file(directory / "model.safetensors")
    weight_map = {k: shard_of(k) or "model-00003-of-00003.safetensors" for k in state}
    for name in sorted(set(weight_map.values())):
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, directory / name, {"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()
    return weight_map


@pytest.fixture()
def reads(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every ``safe_open`` of a weights file as ``(file name, the tensors read through it)``, in order."""
    real, opened = safetensors.safe_open, []

    class Recording:
        def __init__(self, filename, *args, **kwargs) -> None:
            self.f = real(filename, *args, **kwargs)
            opened.append((Path(filename).name, []))
            self.names = opened[-1][1]

        def __enter__(self) -> Recording:
            self.f.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.f.__exit__(*exc)

        def __getattr__(self, attr: str):  # keys, get_slice, metadata: the header only
            return getattr(self.f, attr)

        def get_tensor(self, name: str) -> torch.Tensor:
            self.names.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return opened


@pytest.mark.parametrize(
    ("overrides", "dtype", "sharded"),
    [({}, None, False), ({"tie_embeddings": False}, torch.bfloat16, False), ({"tie_embeddings": False}, None, True)],
)
def test_lazy_reading_gives_the_whole_reads_tensors_bit_for_bit(
    tmp_path: Path, overrides: dict, dtype: torch.dtype | None, sharded: bool
) -> None:
    model = export_hf(tmp_path, dtype, **overrides)
    if sharded:
        reshard(tmp_path)
    whole = read_weights(tmp_path, "--ckpt")
    lazy = read_weights(tmp_path, "--ckpt", lazy=True)
    assert whole.fetch is None and lazy.fetch is not None and lazy.kind == whole.kind == "hugging face directory"
    assert (lazy.config, lazy.vocab, lazy.source) == (whole.config, whole.vocab, whole.source)
    assert all(v.is_meta for v in lazy.state_dict.values())
    assert [(k, v.shape, v.dtype) for k, v in lazy.state_dict.items()] == [
        (k, v.shape, v.dtype) for k, v in whole.state_dict.items()
    ]
    for names in ([list(lazy.state_dict)], [[k] for k in lazy.state_dict]):  # all at once, and one at a time
        got = {k: v for chunk in names for k, v in lazy.fetch(chunk).items()}
        assert list(got) == list(whole.state_dict)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in whole.state_dict.items())
    loaded, _ = load_checkpoint(tmp_path)  # lazy, a chunk at a time
    with torch.device("meta"):
        reference = CM3Leon(model.config).to(loaded.wte.weight.dtype)
    load_weights(reference, whole.state_dict, "x")  # the old whole read
    want = reference.state_dict()
    assert all(v.dtype == want[k].dtype and torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_a_fetch_reads_only_the_entries_of_its_names(tmp_path: Path, reads: list) -> None:
    export_hf(tmp_path, tie_embeddings=False)
    lazy = read_weights(tmp_path, "--ckpt", lazy=True)
    assert reads == [("model.safetensors", [])]  # the header only
    reads.clear()
    layer = LAYER.format(1)
    got = lazy.fetch(["blocks.1.attn.qkv.weight", "blocks.1.mlp.fc_out.weight", "wpe.weight"])
    assert reads == [
        (
            "model.safetensors",
            [f"{layer}self_attn.q_proj.weight", f"{layer}self_attn.k_proj.weight", f"{layer}self_attn.v_proj.weight",
             f"{layer}fc2.weight", "model.decoder.embed_positions.weight"],
        )
    ]  # fmt: skip
    assert got["blocks.1.attn.qkv.weight"].shape == (192, 64) and got["wpe.weight"].shape == (256, 64)


def test_loading_holds_one_chunk_and_reads_each_entry_once(tmp_path: Path, reads: list, monkeypatch) -> None:
    """``load_checkpoint`` asks for :data:`CHUNK_BYTES` at a time: each ``safe_open`` reads the entries of one chunk
    (a layer's q, k, v and out projections together, or one tensor), and every entry exactly once."""
    export_hf(tmp_path, tie_embeddings=False)
    meta = read_weights(tmp_path, lazy=True).state_dict
    sizes = {k: v.numel() * v.element_size() for k, v in meta.items()}
    monkeypatch.setattr(weights_mod, "CHUNK_BYTES", max(sizes.values()))
    reads.clear()
    load_checkpoint(tmp_path)
    fetched = [names for _, names in reads if names]
    layer = [LAYER.format(i) for i in (0, 1)]
    assert fetched == [
        ["model.decoder.embed_tokens.weight"],
        ["model.decoder.embed_positions.weight"],
        *(
            part
            for x in layer
            for part in (
                [f"{x}self_attn.{p}_proj.weight" for p in ("q", "k", "v", "out")],
                [f"{x}fc1.weight"],
                [f"{x}fc2.weight"],
            )
        ),
        ["lm_head.weight"],
    ]
    assert fetched == [[s for k in chunk for s in opt_sources(k)] for chunk in chunk_names(meta)]
    every = [n for f in fetched for n in f]
    assert sorted(every) == sorted(load_file(tmp_path / "model.safetensors"))  # each entry once


def test_a_sharded_directory_opens_only_the_shards_of_the_names(tmp_path: Path, reads: list) -> None:
    export_hf(tmp_path)
    weight_map = reshard(tmp_path)
    lazy = read_weights(tmp_path, "--ckpt", lazy=True)
    assert all(not names for _, names in reads)  # three headers, no tensor
    reads.clear()
    lazy.fetch(["blocks.1.attn.out_proj.weight", "blocks.1.mlp.fc_in.weight"])
    layer = LAYER.format(1)
    assert reads == [("model-00002-of-00003.safetensors", [f"{layer}self_attn.out_proj.weight", f"{layer}fc1.weight"])]
    assert weight_map[f"{layer}fc1.weight"] == "model-00002-of-00003.safetensors"


def test_damaged_directories_are_refused_lazily_in_the_whole_reads_words(tmp_path: Path) -> None:
    """Every check of the whole read (missing or misshapen OPT tensors, damaged shards) is made from the headers."""
    export_hf(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    damaged = [
        {k: v for k, v in state.items() if k != f"{LAYER.format(1)}fc2.weight"},
        {**state, f"{LAYER.format(0)}self_attn.k_proj.weight": torch.zeros(64, 32)},
        {**state, "model.decoder.embed_positions.weight": torch.zeros(1, 64)},
    ]
    for files in damaged:
        save_file(files, weights)
        with pytest.raises(ValueError) as whole:
            read_weights(tmp_path, "--ckpt")
        with pytest.raises(ValueError) as lazy:
            read_weights(tmp_path, "--ckpt", lazy=True)
        assert str(lazy.value) == str(whole.value) and str(whole.value).startswith(f"--ckpt {str(weights)!r}: ")
    save_file(state, weights)
    with pytest.raises(KeyError, match="no tensor 'blocks.9.attn.qkv.weight' in the weights"):
        read_weights(tmp_path, "--ckpt", lazy=True).fetch(["blocks.9.attn.qkv.weight"])
    reshard(tmp_path)
    extra = tmp_path / "model-00002-of-00003.safetensors"
    save_file({**load_file(extra), "extra": torch.zeros(1)}, extra)
    with pytest.raises(ValueError) as whole:
        read_weights(tmp_path, "--ckpt")
    with pytest.raises(ValueError) as lazy:
        read_weights(tmp_path, "--ckpt", lazy=True)
    assert str(lazy.value) == str(whole.value) and "holds also ['extra']" in str(whole.value)


@pytest.mark.parametrize("layout", ["cm3leon", "hf"])
def test_a_lazy_read_keeps_the_whole_reads_order(tmp_path: Path, layout: str) -> None:
    """``safe_open(...).keys()`` is sorted by name where ``load_file`` gives the file's order: a lazy read of our
    layout listed ``blocks.*`` before ``wte.weight``, and of the ``hf`` layout named unexpected keys (a layer the
    config does not have) in another order than the whole read."""
    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128, n_layer=3))
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, layout=layout)
    if layout == "hf":  # edited to 2 layers: layer 2's tensors are passed on under their own names
        doc = json.loads((tmp_path / "config.json").read_text())
        doc["cm3leon"]["config"]["n_layer"] = 2
        (tmp_path / "config.json").write_text(json.dumps(doc))
    whole, lazy = (list(read_weights(tmp_path, lazy=lazy).state_dict) for lazy in (False, True))
    assert lazy == whole and whole[:3] == ["wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight"]
    if layout == "hf":
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
        assert whole[-6:] == [f"{LAYER.format(2)}{n}.weight" for n in names]
