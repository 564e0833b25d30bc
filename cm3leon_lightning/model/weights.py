"""Reading CM3Leon weights from any file training or export writes, and checking they fit a network.

Fine-tuning (paper section 4, ``CM3LeonModule(init_from=...)``), ``cm3leon generate``/``serve`` and ``cm3leon export``
read only the network's weights (never an optimizer state), from:

* a Lightning checkpoint of ``CM3LeonModule`` (``model.``-prefixed keys under ``state_dict``, the architecture and
  vocabulary under ``hyper_parameters``), memory-mapped;
* a *sharded* Lightning checkpoint, the directory FSDP training writes (``configs/trainer/fsdp_bf16.yaml``:
  ``torch.distributed.checkpoint`` shards + ``meta.pt``), gathered in one process without consolidating it first;
* a model directory of ``cm3leon export`` (:mod:`cm3leon_lightning.model.pretrained`), in our layout or Hugging
  Face's (``--format hf``, :mod:`cm3leon_lightning.model.hf_opt`);
* a ``.safetensors`` file or ``torch.save``'d state dict of the bare :class:`~cm3leon_lightning.model.CM3Leon`
  (no architecture or vocabulary: usable only where those come from elsewhere).

No Lightning import: this module is the model package's. The comparisons of vocabulary and architecture are shared
with ``CM3LeonModule.on_load_checkpoint``, so both refuse a mismatch in the same words.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cm3leon_lightning.model.compat import (  # noqa: F401 (re-exported: their old home)
    TOKENIZER_HINT,
    check_same_architecture,
    check_same_vocab,
    vocab_layout,
)

MODEL_PREFIX = "model."
"""Prefix of the network's keys in a ``CM3LeonModule`` state dict (the module holds it as ``self.model``)."""

SHARDED_META = "meta.pt"
"""The file Lightning's FSDPStrategy writes beside the shards of a sharded checkpoint: everything but the tensors."""

TIED = ("wte.weight", "lm_head.weight")
"""The token embedding and LM head, one tensor when the architecture ties them."""


@dataclass(frozen=True)
class PretrainedWeights:
    """What :func:`read_weights` found in a file.

    Attributes:
        state_dict: the bare network's tensors (keys without the ``model.`` prefix), on the CPU.
        config: the architecture the weights were trained with (``CM3LeonConfig.to_dict()``), when the file says.
        vocab: the vocabulary they were trained with (``MultimodalVocab.to_dict()``), when the file says.
        kind: ``"lightning checkpoint"``, ``"sharded checkpoint"``, ``"model directory"``, ``"hugging face
            directory"``, ``"safetensors"`` or ``"state dict"``.
        source: provenance when the file says: ``global_step`` and ``epoch`` of a checkpoint, a model directory's
            ``source``.
        fetch: set when read with ``lazy=True`` from a file whose tensors can be read a few at a time (a sharded
            checkpoint, safetensors, a model directory in either layout): ``state_dict`` then holds meta tensors
            (names, shapes, dtypes) and ``fetch(names)`` reads the real ones (:func:`tensor_reader` works either
            way).
    """

    state_dict: dict[str, Tensor]
    config: dict[str, Any] | None
    vocab: dict[str, int] | None
    kind: str
    source: dict[str, Any] = field(default_factory=dict)
    fetch: Callable[[Sequence[str]], dict[str, Tensor]] | None = None


def is_safetensors(path: Path) -> bool:
    """True when the file starts like safetensors: an 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def read_weights(path: str | os.PathLike[str], what: str = "init_from", lazy: bool = False) -> PretrainedWeights:
    """Read a network's weights from any of the sources in the module docstring.

    The kind is told by the content (a directory's ``config.json`` or ``meta.pt``, the safetensors header, then what
    ``torch.load`` returns), not the extension. ``torch.load`` runs with ``weights_only=True`` on the CPU,
    memory-mapped when the file is in torch's zip format (every rank of a multi-GPU run reads the file: the mapping
    shares the pages, and a checkpoint's optimizer state is never read).

    Args:
        path: the file or directory.
        what: the argument the path came from, named in errors.
        lazy: read only names, shapes and dtypes now where the file allows reading tensors a few at a time later (a
            sharded checkpoint, a ``.safetensors`` file, a model directory in our layout or Hugging Face's; see
            ``PretrainedWeights.fetch``), so a caller that handles one tensor at a time (``cm3leon export``,
            :func:`load_weights`) never holds them all. A Lightning checkpoint is memory-mapped either way.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory of another kind, an unreadable file, one that holds no state dict, or one whose
            recorded architecture is not a valid ``CM3LeonConfig`` (hand-edited, or from a version with more fields).
    """
    weights = _read_weights(path, what, lazy)
    if weights.config is not None:
        from cm3leon_lightning.config import CM3LeonConfig

        try:
            CM3LeonConfig.from_dict(weights.config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {path} has an unusable architecture ('config'): {e}") from e
    return weights


def _read_weights(path: str | os.PathLike[str], what: str, lazy: bool) -> PretrainedWeights:
    """:func:`read_weights` without the check of the recorded architecture."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
    if p.is_dir():
        return _read_directory(p, what, lazy)
    if is_safetensors(p):
        state, fetch = read_safetensors(p, what, lazy)
        return PretrainedWeights(state, None, None, "safetensors", fetch=fetch)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... depending on how the file is wrong
        raise ValueError(
            f"{what}: {str(path)!r} cannot be read as a Lightning checkpoint, a .safetensors file or a torch.save'd "
            f"state dict: {load_error(e)}"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        hparams = obj.get("hyper_parameters") or {}
        # Keys of the LightningModule's other members (none in CM3LeonModule) stay prefixed: reported as unexpected.
        state = {k.removeprefix(MODEL_PREFIX): v for k, v in obj["state_dict"].items()}
        return PretrainedWeights(
            state, hparams.get("config"), hparams.get("vocab"), "lightning checkpoint", _progress(obj)
        )
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        if all(k.startswith(MODEL_PREFIX) for k in obj):  # a saved CM3LeonModule.state_dict()
            obj = {k.removeprefix(MODEL_PREFIX): v for k, v in obj.items()}
        return PretrainedWeights(obj, None, None, "state dict")
    found = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"{what}: {str(path)!r} holds {found}, not a Lightning checkpoint (with 'state_dict') or a state dict of "
        "tensors"
    )


def load_error(e: BaseException) -> str:
    """The one line of a ``torch.load(weights_only=True)`` failure that says what was wrong.

    Torch's message spans several paragraphs and suggests ``weights_only=False``, which would run code from the file;
    its ``WeightsUnpickler error:`` line (``Unsupported operand 80`` for a file that is not a torch file,
    ``Unsupported global: ...`` for one that pickles objects) is the useful part. A bare ``EOFError`` (an empty
    file) is said in words.
    """
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines and isinstance(e, EOFError):  # an empty file, or a legacy (non-zip) one cut short
        return "the file ends early (empty or cut short)"
    return lines[0] if lines else type(e).__name__


def _progress(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: checkpoint[k] for k in ("global_step", "epoch") if isinstance(checkpoint.get(k), int)}


def read_safetensors(
    path: Path, what: str, lazy: bool = False
) -> tuple[dict[str, Tensor], Callable[[Sequence[str]], dict[str, Tensor]] | None]:
    """The tensors of a ``.safetensors`` file, or (``lazy``) meta tensors and a function reading named ones.

    Raises:
        ValueError: the file is not readable as safetensors (named with ``what``).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cm3leon_lightning.model.safetensors_stream import DTYPE_NAMES

    try:
        if not lazy:
            return load_file(str(path), device="cpu"), None
        by_name = {v: k for k, v in DTYPE_NAMES.items()}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # load_file's order: the file's where safetensors has offset_keys (load_file uses it), else keys()'s
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            specs = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names}
        unknown = {k: d for k, (_, d) in specs.items() if d not in by_name}
        if unknown:
            raise ValueError(f"dtypes torch cannot hold here: {unknown}")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{what}: {str(path)!r} cannot be read as safetensors: {e}") from e
    state = {k: torch.empty(shape, dtype=by_name[d], device="meta") for k, (shape, d) in specs.items()}

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in names}

    return state, fetch


def _read_directory(p: Path, what: str, lazy: bool = False) -> PretrainedWeights:
    from cm3leon_lightning.model.pretrained import WEIGHTS_FILE, is_hf_dir, is_model_dir, read_hf, read_model_config

    if is_hf_dir(p):
        from cm3leon_lightning.model.hf_lazy import read_hf_lazy

        if lazy:
            state, fetch, block = read_hf_lazy(p, what)
        else:
            (state, block), fetch = read_hf(p, what), None
        source = block.get("source", {})
        return PretrainedWeights(state, block["config"], block["vocab"], "hugging face directory", source, fetch)
    if is_model_dir(p):
        doc = read_model_config(p, what)
        state, fetch = read_safetensors(p / WEIGHTS_FILE, what, lazy)
        source = dict(doc.get("source", {}))
        return PretrainedWeights(state, doc["config"], doc["vocab"], "model directory", source, fetch)
    if (p / SHARDED_META).is_file():
        return read_sharded(p, what, lazy)
    raise ValueError(
        f"{what}: {str(p)!r} is a directory but neither a model directory of 'cm3leon export' (config.json) nor a "
        f"sharded Lightning checkpoint ({SHARDED_META} beside the shards)"
    )


def read_sharded(path: str | os.PathLike[str], what: str = "init_from", lazy: bool = False) -> PretrainedWeights:
    """The network's weights from a sharded checkpoint of Lightning's FSDPStrategy, gathered in this process.

    Lightning writes ``{"model": state_dict, "optimizer_0": ...}`` with ``torch.distributed.checkpoint`` (which
    flattens the keys to ``model.model.wte.weight``, ...) and the rest of the checkpoint (hyper-parameters, step) to
    ``meta.pt``. Only the ``model.`` entries are allocated and read, whole, in the dtype they were saved in: the
    optimizer's moments (twice the weights again in float32) stay on disk, so no consolidated copy is needed. With
    ``lazy`` nothing is read but the index: ``fetch(names)`` reads those tensors from the shards when asked.

    Raises:
        ValueError: ``meta.pt`` or the shards' ``.metadata`` is unreadable, a shard file is shorter than the index
            says (naming it), or the shards hold no model tensors.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = Path(path)
    try:
        meta = torch.load(p / SHARDED_META, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise ValueError(f"{what}: {p / SHARDED_META} is not a readable torch file: {load_error(e)}") from e
    try:
        index = FileSystemReader(str(p)).read_metadata()
        entries = index.state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a missing or corrupt .metadata file, in the reader's own error types
        raise ValueError(
            f"{what}: {str(p)!r} has {SHARDED_META} but its shard index (.metadata) is unreadable: {e}"
        ) from e
    keys = {  # our name -> the key in the shards
        k.removeprefix("model.").removeprefix(MODEL_PREFIX): k
        for k, m in entries.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    if not keys:
        raise ValueError(f"{what}: the shards in {str(p)!r} hold no 'model.*' tensors (saved by another strategy?)")
    _check_shard_sizes(p, what, getattr(index, "storage_data", None) or {}, set(keys.values()))
    specs = {name: (entries[k].size, entries[k].properties.dtype) for name, k in keys.items()}

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        return _load_shards(p, what, {keys[n]: torch.empty(specs[n][0], dtype=specs[n][1]) for n in names})

    meta = meta if isinstance(meta, dict) else {}
    hparams = meta.get("hyper_parameters") or {}
    config, vocab, source = hparams.get("config"), hparams.get("vocab"), _progress(meta)
    if lazy:
        state = {n: torch.empty(size, dtype=dtype, device="meta") for n, (size, dtype) in specs.items()}
        return PretrainedWeights(state, config, vocab, "sharded checkpoint", source, fetch)
    return PretrainedWeights(fetch(list(keys)), config, vocab, "sharded checkpoint", source)


def _check_shard_sizes(p: Path, what: str, storage: dict[Any, Any], fqns: set[str]) -> None:
    """Raise ValueError naming the shard file when one holding the tensors ``fqns`` is shorter than the shard index
    (``.metadata``) says: torch's own error for a cut file names neither the file nor the tensor. A missing file is
    left to the reader, whose error names it; an intact model part of a file cut later (in the optimizer's moments)
    reads exactly."""
    need: dict[str, tuple[int, str]] = {}  # file -> (the end of its last model tensor, that tensor)
    for item, info in storage.items():
        rel, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if getattr(item, "fqn", None) in fqns and isinstance(rel, str) and isinstance(offset, int) and length:
            end = offset + int(length)
            if end > need.get(rel, (0, ""))[0]:
                need[rel] = (end, item.fqn)
    for rel, (end, fqn) in sorted(need.items()):
        file = p / rel
        if file.is_file() and file.stat().st_size < end:
            raise ValueError(
                f"{what}: the shard {str(file)!r} is truncated: {file.stat().st_size} bytes, but the shard index "
                f"(.metadata) places {fqn!r} up to byte {end}"
            )


def _load_shards(p: Path, what: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fill ``tensors`` (keyed as in the shards) from the sharded checkpoint ``p``; returned keyed by our names."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": reading in one process is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            load(tensors, storage_reader=FileSystemReader(str(p)), no_dist=True)
        except (Exception, CheckpointException) as e:  # a missing or truncated shard file
            # CheckpointException (a BaseException) prints every rank's traceback: name the first cause only.
            cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
            raise ValueError(f"{what}: reading the shards of {str(p)!r} failed: {cause}") from e
    return {k.removeprefix("model.").removeprefix(MODEL_PREFIX): v for k, v in tensors.items()}


def _first(names: list[str], n: int = 5) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return f"{names[:n]}{more}"


def fit_state(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """``state_dict`` checked against ``model`` (every key and shape), with a tied pair completed; returned.

    ``model`` may live on the meta device: only its names and shapes are read, so a 7B checkpoint can be checked
    without allocating the network.

    Raises:
        ValueError: missing or unexpected keys, wrong shapes, an integer tensor for a floating-point parameter (or
            the reverse), or a tied pair that differs; the first few named.
    """
    tied = is_tied(model)
    state = dict(state_dict)
    if tied:
        have = [k for k in TIED if k in state]
        if len(have) == 1:
            state[TIED[1] if have[0] == TIED[0] else TIED[0]] = state[have[0]]
        elif len(have) == 2 and not state[TIED[0]].is_meta and not torch.equal(state[TIED[0]], state[TIED[1]]):
            raise ValueError(f"{what}: {TIED[0]!r} and {TIED[1]!r} differ, but the model ties them")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = {
        k: (tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    }
    # Any floating dtype converts to the model's; an integer or bool tensor (a quantized file) would be cast to
    # float and loaded as nonsense.
    dtypes = {
        k: (str(v.dtype).removeprefix("torch."), str(expected[k].dtype).removeprefix("torch."))
        for k, v in state.items()
        if k in expected and v.is_floating_point() != expected[k].is_floating_point()
    }
    if missing or unexpected or shapes or dtypes:
        problems = []
        if missing:
            problems.append(f"missing keys {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_first(unexpected)}")
        if shapes:
            first = dict(list(shapes.items())[:5])
            problems.append(
                f"wrong shapes (file, model) {first}" + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else "")
            )
        if dtypes:
            first = dict(list(dtypes.items())[:5])
            problems.append(
                f"wrong dtypes (file, model) {first}" + (f" (+{len(dtypes) - 5} more)" if len(dtypes) > 5 else "")
            )
        raise ValueError(f"{what}: the weights do not fit the model: " + "; ".join(problems))
    return state


def is_tied(model: nn.Module) -> bool:
    """True when ``model`` shares one tensor between the token embedding and the LM head (:data:`TIED`)."""
    return all(hasattr(model, name.split(".")[0]) for name in TIED) and model.lm_head.weight is model.wte.weight


CHUNK_BYTES = 1 << 28
"""The most bytes of tensors read at once from a lazy source (:func:`load_weights`, ``cm3leon export``): 256 MiB,
the token embedding of the 350m preset in float32 (a larger tensor, 7B's 1 GiB embedding, is read alone)."""


def chunk_names(state: dict[str, Tensor], max_bytes: int | None = None) -> list[list[str]]:
    """The names of ``state`` in order, grouped so each group holds at most ``max_bytes`` (default
    :data:`CHUNK_BYTES`; a larger tensor alone)."""
    max_bytes = max_bytes or CHUNK_BYTES
    groups: list[list[str]] = []
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if not groups or size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def tensor_reader(
    file_state: dict[str, Tensor], fetch: Callable[[Sequence[str]], dict[str, Tensor]] | None
) -> Callable[[Sequence[str]], dict[str, Tensor]]:
    """A function reading named tensors of a file (through ``fetch`` when lazy), where a tied pair completed by
    :func:`fit_state` is read under the one name the file holds."""
    alias = {a: b for a, b in (TIED, TIED[::-1]) if a not in file_state and b in file_state}

    def read(names: Sequence[str]) -> dict[str, Tensor]:
        wanted = [alias.get(n, n) for n in names]
        got = fetch(wanted) if fetch is not None else {k: file_state[k] for k in wanted}
        return {n: got[w] for n, w in zip(names, wanted)}

    return read


def load_weights(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    what: str,
    fetch: Callable[[Sequence[str]], dict[str, Tensor]] | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Load ``state_dict`` into ``model`` after checking every key and shape (:func:`fit_state`), keeping tied
    embeddings tied.

    A file may hold only one of the tied pair (:data:`TIED`; ``safetensors.torch.save_model`` and ``cm3leon export``
    drop the duplicate). When the model was built on the meta device (an empty-init context, as FSDP's), its
    parameters have no storage to copy into, so the loaded tensors become the parameters (``assign=True``), copied in
    the dtype the model was built in, and the tie is restored (assigning gives each name its own parameter). The
    tensors are read :data:`CHUNK_BYTES` at a time, so a lazy source (``read_weights(..., lazy=True)``) never has
    more than that in memory beside the model.

    Args:
        model: the freshly built network; a module whose ``lm_head.weight is wte.weight`` counts as tied.
        state_dict: the bare network's tensors, or meta tensors standing for them when ``fetch`` is given.
        what: the argument and file, named in errors.
        fetch: reads the real tensors of the names it is given (``PretrainedWeights.fetch``).
        device: where a model built on the meta device gets its parameters (default: the CPU); each chunk moves
            there as it is read, so a GPU model never has a whole copy in host memory.

    Raises:
        ValueError: as :func:`fit_state`; a lazy file's tied pair is compared too (the head read once, alone).
    """
    tied = is_tied(model)
    state = fit_state(model, state_dict, what)
    expected = model.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    file_read = tensor_reader(state_dict, fetch)
    names = [k for k in state if not (tied and k == TIED[1])]
    # fit_state compares a tied pair only when it holds the tensors: a lazy file holding both is compared here, as
    # an eager one is (else its LM head would be dropped in silence). The embedding's chunk comes first, so the
    # file is refused before anything is loaded, and the head is read alone, once.
    check_tie = tied and all(k in state_dict for k in TIED) and any(state_dict[k].is_meta for k in TIED)
    if check_tie:
        names = [TIED[0], *(k for k in names if k != TIED[0])]

    def read(chunk: Sequence[str]) -> dict[str, Tensor]:
        part = file_read(chunk)
        if check_tie and TIED[0] in part and not torch.equal(part[TIED[0]], file_read([TIED[1]])[TIED[1]]):
            raise ValueError(f"{what}: {TIED[0]!r} and {TIED[1]!r} differ, but the model ties them")
        return part

    chunks = chunk_names({k: state[k] for k in names})
    if not on_meta:
        with torch.no_grad():
            for chunk in chunks:
                for k, v in read(chunk).items():
                    expected[k].copy_(v)  # state_dict() tensors share the parameters' storage
        return
    # copy=True: the tensors may map the file (torch.load(mmap=True)), which must not back live parameters.
    loaded = {}
    for chunk in chunks:
        part = read(chunk)
        loaded.update({k: v.to(device=device or "cpu", dtype=expected[k].dtype, copy=True) for k, v in part.items()})
        del part
    if tied:
        loaded[TIED[1]] = loaded[TIED[0]]
    model.load_state_dict(loaded, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.wte.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: still on the meta device after loading: {_first(left)}")
