"""``cm3leon export``: a training checkpoint (one file or FSDP's sharded directory) -> a model directory that
``cm3leon generate`` / ``serve`` and ``init_from`` read to the same logits and samples, written without losing an
existing one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_model
from support.checkpoint_setup import save_sharded, write_checkpoint_assets
from support.token_data import TokenDataModule, cpu_trainer, write_fit_config

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.export import export_model, main
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.cli import main as generate_main
from cm3leon_lightning.generation.predict import load_vocab
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tok/``, ``vqgan/`` and a random tiny ``model.ckpt`` for both; ``exported/`` from them in float32."""
    root = write_checkpoint_assets(tmp_path_factory.mktemp("export"))
    args = ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan")]
    assert cm3leon_main(["export", *args, "--out", str(root / "exported")]) == 0  # through the console entry point
    return root


def ids(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 300, (n, 12), generator=torch.Generator().manual_seed(0))


def test_the_directory_gives_the_checkpoints_logits_and_tokenizers(assets: Path) -> None:
    out = assets / "exported"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
        "vqgan",
    ]
    model, vocab = load_checkpoint(out)
    reference, ref_vocab = load_checkpoint(assets / "model.ckpt")
    assert vocab == ref_vocab
    with torch.no_grad():
        assert torch.equal(model(ids()), reference(ids()))
    assert model.lm_head.weight is model.wte.weight
    assert TextTokenizer.load(out / "tokenizer").sha256 == TextTokenizer.load(assets / "tok").sha256
    got, want = VQGAN.from_pretrained(out / "vqgan").state_dict(), VQGAN.from_pretrained(assets / "vqgan").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    doc = json.loads((out / "config.json").read_text())
    assert doc["source"] == {"checkpoint": str(assets / "model.ckpt"), "kind": "lightning checkpoint"}
    assert load_vocab(out) == vocab  # cm3leon predict's --data.vocab_from


def test_the_model_card_describes_the_export(assets: Path, tmp_path: Path) -> None:
    import yaml

    from cm3leon_lightning.export import model_card

    card = (assets / "exported" / "README.md").read_text()
    front, body = card.split("---\n")[1:3]
    assert yaml.safe_load(front) == {"library_name": "cm3leon_lightning", "tags": ["cm3leon", "text-to-image",
                                                                                    "image-to-text"]}  # fmt: skip
    assert "# exported" in body and "0.1M (n_layer 2, d_model 64" in body and "text tokenizer and VQGAN" in body
    assert "300 text ids, then 32 image codes, 8x8 per image" in body and "cm3leon serve --ckpt exported" in body
    summary = {"path": "m", "format": "hf", "parameters": 7e9, "dtype": "bfloat16", "tokenizer": False, "vqgan": False}
    config = {"n_layer": 32, "d_model": 4096, "n_head": 32, "d_ff": 16384, "max_seq_len": 4096, "activation": "gelu"}
    vocab = {"n_text": 56320, "n_codes": 8192, "grid_h": 32, "grid_w": 32}
    hf = model_card(summary, config, vocab, {"kind": "sharded checkpoint", "global_step": 500})
    assert "library_name: transformers" in hf and "OPTForCausalLM.from_pretrained" in hf
    assert "7000.0M" in hf and "sharded checkpoint, step 500" in hf and "none (pass --tokenizer and --vqgan)" in hf


def test_generate_from_the_directory_needs_no_tokenizer_flags(assets: Path, tmp_path: Path) -> None:
    common = ["--prompt", "a red circle", "--num-samples", "2", "--seed", "3", "--no-compile"]
    full = ["--ckpt", str(assets / "model.ckpt"), "--tokenizer", str(assets / "tok"), "--vqgan", str(assets / "vqgan")]
    assert generate_main([*full, *common, "--out", str(tmp_path / "a")]) == 0
    assert generate_main(["--ckpt", str(assets / "exported"), *common, "--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.load(tmp_path / "a" / "codes.npy"), np.load(tmp_path / "b" / "codes.npy"))
    assert (tmp_path / "b" / "sample-1.png").is_file()  # the bundled VQGAN decoded them


def test_bfloat16_halves_the_weights_and_a_reexport_keeps_the_tokenizers(assets: Path, tmp_path: Path, capsys) -> None:
    half = tmp_path / "bf16"
    assert main(["--ckpt", str(assets / "model.ckpt"), "--out", str(half), "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {half}: 0.1M parameters in bfloat16 from a lightning checkpoint" in printed
    assert "with" not in printed.splitlines()[0]  # no tokenizer given, none bundled
    stored = load_file(str(half / "model.safetensors"))
    reference, _ = load_checkpoint(assets / "model.ckpt")
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert torch.equal(stored["wte.weight"], reference.wte.weight.detach().to(torch.bfloat16))
    size = (half / "model.safetensors").stat().st_size
    assert size < 0.55 * (assets / "exported" / "model.safetensors").stat().st_size
    model, _ = load_checkpoint(half)
    assert model.wte.weight.dtype == torch.bfloat16  # dtype=None: as stored
    # from a model directory to another dtype: its tokenizers come along
    again = tmp_path / "fp32"
    assert main(["--ckpt", str(assets / "exported"), "--out", str(again), "--dtype", "float16"]) == 0
    assert (again / "tokenizer" / "tokenizer.json").is_file() and (again / "vqgan" / "config.json").is_file()
    assert "with tokenizer and vqgan" in capsys.readouterr().out


def test_init_from_a_model_directory(assets: Path) -> None:
    reference, vocab = load_checkpoint(assets / "model.ckpt")
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=128, init_from=str(assets / "exported"))
    module.configure_model()
    with torch.no_grad():
        assert torch.equal(module(ids()), reference(ids()))


def test_cm3leon_validate_evaluates_an_exported_directory_as_its_checkpoint(tmp_path: Path) -> None:
    """The README's evaluation of a model directory: ``--model.init_args.init_from DIR`` in place of ``--ckpt_path``."""
    from cm3leon_lightning.cli import CM3LeonCLI

    tiny = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
    base = [
        "--config",
        str(tiny),
        "--config",
        str(write_fit_config(tmp_path, max_steps=2, n_train=8, limit_val_batches=1)),
    ]
    CM3LeonCLI(args=["fit", *base])
    last = tmp_path / "ckpt" / "last.ckpt"
    export_model(last, tmp_path / "m", dtype=torch.float32)
    exported = CM3LeonCLI(args=["validate", *base, "--model.init_args.init_from", str(tmp_path / "m")])
    restored = CM3LeonCLI(args=["validate", *base, "--ckpt_path", str(last)])
    loss = exported.trainer.callback_metrics["val/loss"]
    assert torch.isfinite(loss) and torch.equal(loss, restored.trainer.callback_metrics["val/loss"])


def test_a_sharded_checkpoint_exports_with_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cm3leon_lightning.model import weights

    L.seed_everything(0)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=1)
    trainer = cpu_trainer(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=TokenDataModule(n_train=8, batch_size=4))
    sharded = save_sharded(trainer, tmp_path / "sharded.ckpt")
    budget = max(p.numel() * p.element_size() for p in module.parameters())
    monkeypatch.setattr(weights, "CHUNK_BYTES", budget)
    reads: list[dict[str, torch.Tensor]] = []
    load_shards = weights._load_shards
    monkeypatch.setattr(weights, "_load_shards", lambda p, what, t: reads.append(t) or load_shards(p, what, t))
    summary = export_model(sharded, tmp_path / "m")
    # The shards are read a chunk at a time, model tensors only, each once: never the whole model at once.
    assert len(reads) > 2 and all(sum(t.numel() * t.element_size() for t in r.values()) <= budget for r in reads)
    keys = [k for r in reads for k in r]
    assert len(keys) == len(set(keys)) and all(k.startswith("model.") for k in keys)
    assert summary["kind"] == "sharded checkpoint" and summary["dtype"] == "float32"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["source"]["global_step"] == 2
    assert load_vocab(sharded).to_dict() == module.hparams.vocab  # meta.pt only: no tensor read
    model, _ = load_checkpoint(tmp_path / "m")
    data_ids = TokenDataModule(n_train=2).train_rows
    with torch.no_grad():
        assert torch.equal(model(data_ids), module(data_ids))
    with pytest.raises(ValueError, match="--out: .* is or lies inside --ckpt"):
        export_model(sharded, sharded / "inside")


def test_an_existing_directory_is_kept_unless_forced_and_survives_a_failed_export(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"--out: {out} exists and is not empty \\(--force replaces it\\)"):
        export_model(assets / "model.ckpt", out)
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "other_tok"
    TextTokenizer.train(["a red square", "a blue circle"] * 10, vocab_size=280).save(other)
    with pytest.raises(ValueError, match="vocabulary mismatch: the checkpoint has n_text=300.*vocab_size=280"):
        export_model(assets / "model.ckpt", out, tokenizer=other, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    export_model(assets / "model.ckpt", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other_tok"]  # no partial or old copies left


def test_force_never_replaces_a_directory_holding_the_inputs(assets: Path, tmp_path: Path) -> None:
    """`--out run --force` with `--ckpt run/model.ckpt` deleted the checkpoint it exported from (and the tokenizers)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(assets, run)
    before = sorted(p.name for p in run.iterdir())
    for kwargs, flag in (
        ({}, "--ckpt"),
        ({"tokenizer": run / "tok"}, "--tokenizer"),
        ({"vqgan": run / "vqgan"}, "--vqgan"),
    ):
        ckpt = run / "model.ckpt" if flag == "--ckpt" else assets / "model.ckpt"
        with pytest.raises(ValueError, match=f"--out: {run} holds {flag} .*replacing it would delete the input"):
            export_model(ckpt, run, force=True, **kwargs)
    assert sorted(p.name for p in run.iterdir()) == before


def test_force_replaces_a_link_not_what_it_points_to(assets: Path, tmp_path: Path, capsys) -> None:
    """`--out link --force` ended in a traceback (rmtree refuses a symbolic link) after the export was in place, and
    left `.link.old-<pid>` behind."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    assert main(["--ckpt", str(assets / "model.ckpt"), "--out", str(tmp_path / "link"), "--force"]) == 0
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link" / "model.safetensors").is_file()
    assert (target / "notes.txt").read_text() == "mine"  # what the link pointed to is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "--ckpt: '{root}/nope.ckpt' does not exist"),
        ("bare", "--ckpt: {root}/bare.safetensors (safetensors) lacks the architecture and vocabulary"),
        ("vqgan", "--vqgan: not found: {root}/nope"),
        ("file_out", "--out: {root}/file exists and is not a directory"),
        # --vqgan-config alone was silently ignored: the export succeeded without the VQGAN the user meant
        ("config_alone", "--vqgan-config {root}/vq.yaml is the architecture of a --vqgan checkpoint: give --vqgan"),
        ("config_missing", "--vqgan-config: not found: {root}/vq.yaml"),
        # the loaders' own messages named the file but not the argument it came from
        ("bad_tokenizer", "--tokenizer: {root}/tok.json: not a valid tokenizers JSON file"),
        ("bad_vqgan", "--vqgan: {root}/vq: no model.safetensors, vqgan.ckpt or checkpoints/last.ckpt"),
        # `--out .` in an empty directory failed with a traceback renaming the working directory
        ("cwd_out", "--out: . is the current directory or holds it; name the model directory to create"),
        # a traceback (NotADirectoryError on the partial directory beside --out), exit status 1
        ("out_under_file", "--out: {root}/file exists and is not a directory, so {root}/file/m cannot be created"),
        # TextTokenizer's FileNotFoundError passed through without the argument's name
        ("tokenizer_dir", "--tokenizer: text tokenizer file not found: {root}/tok/tokenizer.json"),
        # a checkpoint with an architecture field this version does not know: the message named neither flag nor file
        ("unknown_field", "--ckpt: {root}/new.ckpt has an unusable architecture ('config'): unknown CM3LeonConfig"),
        # weights in two dtypes: "the weights must share one dtype of [...]", naming neither the file nor --dtype
        ("mixed", "--ckpt: {root}/new.ckpt holds weights in bfloat16, float32; give --dtype (float32, bfloat16, "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    assets: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, setup: str, message: str
) -> None:
    argv = ["--ckpt", str(assets / "model.ckpt"), "--out", str(tmp_path / "m")]
    if setup == "missing":
        argv[1] = str(tmp_path / "nope.ckpt")
    elif setup == "bare":
        save_model(load_checkpoint(assets / "model.ckpt")[0], str(tmp_path / "bare.safetensors"))
        argv[1] = str(tmp_path / "bare.safetensors")
    elif setup == "vqgan":
        argv += ["--vqgan", str(tmp_path / "nope")]
    elif setup == "config_alone":
        (tmp_path / "vq.yaml").write_text("model: {}\n")
        argv += ["--vqgan-config", str(tmp_path / "vq.yaml")]
    elif setup == "config_missing":
        argv += ["--vqgan", str(assets / "vqgan"), "--vqgan-config", str(tmp_path / "vq.yaml")]
    elif setup == "bad_tokenizer":
        (tmp_path / "tok.json").write_text('{"a": 1}')
        argv += ["--tokenizer", str(tmp_path / "tok.json")]
    elif setup == "bad_vqgan":
        (tmp_path / "vq").mkdir()
        argv += ["--vqgan", str(tmp_path / "vq")]
    elif setup == "out_under_file":
        (tmp_path / "file").write_text("x")
        argv[3] = str(tmp_path / "file" / "m")
    elif setup == "tokenizer_dir":
        (tmp_path / "tok").mkdir()
        argv += ["--tokenizer", str(tmp_path / "tok")]
    elif setup == "unknown_field":
        ckpt = torch.load(assets / "model.ckpt", weights_only=True)
        ckpt["hyper_parameters"]["config"]["bogus"] = 1
        torch.save(ckpt, tmp_path / "new.ckpt")
        argv[1] = str(tmp_path / "new.ckpt")
    elif setup == "mixed":
        ckpt = torch.load(assets / "model.ckpt", weights_only=True)
        ckpt["state_dict"]["model.wpe.weight"] = ckpt["state_dict"]["model.wpe.weight"].to(torch.bfloat16)
        torch.save(ckpt, tmp_path / "new.ckpt")
        argv[1] = str(tmp_path / "new.ckpt")
    elif setup == "cwd_out":
        (tmp_path / "m").mkdir()
        monkeypatch.chdir(tmp_path / "m")
        argv[3] = "."
    else:
        (tmp_path / "file").write_text("x")
        argv[3] = str(tmp_path / "file")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cm3leon export: error: ") and message.format(root=tmp_path) in err and "\n" not in err
    if setup == "cwd_out":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and not any((tmp_path / "m").iterdir())
    else:
        assert not (tmp_path / "m").exists()


def test_the_source_checkpoint_is_recorded_as_given_not_made_absolute(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """config.json recorded the checkpoint's absolute path: a model shared from /home/alice/... named her directories,
    and the path meant nothing on another machine. examples/serve_shapes.py compares it with the absolute path it
    exports from, which it still equals."""
    monkeypatch.chdir(assets)
    assert main(["--ckpt", "model.ckpt", "--out", str(tmp_path / "m"), "--format", "hf"]) == 0
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["cm3leon"]["source"] == {"checkpoint": "model.ckpt", "kind": "lightning checkpoint"}
    export_model(assets / "model.ckpt", tmp_path / "abs")
    source = json.loads((tmp_path / "abs" / "config.json").read_text())["source"]["checkpoint"]
    assert source == str(assets / "model.ckpt")  # what serve_shapes.prepare_out compares with
    # re-exported, the model directory is the source recorded, its own provenance kept beside it (it replaced it)
    assert main(["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["source"] == {
        "checkpoint": str(tmp_path / "m"), "kind": "hugging face directory",
        "exported_from": {"checkpoint": "model.ckpt", "kind": "lightning checkpoint"},
    }  # fmt: skip
    assert cm3leon_main(["info", str(tmp_path / "m")]) == 0
    assert "source:           checkpoint model.ckpt, kind lightning checkpoint" in capsys.readouterr().out.splitlines()
    ckpt = re.escape(str(assets / "model.ckpt"))
    with pytest.raises(ValueError, match=rf"^--vqgan: {ckpt} is a CM3Leon model checkpoint, not a VQGAN: it is what"):
        export_model(assets / "model.ckpt", tmp_path / "v", vqgan=assets / "model.ckpt")


def test_a_vqgan_or_clip_checkpoint_given_as_ckpt_is_named(tmp_path: Path) -> None:
    """A VQGANModule or ClipModule checkpoint given to export / generate was only said to lack CM3Leon's
    architecture; the message now says what it is and which flag takes it."""
    import warnings

    from cm3leon_lightning.retrieval.encoder import create_clip

    vqgan = VQGAN.from_name("micro")
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in vqgan.state_dict().items()},
                "hyper_parameters": {"preset": "micro"}}, tmp_path / "vqgan.ckpt")  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        clip = create_clip("cm3leon-clip-tiny", None)
    torch.save({"state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()},
                "hyper_parameters": {"model_name": "cm3leon-clip-tiny"}}, tmp_path / "clip.ckpt")  # fmt: skip
    lacks = "(lightning checkpoint) lacks the architecture and vocabulary ('config' and 'vocab'): it is a"
    clip_hint = (
        "CLIP (the retriever); ClipModule.export_weights (or its export_path) writes the .safetensors that "
        "--clip-pretrained and cm3leon prepare --clip-weights take"
    )
    for name, what in (("vqgan", "VQGAN (the image tokenizer), which --vqgan takes"), ("clip", clip_hint)):
        ckpt = tmp_path / f"{name}.ckpt"
        with pytest.raises(ValueError) as err:
            export_model(ckpt, tmp_path / f"{name}-out")
        assert (
            str(err.value)
            == f"--ckpt: {ckpt} {lacks} {what}; export reads CM3LeonModule checkpoints and model directories"
        )
        with pytest.raises(ValueError) as err:
            load_checkpoint(ckpt)
        assert str(err.value) == (
            f"--ckpt: {ckpt} {lacks} {what}; give a CM3LeonModule checkpoint or a model directory of 'cm3leon export'"
        )
        assert not (tmp_path / f"{name}-out").exists()
