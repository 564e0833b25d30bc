"""The Lightning half of the ``cm3leon`` command: ``CM3LeonCLI`` (LightningCLI for ``fit|validate|test|predict``)
and the one-line reporting of bad input.

:mod:`cm3leon_lightning.cli` imports this module only for a Lightning subcommand, so ``cm3leon generate``, ``serve``,
``export``, ``info`` and the other extra commands start without importing Lightning.
"""

from __future__ import annotations

import copy
import importlib
import traceback
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from cm3leon_lightning.cli import DESCRIPTION

# Dataclass attribute docstrings (CM3LeonConfig's) become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def data_vocab(datamodule: Any) -> dict[str, int] | None:
    """The vocabulary description a data module exposes (``vocab``: MultimodalVocab or dict), or None."""
    vocab = getattr(datamodule, "vocab", None)
    if vocab is None:
        return None
    return vocab.to_dict() if hasattr(vocab, "to_dict") else dict(vocab)


class StageConfigCallback(SaveConfigCallback):
    """Save the run's config as ``config.yaml`` for ``fit`` and ``<stage>_config.yaml`` for validate, test and
    predict: with a log directory shared with the fit (no logger, or a fixed version), those replaced the fit's
    ``config.yaml``, the file the README reuses (``cm3leon predict --config run/config.yaml``)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Choose the file name for ``stage``, then save as LightningCLI does."""
        name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if name != "fit" and self.config_filename == "config.yaml":
            self.config_filename = f"{name}_config.yaml"
        super().setup(trainer, pl_module, stage)


class CM3LeonCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, and the data -> model vocabulary link."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", StageConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does, and note the model's class and arguments (its :data:`RUN_SETTINGS` among
        them) as given, before ``--ckpt_path``'s hyper-parameters replace them."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self.given_model_class = config.get("model.class_path")
        init_args = config.get("model.init_args")
        self.given_model_args = copy.deepcopy(dict(vars(init_args))) if init_args is not None else {}
        self.given_run_settings = {
            key: config[f"model.init_args.{key}"] for key in RUN_SETTINGS if f"model.init_args.{key}" in config
        }

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the data module's vocabulary to the model, and always log the data pipeline's counts.

        ``--data_counts.every_n_steps`` sets how often ``data/skipped_<reason>`` and friends are logged.
        """
        from cm3leon_lightning.data.datamodule import DataCountsLogger

        parser.add_lightning_class_args(DataCountsLogger, "data_counts")
        parser.link_arguments("data", "model.init_args.vocab", compute_fn=data_vocab, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Drop a ``vocab: None`` the link left among the extra arguments of a model without ``vocab``; with
        ``--ckpt_path``, drop the model's ``init_from``: the checkpoint's weights replace those anyway, and
        LightningCLI applies a checkpoint's hyper-parameters over the command line, so an ``init_from`` saved there
        would make every resume or prediction read the pretrained file again (and fail where it is gone). Also with
        ``--ckpt_path``: refuse a checkpoint of another class than the model given (LightningCLI would silently build
        the checkpoint's class: a VQGAN in a CM3Leon run), keep the :data:`RUN_SETTINGS` as given, and for ``fit`` warn
        of every other model argument given that the checkpoint's hyper-parameters replaced (``lr`` ...)."""
        from cm3leon_lightning.model.pretrained import is_model_dir
        from cm3leon_lightning.model.weights import SHARDED_META

        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        extra = config.get("model.dict_kwargs") or {}
        if "vocab" in extra and extra["vocab"] is None:
            # The data -> model link's None, saved into the checkpoint of a module without a `vocab` argument (VQGAN,
            # CLIP): LightningCLI would pass it back on resume (`unexpected keyword argument 'vocab'`).
            del extra["vocab"]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and is_model_dir(ckpt_path):  # Lightning would fail in its loader: IsADirectoryError
            self.parser.error(
                f"--ckpt_path: {ckpt_path} is a model directory of 'cm3leon export' (no trainer state); give it as "
                f"--model.init_args.init_from {ckpt_path} instead"
            )
        if ckpt_path and Path(ckpt_path).is_dir() and not (Path(ckpt_path) / SHARDED_META).is_file():
            self.parser.error(not_a_checkpoint(Path(ckpt_path)))  # Lightning's loader: IsADirectoryError, at the end
        if not ckpt_path:
            return
        saved_class, given_class = config.get("model.class_path"), getattr(self, "given_model_class", None)
        # LightningCLI would build the checkpoint's class in place of the one given
        if given_class and _import_class(saved_class) is not _import_class(given_class):
            self.parser.error(
                f"--ckpt_path: {ckpt_path} is a checkpoint of {saved_class}, but the model given is {given_class}; "
                "give the checkpoint of this model, or the config of the run that wrote it"
            )
        for key, value in getattr(self, "given_run_settings", {}).items():
            if f"model.init_args.{key}" in config:
                config[f"model.init_args.{key}"] = value
        given = getattr(self, "given_model_args", {})
        replaced = replaced_model_args(given, config.get("model.init_args"))
        if replaced and subcommand == "fit":
            hint = (
                "; --model.init_args.init_from starts a new run from its weights with them"
                if "init_from" in given
                else ""
            )
            rank_zero_warn(
                f"--ckpt_path {ckpt_path}: the run resumes with the checkpoint's model hyper-parameters, not these "
                f"given: {replaced} (LightningCLI restores them{hint})"
            )
        if config.get("model.init_args.init_from") is not None:
            config["model.init_args.init_from"] = None


def _import_class(path: str | None) -> Any:
    """The class at import path ``path`` (``a.b.C``; a re-export names the same class), else ``path`` itself."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


RUN_SETTINGS = ("export_path", "overwrite_export", "activation_checkpointing", "compile", "allow_tokenizer_change")
"""Model arguments that say where a run writes, how it computes or what data it accepts, not what it trains
(``ClipModule``'s export; ``CM3LeonModule``'s memory and speed switches and its consent to data of other tokenizers): on
resume they are taken as given, not from the checkpoint's hyper-parameters, so that the flags the refusals ask for
(``--model.init_args.overwrite_export true`` for an existing ``export_path``, ``--model.init_args.allow_tokenizer_change
true`` for data of another tokenizer) and ``--model.init_args.activation_checkpointing true`` on a smaller GPU take
effect."""

NOT_RESTORED = ("config", "vocab", "init_from", *RUN_SETTINGS)
"""Model arguments :func:`replaced_model_args` leaves out: ``config`` and ``vocab`` are resolved from the preset and
the data, ``init_from`` is dropped on resume, and the :data:`RUN_SETTINGS` are kept as given."""


def not_a_checkpoint(directory: Path, shown: int = 3) -> str:
    """The error for a ``--ckpt_path`` that is a directory holding no sharded (FSDP) checkpoint: names up to
    ``shown`` checkpoint files below it, newest first, to give instead."""
    found = sorted(directory.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    names = ", ".join(str(p) for p in found[:shown]) + ", ..." * (len(found) > shown)
    hint = f" from it: {names}" if found else " (it holds none)"
    return f"--ckpt_path: {directory} is a directory, not a checkpoint; give a .ckpt file{hint}"


def replaced_model_args(given: dict[str, Any], restored: Any) -> str:
    """``key value (the checkpoint's: value)`` for each model argument given that ``--ckpt_path``'s hyper-parameters
    ``restored`` (the model's ``init_args``) replaced, comma-separated; empty when none was."""
    if restored is None:
        return ""
    changed = [
        f"{key} {value!r} (the checkpoint's: {restored[key]!r})"
        for key, value in given.items()
        if key not in NOT_RESTORED and key in restored and restored[key] != value
    ]
    return ", ".join(changed)


INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    MisconfigurationException,
)
"""Errors that Lightning subcommands report in one line with exit status 2 (bad arguments, files, configs); others
(a CUDA error, an out-of-memory) keep their traceback."""


def input_error(err: BaseException) -> str:
    """The message to show for ``err``: the first exception of its chain raised in this package (jsonargparse wraps
    a data module's ``train_data: ... no such directory`` in "Does not validate against any of the Union subtypes"
    with the whole config), else ``err``'s own, as ``Type: message``."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    package = str(Path(__file__).resolve().parent)
    for exc in chain:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames and str(Path(frames[-1].filename).resolve()).startswith(package) and isinstance(exc, INPUT_ERRORS):
            return f"{type(exc).__name__}: {exc}"
    return f"{type(chain[0]).__name__}: {chain[0]}"
