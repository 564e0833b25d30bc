"""A released model as a directory: ``config.json`` (architecture, vocabulary, provenance) and ``model.safetensors``.

Two layouts: ours (below), and ``transformers``' ``OPTForCausalLM`` (``layout="hf"``, :mod:`.hf_opt`).

``cm3leon export`` writes it from a training checkpoint; ``cm3leon generate`` / ``cm3leon serve`` (``--ckpt DIR``),
:func:`cm3leon_lightning.generation.cli.load_checkpoint` and ``CM3LeonModule(init_from=DIR)`` read it. Unlike a
Lightning checkpoint it holds no optimizer state and no pickle, and its weights may be stored in half precision, so a
7B model is 14 GB in bfloat16 where its training checkpoint is about 84 GB. The directory may also hold the text
tokenizer (``tokenizer/``) and the image tokenizer (``vqgan/``, in ``VQGAN.save_pretrained``'s format) the model was
trained with, which the commands then use when ``--tokenizer`` / ``--vqgan`` are not given.

``config.json``::

    {"format": "cm3leon_lightning.model", "format_version": 1, "created_by": "0.1.0",
     "config": {...CM3LeonConfig...}, "vocab": {...MultimodalVocab...}, "dtype": "bfloat16",
     "source": {"checkpoint": "runs/pretrain/checkpoints/last.ckpt", "kind": "lightning checkpoint",
                "global_step": 1000, "epoch": 0}}

``source.checkpoint`` is the path ``cm3leon export --ckpt`` was given, as given (relative stays relative): provenance
for people, not a path to open, and a shared model names no directory of the machine it was exported on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cm3leon_lightning.files import replaced_whole, write_text_whole

FORMAT_NAME = "cm3leon_lightning.model"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
"""Where ``transformers`` maps each tensor to its shard when it splits the weights (read in the ``hf`` layout)."""
TOKENIZER_DIR, VQGAN_DIR = "tokenizer", "vqgan"
"""Where a model directory keeps the tokenizers it was trained with (optional)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model directory may store its weights in, by the name ``config.json`` gives."""


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a ``config.json`` (a model directory, maybe a malformed one)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_model_config(path: str | os.PathLike[str], what: str = "path") -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, checked for format, version and fields.

    Raises:
        FileNotFoundError: no ``config.json`` (or no ``model.safetensors``) in ``path``.
        ValueError: not valid JSON, another format (a VQGAN directory, say), a newer version, or a missing field.
    """
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} has no {CONFIG_FILE}; is it a model directory?")
    try:
        doc = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {config_path} is not valid JSON: {e}") from e
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != FORMAT_NAME:
        raise ValueError(
            f"{what}: {config_path} has format {fmt!r}, not {FORMAT_NAME!r} (a model directory written by "
            "'cm3leon export')"
        )
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{what}: {config_path} has format_version {version!r}; this version of cm3leon_lightning reads up to "
            f"{FORMAT_VERSION} (upgrade the package)"
        )
    for field, kind in (("config", dict), ("vocab", dict), ("dtype", str)):
        if not isinstance(doc.get(field), kind):
            raise ValueError(f"{what}: {config_path} lacks the field {field!r} ({kind.__name__})")
    if doc["dtype"] not in DTYPES:
        raise ValueError(f"{what}: {config_path} field 'dtype' is {doc['dtype']!r}, expected one of {list(DTYPES)}")
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return doc


def save_pretrained(
    state_dict: dict[str, Tensor],
    directory: str | os.PathLike[str],
    config: dict[str, Any],
    vocab: dict[str, int],
    dtype: torch.dtype | None = None,
    source: dict[str, Any] | None = None,
    layout: str = "cm3leon",
    fetch: Callable[[Sequence[str]], dict[str, Tensor]] | None = None,
    chunk_bytes: int | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created); returns it.

    The weights are converted and written a few at a time (:func:`~.safetensors_stream.write_safetensors`): with a
    memory-mapped checkpoint or a lazy ``fetch``, a model of any size is exported holding at most ``chunk_bytes`` of
    it (plus their converted copies), never the whole model.

    Args:
        state_dict: the bare network's tensors (``CM3Leon.state_dict()`` keys); with ``fetch``, tensors on the meta
            device may stand for them (only names, shapes and dtypes are read here).
        directory: where to write; files of the same names there are replaced, each only once its replacement is
            complete (so ``state_dict`` / ``fetch`` may read the directory's own ``model.safetensors``).
        config: the architecture (``CM3LeonConfig.to_dict()``).
        vocab: the vocabulary (``MultimodalVocab.to_dict()``).
        dtype: store floating-point tensors in this dtype (None: as they are; all must then share one dtype).
        source: provenance recorded in ``config.json`` (checkpoint path, step).
        layout: ``cm3leon`` (this module's format) or ``hf``: ``transformers``' ``OPTForCausalLM``
            (:mod:`cm3leon_lightning.model.hf_opt`), our architecture and vocabulary under ``"cm3leon"``.
        fetch: reads the real tensors of the names it is given (``PretrainedWeights.fetch``); None: ``state_dict``'s.
        chunk_bytes: the most source bytes asked of ``fetch`` at once (a larger tensor is asked for alone; default
            :data:`~cm3leon_lightning.model.weights.CHUNK_BYTES`).

    When ``config`` ties the embeddings only ``wte.weight`` of the pair is written (safetensors refuses shared
    storage; :func:`~cm3leon_lightning.model.weights.load_weights` restores the tie).

    Raises:
        ValueError: ``dtype`` is not one of :data:`DTYPES`, the tensors mix floating-point dtypes and none is given,
            an unknown ``layout``, or an architecture the ``hf`` layout cannot express.
    """
    from cm3leon_lightning import __version__
    from cm3leon_lightning.model.hf_opt import opt_config, to_opt
    from cm3leon_lightning.model.safetensors_stream import spec_of, write_safetensors
    from cm3leon_lightning.model.weights import TIED, chunk_names

    names = [k for k in state_dict if not (config.get("tie_embeddings") and k == TIED[1])]
    specs = _one_dtype({k: state_dict[k].to("meta") for k in names}, dtype)  # checks dtypes; reads nothing
    about = {"created_by": __version__, "source": dict(source or {})}
    if layout == "hf":
        doc = opt_config(config, vocab, _dtype_name(specs), about)
    elif layout == "cm3leon":
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": about["created_by"],
            "config": dict(config),
            "vocab": dict(vocab),
            "dtype": _dtype_name(specs),
            "source": about["source"],
        }
    else:
        raise ValueError(f"layout must be 'cm3leon' or 'hf', got {layout!r}")

    def convert(part: dict[str, Tensor]) -> dict[str, Tensor]:
        part = _to_dtype(part, dtype)
        return to_opt(part, config) if layout == "hf" else part

    chunks = chunk_names({k: state_dict[k] for k in names}, chunk_bytes)
    header = [spec_of(k, v) for chunk in chunks for k, v in convert({k: specs[k] for k in chunk}).items()]

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for chunk in chunks:
            part = fetch(chunk) if fetch is not None else {k: state_dict[k] for k in chunk}
            yield from convert({k: part[k] for k in chunk}).items()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over the old files only when complete: the tensors may be read lazily from the
    # very file being replaced (re-saving a model directory in another dtype), which writing in place would
    # truncate before they are read, and a failed write leaves the old directory as it was.
    with replaced_whole(directory / WEIGHTS_FILE) as partial:
        write_safetensors(partial, header, tensors(), metadata={"format": "pt"})
    # config.json last: a directory cut short by a crash has no config and is not mistaken for a model.
    write_text_whole(directory / CONFIG_FILE, json.dumps(doc, indent=2) + "\n")
    return directory


def _one_dtype(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """``state`` with floating-point tensors in ``dtype`` (None: as they are, which must then be one of
    :data:`DTYPES`, shared by all)."""
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    state = _to_dtype(state, dtype)
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(floats) != 1 or next(iter(floats)) not in DTYPES.values():
        raise ValueError(f"the weights must share one dtype of {list(DTYPES)}, found {sorted(map(str, floats))}")
    return state


def _to_dtype(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """``state`` with its floating-point tensors in ``dtype`` (None: unchanged)."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _dtype_name(state: dict[str, Tensor]) -> str:
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    return next(name for name, d in DTYPES.items() if d == dtype)


def read_pretrained(path: str | os.PathLike[str], what: str = "path") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights (read into memory from ``model.safetensors``; ``read_weights(..., lazy=True)`` reads them a few at
    a time) and the parsed ``config.json`` of a model directory.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_model_config`, or an unreadable weights file.
    """
    from cm3leon_lightning.model.weights import read_safetensors

    doc = read_model_config(path, what)
    return read_safetensors(Path(path) / WEIGHTS_FILE, what)[0], doc


# ------------------------------------------------------------------------------------ Hugging Face (OPT) layout
def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a Hugging Face ``config.json`` (a JSON object with a ``model_type``)."""
    config = Path(path) / CONFIG_FILE
    if not (Path(path).is_dir() and config.is_file()):
        return False
    try:
        doc = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "model_type" in doc


def read_hf(path: str | os.PathLike[str], what: str = "path") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our state dict and the ``"cm3leon"`` block (``config``, ``vocab``, ``source``) of a directory
    ``save_pretrained(..., layout="hf")`` wrote, read whole (:func:`~.hf_lazy.read_hf_lazy` reads it a chunk at a
    time).

    The weights are ``model.safetensors`` or, in a directory ``transformers`` re-saved in shards, the files its
    ``model.safetensors.index.json`` lists (:func:`read_hf_shards`).

    Raises:
        ValueError: another Hugging Face model (no ``"cm3leon"`` block: not CM3Leon's architecture), a newer format,
            or missing weights.
    """
    from cm3leon_lightning.model.hf_opt import from_opt

    block = read_hf_block(path, what)
    state, _, where = read_opt_weights(path, what)
    return from_opt(state, block["config"], where), block


def read_opt_weights(
    path: str | os.PathLike[str], what: str = "path", lazy: bool = False
) -> tuple[dict[str, Tensor], Callable[[Sequence[str]], dict[str, Tensor]] | None, str]:
    """The tensors of a Hugging Face directory under OPT's names, from ``model.safetensors`` or the shards of its
    ``model.safetensors.index.json``; with ``lazy``, meta tensors and a function reading named ones. Also ``what``
    with the file read, as :func:`~.hf_opt.from_opt` names it in errors.

    Raises:
        FileNotFoundError: neither file is there.
        ValueError: as :func:`read_hf_shards`, or an unreadable weights file.
    """
    from cm3leon_lightning.model.weights import read_safetensors

    weights = Path(path) / WEIGHTS_FILE
    if weights.is_file():
        return (*read_safetensors(weights, what, lazy), f"{what} {str(weights)!r}")
    index = Path(path) / HF_INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE} (nor {HF_INDEX_FILE})")
    return (*read_hf_shards(index, what, lazy), f"{what} {str(index)!r}")


def read_hf_shards(
    index: Path, what: str = "path", lazy: bool = False
) -> tuple[dict[str, Tensor], Callable[[Sequence[str]], dict[str, Tensor]] | None]:
    """The tensors of the shards a ``transformers`` ``model.safetensors.index.json`` lists (``save_pretrained``
    splits a model larger than its ``max_shard_size``), each checked to hold exactly the tensors the index maps to it;
    with ``lazy``, meta tensors (only the shards' headers are read) and a function reading named ones from their
    shards.

    Raises:
        FileNotFoundError: a shard the index names is missing.
        ValueError: an unreadable index, a shard name that is not a file of the directory, a tensor in two shards,
            or a shard holding other tensors than the index says (named with ``what`` and the file).
    """
    from cm3leon_lightning.model.weights import read_safetensors

    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{what}: {index} is not a JSON object: {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{what}: {index} lacks the field 'weight_map' (tensor name -> shard file name)")
    state: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    fetchers: dict[str, Callable[[Sequence[str]], dict[str, Tensor]]] = {}  # shard file -> its lazy reader
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if Path(shard).name != shard:
            raise ValueError(f"{what}: {index} names the shard {shard!r}, not a file name of its directory")
        if not file.is_file():
            raise FileNotFoundError(f"{what}: {index} names the shard {shard!r}, but {str(file)!r} does not exist")
        part, reader = read_safetensors(file, what, lazy)
        twice = sorted(k for k in part if k in state)
        if twice:
            raise ValueError(f"{what}: {twice[:5]} are in both {where[twice[0]]!r} and {str(file)!r}")
        listed = {k for k, s in weight_map.items() if s == shard}
        if set(part) != listed:
            extra, lacking = sorted(set(part) - listed), sorted(listed - set(part))
            raise ValueError(
                f"{what}: {str(file)!r} does not hold what {index.name} maps to it: holds also {extra[:5]}, "
                f"lacks {lacking[:5]}"
            )
        state.update(part)
        where.update(dict.fromkeys(part, str(file)))
        if reader is not None:
            fetchers[str(file)] = reader
    if not lazy:
        return state, None

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        got: dict[str, Tensor] = {}
        for file in dict.fromkeys(where[k] for k in names):  # each shard opened once, in the order first named
            got.update(fetchers[file]([k for k in names if where[k] == file]))
        return {k: got[k] for k in names}

    return state, fetch


def read_hf_block(path: str | os.PathLike[str], what: str = "path") -> dict[str, Any]:
    """The ``"cm3leon"`` block of a Hugging Face directory's ``config.json`` (see :func:`read_hf`)."""
    from cm3leon_lightning.model.hf_opt import HF_FORMAT, HF_FORMAT_VERSION

    config_path = Path(path) / CONFIG_FILE
    doc = json.loads(config_path.read_text())
    block = doc.get("cm3leon")
    if doc.get("model_type") != "opt" or not isinstance(block, dict) or block.get("format") != HF_FORMAT:
        raise ValueError(
            f"{what}: {config_path} is a Hugging Face {doc.get('model_type')!r} model not exported by cm3leon "
            "(no 'cm3leon' block); only 'cm3leon export --format hf' directories hold CM3Leon's architecture"
        )
    version = block.get("format_version")
    if not isinstance(version, int) or version > HF_FORMAT_VERSION:
        raise ValueError(f"{what}: {config_path} has cm3leon.format_version {version!r}; upgrade cm3leon_lightning")
    for field in ("config", "vocab"):
        if not isinstance(block.get(field), dict):
            raise ValueError(f"{what}: {config_path} lacks the field 'cm3leon.{field}' (dict)")
    return block


def bundled_paths(path: str | os.PathLike[str]) -> tuple[Path | None, Path | None]:
    """The text tokenizer and VQGAN a model directory (ours or the Hugging Face layout) holds, None where absent."""
    p = Path(path)
    if is_hf_dir(p):
        tokenizer = p / "tokenizer.json"
    elif is_model_dir(p):
        tokenizer = p / TOKENIZER_DIR
    else:
        return None, None
    return (tokenizer if tokenizer.exists() else None), (p / VQGAN_DIR if (p / VQGAN_DIR).is_dir() else None)


def other_network(names: Iterable[str]) -> str:
    """What a checkpoint without CM3Leon's architecture holds instead, told by its tensor ``names`` (``model.``
    stripped, as :func:`~cm3leon_lightning.model.weights.read_weights` gives them), as a clause for the error; empty
    when they are neither a VQGAN's nor a CLIP's."""
    names = set(names)
    if holds_vqgan(names):
        return ": it is a VQGAN (the image tokenizer), which --vqgan takes"
    if holds_clip(names):
        return (
            ": it is a CLIP (the retriever); ClipModule.export_weights (or its export_path) writes the .safetensors "
            "that --clip-pretrained and cm3leon prepare --clip-weights take"
        )
    return ""


def holds_vqgan(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` are a VQGAN's: its own state dict, or a ``VQGANModule``'s (``vqgan.`` prefix)."""
    names = set(names)
    return "encoder.conv_in.weight" in names or "vqgan.encoder.conv_in.weight" in names


def holds_clip(names: Iterable[str]) -> bool:
    """Whether tensor ``names`` (a ``ClipModule``'s ``model.`` prefix stripped) are an open_clip CLIP's: a
    ``logit_scale`` and an image tower (``visual.*``)."""
    names = set(names)
    return "logit_scale" in names and any(n.startswith("visual.") for n in names)
