"""``cm3leon info``: every kind of file the package writes is recognised and described from its metadata."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file, save_model
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
    root = assets["root"]
    from cm3leon_lightning.tokenization.text import TextTokenizer

    # the manifest's vocabulary names its tokenizers too (the text tokenizer's sha256, the VQGAN file's)
    vocab = {**assets["vocab"], "text_tokenizer_sha256": TextTokenizer.load(root / "tok").sha256}
    data = describe(root / "shards")
    vocab["vqgan_sha256"] = data["vocab"]["vqgan_sha256"]
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


def test_checkpoints_say_whether_optimizer_state_is_inside_and_their_dtype(assets: dict) -> None:
    """The README's promise for every checkpoint kind: the step, whether optimizer state is inside, the dtype."""
    root = assets["root"]
    trained, sharded = describe(root / "trained.ckpt"), describe(root / "sharded.ckpt")
    assert (trained["optimizer_state"], trained["dtype"]) == (True, "float32")
    assert (sharded["optimizer_state"], sharded["dtype"], sharded["global_step"]) == (True, "float32", 2)
    weights_only = describe(root / "model.ckpt")  # state_dict + hyper_parameters, no optimizer
    assert (weights_only["optimizer_state"], weights_only["dtype"]) == (False, "float32")


def test_a_model_directory_with_fields_left_out_shows_their_defaults(tmp_path: Path) -> None:
    """A config.json naming only some fields (the rest default when loading) crashed with a KeyError."""
    from cm3leon_lightning.config import CM3LeonConfig

    doc = {"format": "cm3leon_lightning.model", "config": {"n_layer": 2, "vocab_size": 512}, "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))  # only its header is read
    info = describe(tmp_path)
    default = CM3LeonConfig(n_layer=2, vocab_size=512)
    assert info["kind"] == "model directory" and info["parameters"] == default.num_parameters()
    assert info["architecture"] == {"n_layer": 2, "d_model": 1024, "n_head": 16, "d_ff": 3584, "max_seq_len": 4096,
                                    "activation": "gelu", "tie_embeddings": True}  # fmt: skip


def test_a_checkpoint_with_an_unknown_architecture_field_is_named(tmp_path: Path, capsys) -> None:
    """A checkpoint from a version with more CM3LeonConfig fields: the error named no file."""
    path = tmp_path / "new.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {"n_layer": 2, "bogus": 1}}}, path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    want = f"cm3leon info: error: PATH: {path} has an unusable architecture or vocabulary: unknown CM3LeonConfig field"
    assert err.startswith(want) and err.count("\n") == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("list", "[1, 2]", "PATH: {path}/config.json holds a JSON list, not an object"),
        ("garbage", "not json", "PATH: {path}/config.json is not valid JSON: Expecting value"),
        ("bert", '{"model_type": "bert"}', "PATH: {path}/config.json is a Hugging Face 'bert' model not exported by"),
        ("bank", "not json", "PATH: {path}/meta.json is not valid JSON"),
        ("corrupt.safetensors", None, "PATH: {path} is not a readable safetensors file"),
        (
            "prompts.txt",
            "a red circle\n",
            "PATH: {path} is not a checkpoint, model, dataset, bank or tokenizer (neither",
        ),
        (
            "model",
            '{"format": "cm3leon_lightning.model", "config": {"bogus": 1}}',
            "PATH: {path}/config.json has an unusable architecture or vocabulary: unknown CM3LeonConfig field(s) "
            "['bogus']",
        ),
        (
            "model",
            '{"format": "cm3leon_lightning.model", "vocab": [1, 2]}',
            "PATH: {path}/config.json has an unusable architecture or vocabulary: cannot convert",
        ),
        (
            "vqgan",
            '{"format": "cm3leon_lightning.vqgan", "config": [16]}',
            "PATH: {path}/config.json has an unusable VQGAN 'config': 'list' object has no attribute 'get'",
        ),
    ],
    ids=[
        *("json-list", "json-garbage", "hf-bert", "bank-meta", "corrupt-safetensors", "text-file"),
        *("model-field", "model-vocab", "vqgan-config"),
    ],
)
def test_unreadable_metadata_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str | None, message: str
) -> None:
    """A broken config.json or bank meta.json, a Hugging Face model of another architecture, or a corrupt safetensors
    header gave a traceback (or an error naming no file, or a bert directory called 'OPT layout')."""
    from cm3leon_lightning.retrieval.index import INDEX_FILE, META_FILE

    path = tmp_path / name
    if content is None:  # a header whose tensor runs past the end of the file
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 100]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    elif name == "prompts.txt":  # ended in torch's "pop from empty list"
        path.write_text(content)
    elif name == "bank":
        path.mkdir()
        (path / META_FILE).write_text(content)
        (path / INDEX_FILE).write_bytes(b"")
    else:
        path.mkdir()
        (path / "config.json").write_text(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cm3leon info: error: " + message.format(path=path)) and err.count("\n") == 1


def test_vqgan_and_clip_training_checkpoints_are_told_apart(tmp_path: Path) -> None:
    """Both were described as a bare 'lightning checkpoint' with no architecture."""
    import lightning as L

    from cm3leon_lightning.data.images import ImageDataModule
    from cm3leon_lightning.modules.clip import ClipModule
    from cm3leon_lightning.modules.vqgan import VQGANModule

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(
        VQGANModule(preset="micro", num_logged_images=0), ImageDataModule(synthetic=4, image_size=16, batch_size=2)
    )
    trainer.save_checkpoint(tmp_path / "vqgan.ckpt")
    info = describe(tmp_path / "vqgan.ckpt")
    assert (info["kind"], info["preset"], info["grid"], info["global_step"]) == (
        "lightning checkpoint (VQGANModule)", "micro", "8x8", 1,
    )  # fmt: skip
    clip = ClipModule(model_name="cm3leon-clip-tiny")
    clip.configure_model()
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, tmp_path / "clip.ckpt")
    info = describe(tmp_path / "clip.ckpt")
    assert (info["kind"], info["clip_model"]) == ("lightning checkpoint (ClipModule)", "cm3leon-clip-tiny")


def _cut(path: Path, keep: int) -> None:
    """Keep the first ``keep`` bytes of ``path`` (a copy cut short)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _error(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.removeprefix("cm3leon info: error: ").strip()


def test_truncated_or_empty_files_are_named_as_such(assets: dict, tmp_path: Path, capsys) -> None:
    """A checkpoint cut short was "not a checkpoint ... (neither a torch zip file nor a pickle)", and model or sharded
    directories whose weights were cut short were described with exit status 0: only loading them failed."""
    root = assets["root"]
    shutil.copy(root / "trained.ckpt", tmp_path / "cut.ckpt")
    _cut(tmp_path / "cut.ckpt", 3000)
    cut = tmp_path / "cut.ckpt"
    assert _error(cut, capsys) == f"PATH: {cut} is a truncated or corrupt checkpoint (a zip file without its end)"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert _error(tmp_path / "empty.ckpt", capsys) == f"PATH: {tmp_path / 'empty.ckpt'} is empty (0 bytes)"
    for name in ("exported", "hf"):
        shutil.copytree(root / name, tmp_path / name)
        weights = tmp_path / name / "model.safetensors"
        _cut(weights, weights.stat().st_size - 1)
        assert _error(tmp_path / name, capsys) == (
            f"PATH: {weights} is not a readable safetensors file: Error while deserializing header: incomplete "
            "metadata, file not fully covered"
        )
    shutil.copytree(root / "sharded.ckpt", tmp_path / "sharded")
    shard = next((tmp_path / "sharded").glob("*.distcp"))
    size = shard.stat().st_size
    _cut(shard, size // 2)
    want = f"PATH: {shard} holds {size // 2} bytes; the shard index (.metadata) places {size} bytes in it"
    assert _error(tmp_path / "sharded", capsys) == want
    shard.unlink()
    assert _error(tmp_path / "sharded", capsys).startswith(f"PATH: {shard} is missing; the shard index")


def test_a_json_file_that_is_no_tokenizer_is_named(assets: dict, tmp_path: Path, capsys) -> None:
    """`cm3leon info models/350m/config.json` failed as a tokenizer: "not a valid tokenizers JSON file (expected `,`
    or `}` at line 2 column 11)" for a valid JSON file."""
    root = assets["root"]
    for name in ("exported", "hf", "vqgan"):
        config = root / name / "config.json"
        kind = "VQGAN directory" if name == "vqgan" else "model directory"
        assert (
            _error(config, capsys)
            == f"PATH: {config} is a file of the {kind} {root / name}: cm3leon info {root / name}"
        )
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert _error(tmp_path / "other.json", capsys) == (
        f"PATH: {tmp_path / 'other.json'} is a JSON file but not a text tokenizer (tokenizer.json) or manifest.json"
    )


def test_a_clip_safetensors_file_is_described_as_a_clip_model(assets: dict, tmp_path: Path, capsys) -> None:
    """A CLIP file of ClipModule.export_weights was only "safetensors": neither that it is a CLIP model nor its
    architecture, embedding dim (which a memory bank's dim must equal) or the preprocessing its metadata records."""
    from cm3leon_lightning.modules.clip import ClipModule

    clip = ClipModule(model_name="cm3leon-clip-tiny")
    clip.configure_model()
    path = clip.export_weights(tmp_path / "clip.safetensors")
    info = describe(path)
    tensors = {k: info[k] for k in ("tensors", "dtypes", "elements", "bytes")}
    assert info == {"kind": "CLIP model", "model_name": "cm3leon-clip-tiny", "vision": "ResNet", "embed_dim": 64,
                    "image_size": 32, "context_length": 16, "quick_gelu": False,
                    "preprocess": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                                   "resize_mode": "shortest", "fill_color": 0},
                    **tensors}  # fmt: skip
    assert (tensors["tensors"], tensors["dtypes"]) == (153, ["F32", "I64"])
    assert info["embed_dim"] == describe(assets["root"] / "bank")["dim"]
    # a bare open_clip state dict (no metadata): the architecture its shapes show, nothing invented
    bare = describe(assets["root"] / "clip.safetensors")
    assert {k: bare.get(k) for k in ("kind", "model_name", "embed_dim", "image_size", "quick_gelu")} == {
        "kind": "CLIP model", "model_name": None, "embed_dim": 64, "image_size": 32, "quick_gelu": None,
    }  # fmt: skip
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "kind:             CLIP model",
        "model_name:       cm3leon-clip-tiny",
        "vision:           ResNet",
    ]
    ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": clip.state_dict(), "hyper_parameters": dict(clip.hparams)}, ckpt)
    assert describe(ckpt) == {"kind": "lightning checkpoint (ClipModule)", "clip_model": "cm3leon-clip-tiny",
                              "vision": "ResNet", "embed_dim": 64, "image_size": 32, "context_length": 16,
                              "optimizer_state": False, "dtype": "float32", "bytes": ckpt.stat().st_size}  # fmt: skip


def test_a_file_of_a_directory_names_the_directory_and_a_shard_is_described(assets: dict, capsys) -> None:
    """A bank's meta.json was "a JSON file but not a text tokenizer", its keys.json "holds a JSON list", a sharded
    checkpoint's meta.pt "a state dict of 0 tensors", a model's README.md "not a checkpoint ... (neither a torch zip
    file nor a pickle)", and a dataset shard failed in torch.load with "mmap can only be used with files saved with
    `torch.save(_use_new_zipfile_serialization=True)"."""
    root = assets["root"]
    parts = [("bank", "meta.json", "memory bank"), ("bank", "keys.json", "memory bank"),
             ("bank", "index.faiss", "memory bank"), ("sharded.ckpt", "meta.pt", "sharded checkpoint"),
             ("sharded.ckpt", ".metadata", "sharded checkpoint"), ("exported", "README.md", "model directory"),
             ("exported", "config.json", "model directory"), ("hf", "config.json", "model directory"),
             ("vqgan", "config.json", "VQGAN directory")]  # fmt: skip
    for directory, name, kind in parts:
        d = root / directory
        assert _error(d / name, capsys) == f"PATH: {d / name} is a file of the {kind} {d}: cm3leon info {d}"
    shard = root / "shards" / "shard-000001.tar"
    assert describe(shard) == {"kind": "dataset shard", "samples": 5, "part_of": f"prepared dataset {root / 'shards'}",
                               "bytes": shard.stat().st_size}  # fmt: skip
    weights = describe(root / "exported" / "model.safetensors")
    assert (weights["kind"], weights["part_of"]) == ("safetensors", f"model directory {root / 'exported'}")


def test_sizes_read_in_bytes_kib_mib_and_gib_and_none_as_none(assets: dict, capsys) -> None:
    """Every file under a MiB read "size: 0.0 MiB" (a manifest, a tokenizer, a bank), and a field without a value
    "None"."""
    from cm3leon_lightning.info import _bytes

    assert [_bytes(n) for n in (0, 881, 1024, 3 * 2**19, 5 * 2**30)] == ["0 B", "881 B", "1.0 KiB", "1.5 MiB",
                                                                         "5.0 GiB"]  # fmt: skip
    manifest = assets["root"] / "shards" / "manifest.json"
    assert main([str(manifest)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"size:             {manifest.stat().st_size} B" and "clip:             none" in lines


def test_missing_weights_or_bank_files_are_reported_not_described(assets: dict, tmp_path: Path, capsys) -> None:
    """A model directory without its model.safetensors, a Hugging Face one missing a shard its index lists, a VQGAN
    directory whose weights are missing or cut short, and a bank without keys.json were described with exit status 0:
    only loading them failed."""
    root = assets["root"]
    for name in ("exported", "hf", "vqgan"):
        shutil.copytree(root / name, tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
    assert _error(tmp_path / "exported", capsys) == (
        f"PATH: {tmp_path / 'exported'} has config.json but no model.safetensors: a copy cut short?"
    )
    assert _error(tmp_path / "vqgan", capsys) == (
        f"PATH: {tmp_path / 'vqgan'} has config.json but no model.safetensors: a copy cut short?"
    )
    assert _error(tmp_path / "hf", capsys) == (
        f"PATH: {tmp_path / 'hf'} has config.json but no model.safetensors (nor model.safetensors.index.json): a copy "
        "cut short?"
    )
    shard = tmp_path / "hf" / "model-00001-of-00002.safetensors"
    shutil.copy(root / "hf" / "model.safetensors", shard)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard.name, "b": "model-00002-of-00002.safetensors"}}))
    assert _error(tmp_path / "hf", capsys) == (
        f"PATH: {index} names the shard 'model-00002-of-00002.safetensors', but "
        f"{tmp_path / 'hf' / 'model-00002-of-00002.safetensors'} does not exist"
    )
    shutil.copy(root / "vqgan" / "model.safetensors", tmp_path / "vqgan" / "model.safetensors")
    assert describe(tmp_path / "vqgan")["kind"] == "VQGAN"
    _cut(tmp_path / "vqgan" / "model.safetensors", 1000)
    assert _error(tmp_path / "vqgan", capsys).startswith(
        f"PATH: {tmp_path / 'vqgan' / 'model.safetensors'} is not a readable safetensors file"
    )
    shutil.copytree(root / "bank", tmp_path / "bank")
    (tmp_path / "bank" / "keys.json").unlink()
    assert (
        _error(tmp_path / "bank", capsys) == f"PATH: {tmp_path / 'bank'} is a memory bank without its keys.json (a "
        "copy cut short?)"
    )


def _prepare_output(assets: dict, out: Path) -> Path:
    """The layout ``cm3leon prepare --out out`` leaves (train/, stats/, summary.json and work/ with its plan,
    tokenizer, parts and bank), from the fixture's files."""
    root = assets["root"]
    shutil.copytree(root / "shards", out / "train")
    (out / "stats").mkdir()
    (out / "stats" / "part-000000.json").write_text('{"counts": {}}')
    (out / "summary.json").write_text('{"counts": {}}')
    work = out / "work"
    (work / "parts" / "main-000000").mkdir(parents=True)
    (work / "parts" / "main-000000" / "codes.npy").write_bytes(b"\x93NUMPY")
    (work / "parts" / "main-000000" / "done.json").write_text("{}")
    (work / "parts" / ".main-000001.tmp").mkdir()  # a part a killed run left unfinished
    (work / "parts" / ".main-000001.tmp" / "done.json").write_text("{}")
    shutil.copytree(root / "bank", work / "bank" / "index")
    (work / "bank" / "done.json").write_text("{}")
    shutil.copy(root / "tok" / "tokenizer.json", work / "tokenizer.json")
    source = {"kind": "shapes", "count": 12, "fingerprint": "ab" * 32}
    (work / "plan.json").write_text(json.dumps({"plan_version": 1, "source": source, "settings": {}}))
    return out


def test_the_prepare_work_directory_and_its_files_are_named(assets: dict, tmp_path: Path, capsys) -> None:
    """`cm3leon info data/prepared/work` said "text tokenizer" (its tokenizer.json) with the size of the whole
    directory; its files, summary.json and stats/ were "not a text tokenizer" or "not a checkpoint", naming no
    directory; an unfinished output (no train/manifest.json yet) was "a directory this package does not know"."""
    out = _prepare_output(assets, tmp_path / "out")
    work = out / "work"
    info = describe(work)
    assert info == {"kind": "prepare work directory", "source": {"kind": "shapes", "count": 12},
                    "tokenizer": str(work / "tokenizer.json"), "parts_encoded": 1,
                    "bank": str(work / "bank" / "index"), "bytes": info["bytes"]}  # fmt: skip
    whole = describe(out)
    assert (whole["kind"], whole["train_samples"], whole["bank"]) == ("prepare output", 12, str(work / "bank/index"))
    for file in (out / "summary.json", out / "stats" / "part-000000.json"):
        assert _error(file, capsys) == f"PATH: {file} is a file of the cm3leon prepare output {out}: cm3leon info {out}"
    assert _error(out / "stats", capsys) == (
        f"PATH: {out / 'stats'} is a directory of the cm3leon prepare output {out}: cm3leon info {out}"
    )
    for file in (work / "plan.json", work / "bank" / "done.json", work / "parts" / "main-000000" / "codes.npy"):
        assert _error(file, capsys) == (
            f"PATH: {file} is a file of the cm3leon prepare work directory {work}: cm3leon info {work}"
        )
    assert _error(work / "bank", capsys) == (
        f"PATH: {work / 'bank'} is a directory of the cm3leon prepare work directory {work}: cm3leon info {work}"
    )
    assert describe(work / "tokenizer.json")["kind"] == "text tokenizer"
    assert describe(work / "bank" / "index")["kind"] == "memory bank"
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    with pytest.raises(ValueError, match=rf"^{re.escape(str(work))} is a prepare work directory, not a VQGAN: give"):
        VQGAN.from_pretrained(work)  # (its tokenizer.json made it "a text tokenizer")
    shutil.rmtree(out / "train")
    info = describe(out)
    assert info == {"kind": "prepare output (unfinished: no train/manifest.json yet)", "parts_encoded": 1,
                    "bank": str(work / "bank" / "index"), "bytes": info["bytes"]}  # fmt: skip


def test_a_reader_that_leaves_early_ends_info_without_a_traceback(assets: dict) -> None:
    """`cm3leon info X | head -1`: the write to the closed pipe ended in a BrokenPipeError traceback; now the command
    stops quietly with 141 (128 + SIGPIPE), as a shell reports for other tools a pipe stopped."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader has left before the first line
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cm3leon_lightning", "info", str(assets["root"] / "exported")],
            stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr[-2000:]
