"""The Hugging Face OPT layout (``model/hf_opt.py``, ``export --format hf``): ``transformers.OPTForCausalLM`` loads
the exported directory and gives CM3Leon's logits and greedy tokens; the directory reads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTForCausalLM

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.hf_opt import from_opt, to_opt
from cm3leon_lightning.model.pretrained import bundled_paths, is_hf_dir, read_hf_block, save_pretrained
from cm3leon_lightning.model.weights import fit_state, read_weights
from cm3leon_lightning.tokenization.text import TextTokenizer

VOCAB = {"n_text": 64, "n_codes": 32, "grid_h": 2, "grid_w": 3, "num_sentinels": 8, "pad_to_multiple": 128}


def random_model(**overrides) -> CM3Leon:
    """A tiny network with every weight drawn from N(0, 0.2), so the logits are far from uniform."""
    torch.manual_seed(0)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=128, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"activation": "relu"}])
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path: Path, overrides: dict) -> None:
    model = random_model(**overrides)
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, layout="hf")
    hf = OPTForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # row 1 left-padded, as batched prompts are
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
        real = mask.bool()
        torch.testing.assert_close(hf(x, attention_mask=mask).logits[real], model(x, attention_mask=mask)[real])
        out = hf.generate(x[:1], max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = x[:1]
    for _ in range(8):  # our greedy, without a cache
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_mapping_round_trips_every_tensor() -> None:
    for tied in (True, False):
        model = random_model(tie_embeddings=tied)
        config = model.config.to_dict()
        theirs = to_opt(model.state_dict(), config)
        assert theirs["model.decoder.embed_positions.weight"].shape == (model.config.max_seq_len + 2, 64)
        assert not theirs["model.decoder.embed_positions.weight"][:2].any()  # OPT's offset rows
        assert ("lm_head.weight" in theirs) is not tied
        back = fit_state(model, from_opt(theirs, config), "x")
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="OPT layout: CM3Leon has no tensor 'blocks.0.attn.bias'"):
        to_opt({"blocks.0.attn.bias": torch.zeros(3)}, config)


def test_architectures_opt_cannot_express_are_refused(tmp_path: Path) -> None:
    swiglu = random_model(activation="swiglu")
    with pytest.raises(ValueError, match="OPT has no 'swiglu' MLP; only gelu and relu models convert"):
        save_pretrained(swiglu.state_dict(), tmp_path, swiglu.config.to_dict(), VOCAB, layout="hf")
    eps = random_model(layer_norm_eps=1e-6)
    with pytest.raises(ValueError, match="OPT's LayerNorm epsilon is 1e-05, the model's 1e-06"):
        save_pretrained(eps.state_dict(), tmp_path, eps.config.to_dict(), VOCAB, layout="hf")
    assert not (tmp_path / "config.json").exists()


def test_the_directory_reads_back_and_other_opt_models_are_refused(tmp_path: Path) -> None:
    model = random_model()
    save_pretrained(
        model.state_dict(), tmp_path / "m", model.config.to_dict(), VOCAB, source={"global_step": 4}, layout="hf"
    )
    assert is_hf_dir(tmp_path / "m") and read_hf_block(tmp_path / "m")["vocab"] == VOCAB
    weights = read_weights(tmp_path / "m", "--ckpt")
    assert weights.kind == "hugging face directory" and weights.source == {"global_step": 4}
    state = fit_state(model, weights.state_dict, "x")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    plain = tmp_path / "opt"
    plain.mkdir()
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "cm3leon"}))
    with pytest.raises(ValueError, match="is a Hugging Face 'opt' model not exported by cm3leon"):
        read_weights(plain, "--ckpt")
    assert bundled_paths(tmp_path / "m") == (None, None)  # no tokenizer was written
    from cm3leon_lightning.generation.predict import load_vocab

    assert load_vocab(tmp_path / "m").to_dict() == VOCAB  # cm3leon predict's --data.vocab_from


def test_export_format_hf_bundles_a_tokenizer_transformers_reads(tmp_path: Path) -> None:
    from support.checkpoint_setup import write_checkpoint_assets

    from cm3leon_lightning.export import main

    root = write_checkpoint_assets(tmp_path)
    argv = ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan")]
    assert main([*argv, "--format", "hf", "--dtype", "bfloat16", "--out", str(tmp_path / "hf")]) == 0
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vqgan",
    ]
    ours = TextTokenizer.load(root / "tok")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("a red circle", "two green triangles", "what colour is it"):
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert bundled_paths(tmp_path / "hf") == (tmp_path / "hf" / "tokenizer.json", tmp_path / "hf" / "vqgan")
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    reference, _ = load_checkpoint(root / "model.ckpt", dtype=torch.bfloat16)
    back, _ = load_checkpoint(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16 and back.wte.weight.dtype == torch.bfloat16
    x = ids().clamp(max=299)
    with torch.no_grad():
        assert torch.equal(back(x), reference(x))
        torch.testing.assert_close(hf(x).logits, reference(x), atol=2e-2, rtol=2e-2)  # bf16: op order differs
    # and from the Hugging Face directory to ours again, tokenizers included
    assert main(["--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tokenizer" / "tokenizer.json").is_file()


def test_weights_the_config_does_not_name_are_refused_naming_the_file(tmp_path: Path) -> None:
    """OPT tensors the mapping does not take (a ``config.json`` edited to fewer layers) are refused as unexpected,
    as our layout refuses them, instead of being dropped; a missing one names the weights file."""
    from safetensors.torch import load_file, save_file

    model = random_model(n_layer=3)
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, layout="hf")
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["cm3leon"]["config"]["n_layer"] = 2
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value).startswith(
        f"--ckpt {str(tmp_path)!r}: the weights do not fit the model: unexpected keys "
        "['model.decoder.layers.2.self_attn.q_proj.weight', "
    )
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["model.decoder.layers.1.fc2.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path, "--ckpt")
    assert str(err.value) == f"--ckpt {str(weights)!r}: the OPT weights lack 'model.decoder.layers.1.fc2.weight'"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_layer", None, "lacks the field 'n_layer'"),
        ("tie_embeddings", None, "lacks the field 'tie_embeddings'"),
        ("n_layer", "2", "has 'n_layer' = '2', not an int"),
        ("tie_embeddings", "false", "has 'tie_embeddings' = 'false', not a bool"),
    ],
)
def test_a_hand_damaged_cm3leon_block_is_refused_naming_the_field(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    """``from_opt`` read ``config["n_layer"]`` and ``config["tie_embeddings"]`` bare: a KeyError / TypeError."""
    model = random_model()
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, layout="hf")
    doc = json.loads((tmp_path / "config.json").read_text())
    if value is None:
        del doc["cm3leon"]["config"][field]
    else:
        doc["cm3leon"]["config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path, "--ckpt")
    assert str(err.value) == (
        f"--ckpt {str(tmp_path / 'model.safetensors')!r}: the model config ('cm3leon.config' of the config.json "
        f"beside the weights) {message}"
    )


def test_an_untied_bfloat16_export_gives_our_logits_and_left_padded_greedy_tokens(tmp_path: Path) -> None:
    """The 7b preset's case (an LM head of its own) in bfloat16: transformers' logits of a left-padded batch equal
    ours exactly, and its left-padded greedy ``generate`` equals our KV-cache decoding."""
    model = random_model(tie_embeddings=False)
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, dtype=torch.bfloat16, layout="hf")
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    hf = OPTForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    ours, _ = load_checkpoint(tmp_path)
    assert hf.dtype == ours.wte.weight.dtype == torch.bfloat16
    assert not torch.equal(hf.lm_head.weight, hf.model.decoder.embed_tokens.weight)
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    mask[2, :7] = 0
    real = mask.bool()
    with torch.no_grad():
        assert torch.equal(hf(x, attention_mask=mask).logits[real], ours(x, attention_mask=mask)[real])
        hf32 = OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        ours32, _ = load_checkpoint(tmp_path, dtype=torch.float32)
        out = hf32.generate(
            x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        ours32.setup_kv_cache(batch_size=3, max_seq_len=18)
        logits = ours32(x, input_pos=torch.arange(12), attention_mask=mask, last_only=True)
        input_pos, tokens = torch.tensor([12]), []
        for _ in range(6):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            logits = ours32(tokens[-1], input_pos=input_pos)
            input_pos += 1
    assert torch.equal(out[:, 12:], torch.cat(tokens, dim=1))


def test_misshapen_opt_tensors_are_refused_naming_them_and_the_file(tmp_path: Path) -> None:
    """A key projection of another width crashed ``torch.cat`` with a bare RuntimeError naming neither tensor nor
    file; a position embedding without OPT's two offset rows was reported as an empty ``wpe.weight``."""
    from safetensors.torch import load_file, save_file

    model = random_model()
    save_pretrained(model.state_dict(), tmp_path, model.config.to_dict(), VOCAB, layout="hf")
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    layer = "model.decoder.layers.1.self_attn."
    save_file({**state, f"{layer}k_proj.weight": torch.zeros(64, 32)}, weights)
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path, "--ckpt")
    assert str(err.value) == (
        f"--ckpt {str(weights)!r}: the query, key and value projections must be matrices of one shape: "
        f"{{'{layer}q_proj.weight': (64, 64), '{layer}k_proj.weight': (64, 32), '{layer}v_proj.weight': (64, 64)}}"
    )
    save_file({**state, "model.decoder.embed_positions.weight": torch.zeros(1, 64)}, weights)
    with pytest.raises(ValueError) as err:
        read_weights(tmp_path, "--ckpt")
    assert str(err.value) == (
        f"--ckpt {str(weights)!r}: model.decoder.embed_positions.weight has shape (1, 64); OPT's is "
        "(positions + 2, hidden_size)"
    )


def test_a_directory_transformers_resaved_in_shards_reads_back(tmp_path: Path) -> None:
    """``OPTForCausalLM.save_pretrained`` splits a model larger than ``max_shard_size`` into shards listed by
    ``model.safetensors.index.json``; such a directory was refused for lacking ``model.safetensors``. A damaged
    index or shard set is refused naming the file."""
    from safetensors.torch import load_file, save_file

    model = random_model()
    save_pretrained(model.state_dict(), tmp_path / "a", model.config.to_dict(), VOCAB, layout="hf")
    OPTForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_size="40KB")
    d = tmp_path / "b"
    index = d / "model.safetensors.index.json"
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (d / "model.safetensors").exists()
    ours, _ = load_checkpoint(d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
    first, second = (d / s for s in shards[:2])
    a, b = load_file(first), load_file(second)
    key = next(iter(a))
    save_file({**b, key: a[key]}, second)  # one tensor in two shards
    with pytest.raises(ValueError, match=rf"--ckpt: \['{key}'\] are in both '{first}' and '{second}'"):
        read_weights(d, "--ckpt")
    save_file({**b, "extra": torch.zeros(1)}, second)  # a tensor the index does not list
    with pytest.raises(ValueError, match=rf"'{second}' does not hold what .* holds also \['extra'\], lacks \[\]"):
        read_weights(d, "--ckpt")
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.json names the shard '{shards[1]}', but '{second}' does"):
        read_weights(d, "--ckpt")
    index.unlink()
    with pytest.raises(FileNotFoundError, match="has config.json but no model.safetensors \\(nor model.safetensors"):
        read_weights(d, "--ckpt")
