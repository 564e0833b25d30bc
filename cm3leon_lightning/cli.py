"""The ``cm3leon`` command: LightningCLI's ``fit|validate|test|predict`` plus the package's own commands.

Any LightningModule / LightningDataModule can be named by ``class_path`` in the YAML (``configs/``), so CM3Leon, the
VQGAN tokenizer and CLIP all train through the same command::

    cm3leon fit --config configs/vqgan/tiny.yaml
    cm3leon fit --config configs/trainer/cpu.yaml --config configs/model/350m.yaml --config configs/data/shards.yaml

The data module's vocabulary (from its shard manifest) flows into ``model.init_args.vocab`` through
``link_arguments``, so the model's embedding size always matches the data.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# Commands that are not Lightning subcommands: name -> "module:function" taking argv (imported lazily).
EXTRA_COMMANDS: dict[str, str] = {
    "generate": "cm3leon_lightning.generation.cli:main",
    "prepare": "cm3leon_lightning.data.prepare:main",
    "demo": "cm3leon_lightning.demo_cli:main",
    "serve": "cm3leon_lightning.serve.cli:main",
    "export": "cm3leon_lightning.export:main",
    "info": "cm3leon_lightning.info:main",
    "fid": "cm3leon_lightning.metrics.fid_cli:main",
}


DESCRIPTION = (
    "cm3leon: pretrain, fine-tune, evaluate and serve CM3Leon-style models. The Lightning subcommands below train and "
    "evaluate any module by class_path (cm3leon fit --config configs/...yaml). Also: 'cm3leon prepare' (raw "
    "image-caption pairs -> tokenized, retrieval-augmented shards), 'cm3leon generate' (images or text from a "
    "checkpoint), 'cm3leon serve' (the same over HTTP, requests batched), 'cm3leon export' (a checkpoint -> a model "
    "directory to share), 'cm3leon info' (what a checkpoint, model, dataset or bank holds), 'cm3leon fid' (MS-COCO "
    "FID prompts for cm3leon predict, and the FID of its images) and 'cm3leon demo' (the whole recipe on synthetic "
    "shapes, on CPU); each takes --help."
)
"""The top-level ``cm3leon --help`` text: it names the commands that are not Lightning subcommands."""


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
"""LightningCLI's subcommands (``CM3LeonCLI.subcommands()``), named here so dispatching needs no Lightning import."""

_LAZY = {"CM3LeonCLI", "StageConfigCallback", "INPUT_ERRORS", "data_vocab", "input_error"}


def __getattr__(name: str) -> Any:
    """The Lightning half's names (``CM3LeonCLI`` ...), importable from here as before, loaded on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module("cm3leon_lightning.trainer_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _extra_command(name: str) -> Callable[[Sequence[str]], int | None]:
    module_name, func_name = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cm3leon`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    choices = ", ".join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])
    if not args:  # LightningCLI's own message would offer only its four subcommands
        print(f"cm3leon: error: no command given (choose from {choices}; cm3leon --help)", file=sys.stderr)
        return 2
    if args[0] in EXTRA_COMMANDS:
        try:
            return int(_extra_command(args[0])(args[1:]) or 0)
        except BrokenPipeError:  # `cm3leon info X | head -1`: the reader left; no traceback, as other tools
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would fail again)
            return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    if not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        # LightningCLI's own message would offer only its four subcommands, as if `export` and the rest did not exist
        print(f"cm3leon: error: unknown command {args[0]!r} (choose from {choices}; cm3leon --help)", file=sys.stderr)
        return 2
    command = next((a for a in args if a in LIGHTNING_COMMANDS), "")
    bad_config = config_file_error(args)
    if bad_config:  # jsonargparse names no file: "while parsing a block mapping in "<unicode string>", line 1"
        print(f"cm3leon {command}: error: {bad_config}", file=sys.stderr)
        return 2
    from cm3leon_lightning.trainer_cli import INPUT_ERRORS, CM3LeonCLI, input_error

    # args=None lets LightningCLI read sys.argv itself (passing both makes it warn).
    try:
        CM3LeonCLI(args=None if argv is None else args)
    except INPUT_ERRORS as err:
        if os.environ.get("CM3LEON_TRACEBACK"):
            raise
        print(f"cm3leon {command}: error: {input_error(err)} (CM3LEON_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    except SystemExit as err:
        status = stopped_status(err)
        if status is None:
            raise
        name = "SIGTERM" if status == 143 else "Ctrl-C"
        print(
            f"cm3leon {command}: stopped by {name} (exit status {status}){RESUME_HINT.get(command, '')}",
            file=sys.stderr,
        )
        return status
    return 0


def config_file_error(args: Sequence[str]) -> str | None:
    """``--config PATH: <the YAML error, with its line>`` for the first ``--config`` / ``-c`` file of ``args`` that
    is not valid YAML, else None (a value that is no file is left to LightningCLI: it may be YAML text)."""
    import yaml

    for i, arg in enumerate(args):
        flag, _, path = arg.partition("=")
        if flag not in ("--config", "-c"):
            continue
        path = path if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            return f"--config {path}: {' '.join(str(err).split())}"
    return None


RESUME_HINT = {"fit": "; the checkpoints written so far are kept: resume with --ckpt_path <last.ckpt>"}
"""What the line for a stopped run adds, by command."""


def stopped_status(err: SystemExit) -> int | None:
    """The exit status of a Lightning run stopped by a signal (128 + its number), or None for another exit.

    Lightning ends a run stopped by SIGTERM with ``SIGTERMException``, a ``SystemExit`` with no code (status 0, as if
    the run had finished: ``cm3leon fit ... && cm3leon export ...`` went on), and one stopped by Ctrl-C with
    ``sys.exit(1)`` while handling the ``KeyboardInterrupt``."""
    if type(err).__name__ == "SIGTERMException":  # lightning.pytorch.utilities.exceptions
        return 143
    if err.code == 1 and isinstance(err.__context__, KeyboardInterrupt):
        return 130
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
