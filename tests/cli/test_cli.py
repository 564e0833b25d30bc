"""The ``cm3leon`` CLI: every YAML under configs/ parses, and ``cm3leon fit`` trains and checkpoints in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support.token_data import write_fit_config

from cm3leon_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_MODEL = ROOT / "configs" / "model" / "tiny.yaml"
SHARDS = ROOT / "configs" / "data" / "shards.yaml"


def test_configs_exist() -> None:
    assert TINY_MODEL in CONFIGS and len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cm3leon fit --config <yaml> --print_config` succeeds (fragments are composed with the tiny model)."""
    content = yaml.safe_load(path.read_text()) or {}
    args = ["fit"]
    if "class_path" not in (content.get("model") or {}):  # a fragment (no model, or only its init_args)
        args += ["--config", str(TINY_MODEL)]
    if "data" in content and "class_path" not in (content["data"] or {}):  # a fragment of a data config
        args += ["--config", str(SHARDS)]
    args += ["--config", str(path), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "model" in printed and "trainer" in printed
    for section in ("model", "data", "trainer"):
        if section in content and isinstance(content[section], dict) and "class_path" in content[section]:
            assert printed[section]["class_path"] == content[section]["class_path"]


def test_unknown_argument_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_MODEL), "--model.init_args.no_such_arg", "1", "--print_config"])
    assert exit_info.value.code != 0
    assert "no_such_arg" in capsys.readouterr().err


def test_cm3leon_fit_runs_and_writes_a_checkpoint(tmp_path: Path) -> None:
    cfg = write_fit_config(tmp_path, max_steps=4, n_train=16, limit_val_batches=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cm3leon_lightning", "fit", "--config", str(TINY_MODEL), "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    # The data module's vocabulary reached the model through link_arguments.
    assert ckpt["hyper_parameters"]["vocab"] == {
        "n_text": 64,
        "n_codes": 32,
        "grid_h": 2,
        "grid_w": 3,
        "num_sentinels": 8,
        "pad_to_multiple": 128,
    }
    assert ckpt["state_dict"]["model.wte.weight"].shape[0] == 128
    # validate in the same log directory (no logger) wrote its config over the fit's config.yaml, which the README
    # reuses for predict; it now writes validate_config.yaml
    fit_config = (tmp_path / "config.yaml").read_bytes()
    cmd = [sys.executable, "-m", "cm3leon_lightning", "validate", "--config", str(TINY_MODEL), "--config", str(cfg),
           "--ckpt_path", str(last)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "config.yaml").read_bytes() == fit_config
    assert "ckpt_path" in (tmp_path / "validate_config.yaml").read_text()


def test_help_shows_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "cm3leon_lightning.modules.CM3LeonModule"])
    out = capsys.readouterr().out
    assert "paper table 3: 1500" in out and "--model.config" in out


def test_top_level_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`cm3leon --help` lists the Lightning subcommands and names the package's own commands, which it dispatches
    before LightningCLI parses anything."""
    from cm3leon_lightning.cli import EXTRA_COMMANDS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrap
    assert "{fit,validate,test,predict}" in out
    for name in EXTRA_COMMANDS:
        assert f"'cm3leon {name}'" in out, name


def test_a_mistyped_command_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`cm3leon exprot` got LightningCLI's "choose from 'fit', 'validate', 'test', 'predict'", as if `export` and the
    package's other commands did not exist."""
    from cm3leon_lightning.cli import EXTRA_COMMANDS

    assert main(["exprot", "--ckpt", "x"]) == 2
    err = capsys.readouterr().err
    choices = ", ".join(["fit", "validate", "test", "predict", *EXTRA_COMMANDS])
    assert err == f"cm3leon: error: unknown command 'exprot' (choose from {choices}; cm3leon --help)\n"


@pytest.mark.parametrize(
    "size, n_layer, d_model, lr", [("350m", 24, 1024, 6e-4), ("760m", 24, 1536, 5e-4), ("7b", 32, 4096, 1.2e-4)]
)
def test_model_configs_hold_the_papers_table_3(size: str, n_layer: int, d_model: int, lr: float) -> None:
    """configs/model/<size>.yaml, as its comment and the README's table say: paper table 3's layers, width, 4096-token
    context, peak LR and 1500 warm-up steps; configs/data/shards.yaml's 8 rows of 4096 tokens on table 3's 256 GPUs
    make its 8M-token batch."""
    from cm3leon_lightning.config import CM3LeonConfig

    args = yaml.safe_load((ROOT / "configs" / "model" / f"{size}.yaml").read_text())["model"]["init_args"]
    config = CM3LeonConfig.from_preset(args["preset"])
    assert (config.n_layer, config.d_model, config.max_seq_len) == (n_layer, d_model, 4096)
    assert (args["preset"], args["lr"], args["warmup_steps"]) == (size, lr, 1500)
    data = yaml.safe_load(SHARDS.read_text())["data"]["init_args"]
    assert data["seq_len"] == 4096 and data["seq_len"] * data["batch_size"] * 256 == 8 * 2**20


def test_sft_config_overrides_only_the_schedule_of_the_model_before_it(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/experiments/sft.yaml is a fragment: the paper's SFT schedule over whichever preset came first, and
    half the documents image first over whichever data config came first."""
    sft = ROOT / "configs" / "experiments" / "sft.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY_MODEL), "--config", str(SHARDS), "--config", str(sft), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    assert model["class_path"] == "cm3leon_lightning.modules.cm3leon.CM3LeonModule"
    assert model["init_args"]["preset"] == "tiny"
    assert (model["init_args"]["lr"], model["init_args"]["warmup_steps"]) == (5e-5, 150)
    assert printed["trainer"]["max_steps"] == 15000
    data = printed["data"]["init_args"]
    assert data["image_first_prob"] == 0.5 and data["seq_len"] == 4096  # the rest stays the data config's


def test_fsdp_config_composes_after_the_gpu_config(capsys: pytest.CaptureFixture[str]) -> None:
    """fsdp_bf16.yaml swaps the strategy and keeps gpu_bf16.yaml's callbacks (checkpoints, LR, MFU), as the README
    composes them for the 7B preset."""
    trainer_dir = ROOT / "configs" / "trainer"
    args = ["fit", "--config", str(TINY_MODEL), "--config", str(trainer_dir / "gpu_bf16.yaml")]
    with pytest.raises(SystemExit):
        main([*args, "--config", str(trainer_dir / "fsdp_bf16.yaml"), "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert trainer["strategy"]["init_args"]["state_dict_type"] == "sharded"
    assert [c["class_path"].rsplit(".", 1)[1] for c in trainer["callbacks"]] == [
        "LastStepCheckpoint", "LearningRateMonitor", "ThroughputMonitor",
    ]  # fmt: skip


def test_every_config_path_the_docs_name_exists() -> None:
    """The README, docs and docstrings name configs users copy into commands; cli.py's docstring named
    ``configs/experiments/tiny_synthetic.yaml``, which does not exist."""
    import re

    texts = [ROOT / "README.md", ROOT / "docs" / "architecture.md", *CONFIGS]
    texts += sorted((ROOT / "cm3leon_lightning").rglob("*.py"))
    named = {m for t in texts for m in re.findall(r"configs/[a-z0-9_]+/[A-Za-z0-9_.-]+\.yaml", t.read_text())}
    assert len(named) >= 15
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from support.eval_setup import write_eval_data

    return write_eval_data(tmp_path_factory.mktemp("shards"), n_train=8, n_val=4)


def _matches(want: object, got: object) -> bool:
    """``got`` holds ``want``: equal, or a dict holding every key of ``want`` with a matching value."""
    if isinstance(want, dict) and isinstance(got, dict):
        return all(k in got and _matches(v, got[k]) for k, v in want.items())
    if isinstance(want, list) and isinstance(got, (list, tuple)):
        return list(want) == list(got)
    if isinstance(want, str) and isinstance(got, str) and "/" in want and Path(got).is_absolute():
        return str(Path(want).absolute()) == got  # a relative path the object resolved (ModelCheckpoint.dirpath)
    return want == got


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_instantiates_with_the_values_it_sets(path: Path, tiny_shards: dict) -> None:
    """Each config builds its model, data module and callbacks on the CPU (tiny data in place of the real paths), and
    every ``init_args`` value it sets reaches the object: ``--print_config`` alone checks the names, not the values the
    constructors validate, nor that an argument is used."""
    from cm3leon_lightning.cli import CM3LeonCLI

    content = yaml.safe_load(path.read_text()) or {}
    args = []
    if "class_path" not in (content.get("model") or {}):
        args += ["--config", str(TINY_MODEL)]
    if "data" in content and "class_path" not in (content["data"] or {}):
        args += ["--config", str(SHARDS)]
    args += ["--config", str(path)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
    args += ["--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.default_root_dir", "unused"]
    data_class = (content.get("data") or {}).get("class_path", "")
    overrides: dict[str, dict[str, object]] = {"model": {}, "data": {}}
    if data_class.endswith("CM3LeonDataModule") or ("data" in content and not data_class):
        overrides["data"] = {"train_data": tiny_shards["train"], "val_data": tiny_shards["val"]}
    elif data_class.endswith("ImageDataModule") and not content["data"]["init_args"].get("synthetic"):
        overrides["data"] = {"synthetic": 8}
    if (content.get("model") or {}).get("init_args", {}).get("perceptual_weight"):
        overrides["model"] = {"perceptual_weight": 0.0}  # its lpips_weights is a local file the user gives
    for section, values in overrides.items():
        args += [a for k, v in values.items() for a in (f"--{section}.init_args.{k}", str(v))]
    cli = CM3LeonCLI(args=args, run=False)
    for section, obj in (("model", cli.model), ("data", cli.datamodule)):
        spec = content.get(section) or {}
        if "class_path" in spec:
            assert f"{type(obj).__module__}.{type(obj).__name__}" == spec["class_path"]
        for key, want in (spec.get("init_args") or {}).items():
            if key in overrides[section]:
                continue
            got = obj.hparams[key] if key in obj.hparams else getattr(obj, key)
            assert _matches(want, got), f"{section}.init_args.{key}: {want!r} set, {got!r} reached the object"
    trainer = content.get("trainer") or {}
    for spec in trainer.get("callbacks") or trainer.get("callbacks+") or []:
        name = spec["class_path"].rsplit(".", 1)[1]  # Lightning moves ModelCheckpoint last and re-exports classes
        matching = [c for c in cli.trainer.callbacks if type(c).__name__ == name]
        assert len(matching) == 1, f"{name}: {len(matching)} built"
        for key, want in (spec.get("init_args") or {}).items():
            got = getattr(matching[0], key, getattr(matching[0], f"_{key}", want))  # unchecked where not stored
            if not callable(got):
                assert _matches(want, got), f"{name}.{key}: {want!r} set, {got!r} reached the callback"
    if "max_steps" in trainer:
        assert cli.trainer.max_steps == trainer["max_steps"]


def test_no_command_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """A bare `cm3leon` got LightningCLI's "expected subcommand to be one of {fit,validate,test,predict}"."""
    from cm3leon_lightning.cli import EXTRA_COMMANDS

    assert main([]) == 2
    choices = ", ".join(["fit", "validate", "test", "predict", *EXTRA_COMMANDS])
    assert capsys.readouterr().err == f"cm3leon: error: no command given (choose from {choices}; cm3leon --help)\n"


def test_a_directory_as_ckpt_path_is_refused_naming_the_checkpoints_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cm3leon fit --ckpt_path runs/x/checkpoints` built everything, then failed in Lightning's loader with
    IsADirectoryError; it is refused at once, naming the newest .ckpt files below it."""
    import os

    cfg = write_fit_config(tmp_path, max_steps=1, n_train=4)
    ckpts = tmp_path / "runs" / "checkpoints"
    ckpts.mkdir(parents=True)
    for age, name in enumerate(["last.ckpt", "step=2.ckpt", "step=1.ckpt", "step=0.ckpt"]):
        (ckpts / name).write_bytes(b"")
        os.utime(ckpts / name, (1_000_000 - age, 1_000_000 - age))
    for given, hint in (
        (tmp_path / "runs", f" from it: {ckpts / 'last.ckpt'}, {ckpts / 'step=2.ckpt'}, {ckpts / 'step=1.ckpt'}, ..."),
        (tmp_path / "data", " (it holds none)"),
    ):
        given.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(TINY_MODEL), "--config", str(cfg), "--ckpt_path", str(given)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: --ckpt_path: {given} is a directory, not a checkpoint; give a .ckpt file{hint}"
        )


@pytest.mark.parametrize("subcommand", ["validate", "predict"])
def test_a_model_directory_as_ckpt_path_is_refused_naming_init_from(
    subcommand: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cm3leon validate --ckpt_path models/350m` (a `cm3leon export` directory) ended in Lightning's checkpoint
    loader with a traceback (IsADirectoryError) after building everything; it holds no trainer state."""
    from support.checkpoint_setup import write_checkpoint_assets

    from cm3leon_lightning.export import export_model

    write_checkpoint_assets(tmp_path)
    export_model(tmp_path / "model.ckpt", tmp_path / "m")
    cfg = write_fit_config(tmp_path, max_steps=1, n_train=4)
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(TINY_MODEL), "--config", str(cfg), "--ckpt_path", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    m = tmp_path / "m"
    assert err == (
        f"error: --ckpt_path: {m} is a model directory of 'cm3leon export' (no trainer state); give it as "
        f"--model.init_args.init_from {m} instead"
    )


def test_bad_input_to_a_lightning_subcommand_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing training dataset printed an 82-line chained traceback ending in jsonargparse's "Does not validate
    against any of the Union subtypes" and a missing --ckpt_path a traceback, both with status 1, where the README
    promises one line naming the argument and status 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CM3LEON_TRACEBACK", raising=False)
    args = ["fit", "--config", str(TINY_MODEL), "--config", str(SHARDS), "--trainer.accelerator", "cpu"]
    assert main([*args, "--data.init_args.train_data", "nope/train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "cm3leon fit: error: ValueError: train_data: nope/train: no such directory or file (give a prepared dataset "
        "directory, its manifest.json, or shard .tar paths) (CM3LEON_TRACEBACK=1 shows where)"
    )
    assert not any("Union subtypes" in line or "Traceback" in line for line in err)
    cfg = write_fit_config(tmp_path, max_steps=1, n_train=8)
    assert main(["fit", "--config", str(TINY_MODEL), "--config", str(cfg), "--ckpt_path", "nope.ckpt"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cm3leon fit: error: FileNotFoundError: ") and "nope.ckpt" in last
    monkeypatch.setenv("CM3LEON_TRACEBACK", "1")  # the traceback when asked for
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        main(["fit", "--config", str(TINY_MODEL), "--config", str(cfg), "--ckpt_path", "nope.ckpt"])


PLACEHOLDERS = {
    "<data>.yaml": "configs/data/shards.yaml",
    "<experiment>.yaml": "configs/experiments/demo_shapes.yaml",
    "--config ...": "--config configs/model/7b.yaml --config configs/data/shards.yaml",
}
"""What the configs' header comments leave to the reader, filled in so their commands can be parsed."""


def header_commands(path: Path) -> list[str]:
    """The ``cm3leon fit|validate|test|predict --...`` commands of a config's header comment, continuation lines
    joined and placeholders filled."""
    import re

    header = "".join(line[1:] for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    header = re.sub(r"\\\n\s*", "", header)
    commands = re.findall(r"cm3leon (?:fit|validate|test|predict) --[^\n`)]*", header)
    for placeholder, value in PLACEHOLDERS.items():
        commands = [c.replace(placeholder, value) for c in commands]
    return [" ".join(c.split()) for c in commands]


def test_every_command_of_the_config_headers_parses(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """The commands the configs' comments give to copy parse with ``--print_config``; the 7b preset's trains sharded
    (FSDP): its comment composed it with gpu_bf16.yaml alone, DDP's full copy per GPU (about 112 GB with AdamW's
    states), which the README's command does not."""
    monkeypatch.chdir(ROOT)
    commands = {path: header_commands(path) for path in CONFIGS}
    assert sum(len(c) for c in commands.values()) >= 15
    for path, lines in commands.items():
        for command in lines:
            with pytest.raises(SystemExit) as exit_info:
                main([*command.split()[1:], "--print_config"])
            assert exit_info.value.code in (0, None), command
            printed = yaml.safe_load(capsys.readouterr().out)
            assert ROOT / command.split()[3] in CONFIGS, command  # the first --config names a file of configs/
            if printed["model"]["init_args"].get("preset") == "7b" and command.startswith("cm3leon fit"):
                strategy = printed["trainer"]["strategy"]  # "auto" (DDP on several GPUs) or a class_path
                strategy = strategy if isinstance(strategy, str) else strategy["class_path"]
                assert strategy == "lightning.pytorch.strategies.FSDPStrategy", f"{path}: {command}"


def test_a_config_file_that_is_not_yaml_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jsonargparse's message for a YAML syntax error names no file (`in "<unicode string>", line 3`), so with a
    trainer, a model and a data config composed the user could not tell which to fix."""
    broken = tmp_path / "data.yaml"
    broken.write_text("data:\n  class_path: x\n bad: [\n")
    for flag in (["--config", str(broken)], [f"--config={broken}"], ["-c", str(broken)]):
        assert main(["fit", "--config", str(TINY_MODEL), *flag]) == 2
        assert capsys.readouterr().err == (
            f'cm3leon fit: error: --config {broken}: while parsing a block mapping in "{broken}", line 1, column 1 '
            f"expected <block end>, but found '<block mapping start>' in \"{broken}\", line 3, column 2\n"
        )
