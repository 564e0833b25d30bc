"""The README's command lines parse with the commands they name, and the defaults it quotes are the parsers'."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands(name: str) -> list[str]:
    """Every ``cm3leon <name> ...`` line of the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith(f"cm3leon {name} ")]


def parser_of(name: str):
    """The argparse parser of one of the package's own commands."""
    from cm3leon_lightning.data.prepare_cli import build_parser as prepare
    from cm3leon_lightning.demo_cli import build_parser as demo
    from cm3leon_lightning.export import build_parser as export
    from cm3leon_lightning.generation.cli import build_parser as generate
    from cm3leon_lightning.serve.cli import build_parser as serve

    return {"generate": generate, "prepare": prepare, "serve": serve, "export": export, "demo": demo}[name]()


@pytest.mark.parametrize("name", ["generate", "prepare", "serve", "export"])
def test_readme_command_lines_parse(name: str) -> None:
    """Every flag of a README line is spelt as the command defines it (argparse would also take an abbreviation),
    and a line that elides nothing (``...``) parses."""
    lines = readme_commands(name)
    assert lines, name
    parser = parser_of(name)
    flags = {s for action in parser._actions for s in action.option_strings}
    for line in lines:
        argv = shlex.split(line)[2:]
        assert sorted({a.split("=")[0] for a in argv if a.startswith("--")} - flags) == [], line
        if "..." not in argv:
            parser.parse_args(argv)  # exits (status 2) on a bad choice or value, or a missing argument


def test_readme_serve_defaults_are_the_servers() -> None:
    """ "Fields left out take the server's defaults (...)", ``--max-rows`` (default 128), ``--max-payload-mb`` (32 by
    default) and ``--k`` (default 2, with ``--retrieve``): the values of ``cm3leon serve``'s parser."""
    from cm3leon_lightning.serve.cli import build_parser

    quoted = re.search(r"Fields left out take the server's defaults \((.*?); flags of", README, flags=re.S).group(1)
    pairs = dict(re.findall(r"`--([a-z-]+)` ([^,`]+)", " ".join(quoted.split())))
    assert len(pairs) == 9, pairs
    defaults = build_parser().parse_args(["--ckpt", "x"])
    for flag, value in pairs.items():
        got = getattr(defaults, flag.replace("-", "_"))
        assert str(got) == value or (isinstance(got, float) and got == float(value)), (flag, value, got)
    assert (defaults.max_rows, defaults.max_payload_mb) == (128, 32.0)
    assert "`--max-rows` (default\n128)" in README and "`--max-payload-mb` (32 by default" in README
    assert "the `--k` (default 2)" in README and defaults.k is None  # None: 2 with --retrieve, else 0 (serve/cli.py)


def test_readme_generate_edit_guidance_is_the_papers() -> None:
    """``--edit`` decodes with ``--text-cfg 7.5 --image-cfg 1.5`` and grounded tasks with a single CFG 3 when the
    flags are left out, as the README says."""
    from cm3leon_lightning.generation.tasks import TASK_GUIDANCE

    assert "(`--text-cfg 7.5 --image-cfg 1.5`, the paper's)" in README
    assert TASK_GUIDANCE["edit"] == (7.5, 1.5)
    assert {v for k, v in TASK_GUIDANCE.items() if k != "edit"} == {(3.0, 3.0)}


def test_readme_prepare_limits_are_the_defaults() -> None:
    """ "raise ``--max-caption-tokens`` (256) / ``--max-caption-chars`` (1000)", "``--sft-up 3 --sft-down 0.3``" and
    "``max_skip_share`` (default 1%)"."""
    from cm3leon_lightning.data.datamodule import CM3LeonDataModule
    from cm3leon_lightning.data.prepare_cli import build_parser

    assert "`--max-caption-tokens` (256) / `--max-caption-chars` (1000)" in " ".join(README.split())
    args = build_parser().parse_args(["--source", "shapes", "--out", "o", "--vqgan", "v", "--clip-weights", "c"])
    assert (args.max_caption_tokens, args.max_caption_chars, args.sft_up, args.sft_down) == (256, 1000, 3.0, 0.3)
    assert "`max_skip_share` (default 1%)" in README
    import inspect

    assert inspect.signature(CM3LeonDataModule).parameters["max_skip_share"].default == 0.01
    shards = yaml.safe_load((ROOT / "configs" / "data" / "shards.yaml").read_text())["data"]["init_args"]
    assert shards["max_skip_share"] == 0.01


def repository_configs_only(line: str) -> bool:
    """Whether every ``--config`` of a command line is a file of the repository (not a user's ``my_data.yaml``)."""
    argv = shlex.split(line)
    return all((ROOT / path).is_file() for flag, path in zip(argv, argv[1:]) if flag == "--config")


@pytest.mark.parametrize("line", [line for line in readme_commands("fit") if repository_configs_only(line)])
def test_readme_fit_lines_parse(line: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's ``cm3leon fit`` lines that name only the repository's configs parse (``--print_config``)."""
    from cm3leon_lightning.cli import main

    monkeypatch.chdir(ROOT)
    argv = shlex.split(line)[1:]
    with pytest.raises(SystemExit) as exit_info:
        main([a for a in argv if a != "--print_config"] + ["--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model" in yaml.safe_load(capsys.readouterr().out)
