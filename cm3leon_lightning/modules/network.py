"""What :class:`~cm3leon_lightning.modules.cm3leon.CM3LeonModule` builds its network from: the architecture its
arguments resolve to (preset or config, with the vocabulary's size and ``max_seq_len``), the data module's
vocabulary and row length it must fit, and the weights it starts from (``init_from``, ``from_pretrained``), checked
against that architecture and vocabulary before they are loaded.
"""

from __future__ import annotations

import warnings
from typing import Any

from cm3leon_lightning.config import INIT_ONLY_FIELDS, CM3LeonConfig
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.compat import architecture_diff
from cm3leon_lightning.model.weights import (
    PretrainedWeights,
    check_same_architecture,
    check_same_vocab,
    load_weights,
    read_weights,
    vocab_layout,
)
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

__all__ = [
    "check_data_vocab",
    "check_vocab_size",
    "data_source",
    "data_vocab",
    "load_init_from",
    "preset_disagreement",
    "read_described_weights",
    "resolve_architecture",
]


def check_vocab_size(have: int, want: int, what: str) -> None:
    """Raise ValueError when a model's vocabulary size differs from the data's."""
    if have != want:
        raise ValueError(f"vocabulary mismatch: {what} has vocab_size {have}, the data needs {want}")


def data_vocab(datamodule: object, max_seq_len: int) -> dict[str, Any] | None:
    """The vocabulary description of a data module (its ``vocab``: MultimodalVocab or dict), or None when it has
    none, once its rows are known to fit a context of ``max_seq_len`` positions.

    Raises:
        ValueError: the data module's ``hparams["seq_len"]`` feeds more than ``max_seq_len`` positions (which would
            otherwise fail at the first forward, after the data has loaded), naming both flags.
    """
    seq_len = (getattr(datamodule, "hparams", None) or {}).get("seq_len")
    if isinstance(seq_len, int) and seq_len - 1 > max_seq_len:  # a row feeds seq_len - 1 positions
        raise ValueError(
            f"the data's seq_len {seq_len} feeds {seq_len - 1} positions, more than the model's max_seq_len "
            f"{max_seq_len}: lower --data.init_args.seq_len to at most {max_seq_len + 1} "
            "or raise --model.init_args.max_seq_len"
        )
    vocab = getattr(datamodule, "vocab", None)
    if vocab is None:
        return None
    return vocab.to_dict() if isinstance(vocab, MultimodalVocab) else dict(vocab)


def data_source(datamodule: object) -> str:
    """The data module's data for messages: ``the data (manifest <path>)`` when its first split's manifest is known
    (:class:`~cm3leon_lightning.data.datamodule.CM3LeonDataModule`), or the ``vocab_from`` of a
    :class:`~cm3leon_lightning.generation.predict.PromptDataModule`; else ``the data``."""
    sources = getattr(datamodule, "sources", None)
    if isinstance(sources, dict) and sources:
        location = getattr(next(iter(sources.values()))[0], "location", None)
        if location:
            return f"the data (manifest {location})"
    vocab_from = (getattr(datamodule, "hparams", None) or {}).get("vocab_from")
    return f"the data (vocab_from {vocab_from})" if vocab_from else "the data"


_KIND_FIELDS = {"text": ("text_tokenizer_sha256",), "vqgan": ("vqgan_sha256", "vqgan_weights_sha256")}


def check_data_vocab(
    model: dict[str, Any], data: dict[str, Any], source: str, allow_tokenizer_change: bool = False
) -> dict[str, Any]:
    """Check the data's vocabulary description against the model's (sizes, then the tokenizer hashes, as
    :func:`~cm3leon_lightning.model.weights.check_same_vocab`); returns the description the model keeps: its sizes,
    and for each tokenizer the data's hashes (the model now learns from them), or the model's when the data records
    none (both when they matched).

    Raises:
        ValueError: other sizes (``vocabulary mismatch: the model was built for ..., the data has ...``), or other
            tokenizers without ``allow_tokenizer_change``, naming ``source`` and the short hashes.
    """
    if vocab_layout(model) != vocab_layout(data):
        raise ValueError(
            f"vocabulary mismatch: the model was built for {vocab_layout(model)}, the data has {vocab_layout(data)}"
        )
    matched = check_same_vocab(model, data, "the model", source, allow_tokenizer_change)
    kept = vocab_layout(model)
    for kind, keys in _KIND_FIELDS.items():
        from_data = any(data.get(k) for k in keys)
        for side in [model, data] if matched[kind] else [data] if from_data else [model]:
            kept.update({k: side[k] for k in keys if side.get(k)})
    return kept


def resolve_architecture(
    preset: str | None, config: CM3LeonConfig | None, vocab: dict[str, Any] | None, max_seq_len: int | None
) -> tuple[CM3LeonConfig, dict[str, Any] | None]:
    """The architecture and vocabulary description of ``CM3LeonModule(preset, config, vocab, max_seq_len)``.

    ``config`` (or, when None, ``preset``, ``tiny`` when that is None too) with the vocabulary's padded size and
    ``max_seq_len`` when given. ``vocab`` comes back complete (every field required: a partial description would be
    saved and refused by every reader of checkpoints). A ``preset`` given beside a ``config`` of another architecture
    is warned about (:func:`preset_disagreement`).
    """
    if preset is not None and config is not None:
        disagreement = preset_disagreement(preset, config)
        if disagreement:
            warnings.warn(disagreement, stacklevel=3)
    overrides: dict[str, Any] = {}
    if vocab is not None:
        vocab = MultimodalVocab.from_dict(vocab, "CM3LeonModule vocab").to_dict()
        overrides["vocab_size"] = MultimodalVocab(**vocab).padded_size
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    if config is None:
        config = CM3LeonConfig.from_preset(preset or "tiny", **overrides)
    elif overrides:
        config = CM3LeonConfig.from_dict({**config.to_dict(), **overrides})
    return config, vocab


def preset_disagreement(preset: str, config: CM3LeonConfig) -> str | None:
    """A sentence naming the architecture fields in which ``config`` differs from the preset ``preset`` (the
    vocabulary size, context length and initialisation aside), or None when it agrees.

    The config is used, whole: from the command line (``--config configs/model/tiny.yaml
    --model.init_args.config.n_layer 4``) the fields it leaves out take :class:`CM3LeonConfig`'s defaults (the 350m
    architecture), not the preset's, which silently built a 350m-sized model.
    """
    skip = ("vocab_size", "max_seq_len", *INIT_ONLY_FIELDS)
    diff = architecture_diff(config.to_dict(), CM3LeonConfig.from_preset(preset).to_dict(), skip)
    differ = [f"{k} {ours!r} (preset: {theirs!r})" for k, (ours, theirs) in diff.items()]
    if not differ:
        return None
    return (
        f"CM3LeonModule: config differs from preset={preset!r} in {', '.join(differ)}; the config is used, whole: "
        "fields it does not give take CM3LeonConfig's defaults (the 350m architecture), not the preset's. Give either "
        "preset alone (with max_seq_len) or every architecture field under config (and no preset)"
    )


def read_described_weights(path: str) -> PretrainedWeights:
    """The weights of a file that records its architecture and vocabulary (``CM3LeonModule.from_pretrained``).

    Raises:
        FileNotFoundError, ValueError: as :func:`~cm3leon_lightning.model.weights.read_weights`, or a file that
            records no architecture and vocabulary (bare weights).
    """
    weights = read_weights(path, "path", lazy=True)
    if not weights.config or not weights.vocab:
        raise ValueError(
            f"path: {path} ({weights.kind}) records no architecture and vocabulary; for bare weights use "
            "CM3LeonModule(config=..., vocab=..., init_from=path)"
        )
    return weights


def load_init_from(
    model: CM3Leon,
    path: str,
    config: CM3LeonConfig,
    vocab: dict[str, Any] | None,
    data_source: str = "the data",
    allow_tokenizer_change: bool = False,
) -> dict[str, Any] | None:
    """Check the weights of ``init_from`` ``path`` against the module's architecture ``config`` and ``vocab`` (the
    data's: sizes, and the text tokenizer and VQGAN hashes unless ``allow_tokenizer_change``), then load them into
    ``model``; returns the vocabulary the file records (None when it records none).

    Raises:
        FileNotFoundError, ValueError: as :func:`~cm3leon_lightning.model.weights.read_weights`, or weights of another
            architecture or vocabulary, or trained with other tokenizers (naming ``path``, ``data_source`` and both
            short hashes), or that do not fit ``model``.
    """
    weights = read_weights(path, "init_from", lazy=True)
    source = f"init_from checkpoint {path!r}"
    check_same_architecture(weights.config, config.to_dict(), source)
    check_same_vocab(weights.vocab, vocab, source, data_source, allow_tokenizer_change)
    load_weights(model, weights.state_dict, f"init_from {path!r}", weights.fetch)
    return None if weights.vocab is None else dict(weights.vocab)
