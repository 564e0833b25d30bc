"""Reading a Hugging Face (OPT) layout directory a few tensors at a time, as our own layout is read.

``read_weights(..., lazy=True)`` on a directory of ``cm3leon export --format hf`` used to read every tensor at once
(OPT's names must be mapped back, and each layer's query, key and value projections joined into our fused ``qkv``),
so loading one held the whole file and every layer's joined ``qkv`` (3 GB at 7B in bfloat16) beside the loaded
network. Here :func:`~.hf_opt.from_opt` runs on meta tensors
(so every check it makes, and its names, shapes and dtypes, are the eager read's), and ``fetch(names)`` reads only
the OPT entries those names come from (three for a ``qkv``), then joins them with the same :func:`~.hf_opt.from_opt`,
so the tensors are bitwise the eager read's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Fetch = Callable[[Sequence[str]], dict[str, Tensor]]
"""Reads the real tensors of the names it is given (``PretrainedWeights.fetch``)."""


def read_hf_lazy(path: str | os.PathLike[str], what: str = "path") -> tuple[dict[str, Tensor], Fetch, dict[str, Any]]:
    """Our state dict as meta tensors, a function reading named tensors, and the ``"cm3leon"`` block of a directory
    ``save_pretrained(..., layout="hf")`` wrote (:func:`~.pretrained.read_hf` without reading the weights).

    Raises:
        FileNotFoundError, ValueError: as :func:`~.pretrained.read_hf`, from the files' headers alone.
    """
    from cm3leon_lightning.model.pretrained import read_hf_block, read_opt_weights

    block = read_hf_block(path, what)
    opt_state, opt_fetch, where = read_opt_weights(path, what, lazy=True)
    assert opt_fetch is not None  # lazy=True
    return (*joined_reader(opt_state, opt_fetch, block["config"], where), block)


def opt_sources(name: str) -> list[str]:
    """The OPT tensors :func:`~.hf_opt.from_opt` makes our tensor ``name`` from (``q``/``k``/``v`` for a fused
    ``qkv``); a name it passes on as it is (an ``lm_head.weight`` beside a tied embedding, an OPT name the mapping
    does not take) comes from itself.

    The forward mapping :func:`~.hf_opt.opt_tensors` names them: called on a placeholder, as only the names matter.
    """
    from cm3leon_lightning.model.hf_opt import opt_tensors

    try:
        theirs = opt_tensors(name, torch.empty(3, 1, device="meta"), {"d_model": 1, "tie_embeddings": False})
    except ValueError:  # not one of our names: from_opt passed it on under its own
        return [name]
    return list(theirs)


def joined_reader(
    opt_state: dict[str, Tensor], opt_fetch: Fetch, config: dict[str, Any], what: str
) -> tuple[dict[str, Tensor], Fetch]:
    """Our meta state dict for OPT's meta tensors ``opt_state``, and a function reading our named tensors through
    ``opt_fetch``, which is asked for only the entries they come from (:func:`opt_sources`).

    Raises:
        ValueError: as :func:`~.hf_opt.from_opt` (a missing or misshapen tensor, a damaged ``config``), at once.
    """
    from cm3leon_lightning.model.hf_opt import from_opt

    state = from_opt(opt_state, config, what)  # names, shapes, dtypes and every check; no tensor is read

    def fetch(names: Sequence[str]) -> dict[str, Tensor]:
        unknown = [n for n in names if n not in state]
        if unknown:
            raise KeyError(f"{what}: no tensor {unknown[0]!r} in the weights")
        read = opt_fetch(list(dict.fromkeys(s for n in names for s in opt_sources(n))))
        joined = from_opt({**opt_state, **read}, config, what)  # the eager read's very operations
        del read
        if any(joined[n].is_meta for n in names):  # pragma: no cover - opt_sources disagrees with from_opt
            raise RuntimeError(f"{what}: {[n for n in names if joined[n].is_meta]} were not read")
        return {n: joined[n] for n in names}

    return state, fetch
