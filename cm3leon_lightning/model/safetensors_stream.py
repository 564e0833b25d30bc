"""Writing a ``.safetensors`` file one tensor at a time, so exporting a model never holds all of it in memory.

``safetensors.torch.save_file`` takes a dict of every tensor and copies each to bytes before writing: exporting a 7B
model in bfloat16 held 14 GB of converted weights plus their byte copies. The format lets a writer do better: an
8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
bytes in that order. The header needs only names, shapes and dtypes, so it is written first and each tensor is
produced, written and dropped in turn. Given the tensors in ``save_file``'s order (dtype descending in
safetensors' own order of dtypes, ``I64 F64 F32 I32 BF16 F16 I16 I8 U8 BOOL``, which is by width but not only: an
``I32`` tensor comes after every ``F32`` one; then name), the file is byte-for-byte ``save_file``'s (tested); any order
reads back the same.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
"""safetensors' name of each dtype a model may hold."""

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
"""``(name, shape, dtype)`` of one tensor of the file, in the order it is written."""


def spec_of(name: str, tensor: Tensor) -> TensorSpec:
    """The :data:`TensorSpec` of ``tensor`` (real or on the meta device) under ``name``."""
    return name, tuple(tensor.shape), tensor.dtype


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``specs`` in that order, padded with spaces to a multiple
    of 8 bytes as ``save_file`` pads it.

    Raises:
        ValueError: a repeated name, a dtype safetensors cannot store, or metadata that is not ``str -> str``.
    """
    doc: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {metadata!r}")
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in specs:
        if name in doc:
            raise ValueError(f"tensor {name!r} appears twice")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: safetensors cannot store {dtype}")
        size = _numel(shape) * dtype.itemsize
        doc[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``tensors`` to ``path`` as safetensors, holding one at a time; returns the file's size in bytes.

    Args:
        path: the file to write (replaced).
        specs: every tensor's name, shape and dtype, in the order ``tensors`` yields them: the header is written
            from these before the first tensor is asked for.
        tensors: ``(name, tensor)`` pairs, typically a generator that reads or converts each only when asked; any
            device, any strides.
        metadata: the header's ``__metadata__`` (``{"format": "pt"}`` for torch).

    Raises:
        ValueError: a tensor that differs from its spec (name, shape or dtype), or too many or too few tensors; the
            file is then incomplete and must be discarded (``cm3leon export`` writes into a directory it renames
            only when complete).
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise RuntimeError("safetensors stores little-endian bytes; this writer runs on little-endian machines only")
    head = header_bytes(specs, metadata)
    written = 0
    with Path(path).open("wb") as f:
        f.write(head)
        it = iter(tensors)
        for i, expected in enumerate(specs):
            item = next(it, None)
            if item is None:
                raise ValueError(f"{path}: {len(specs)} tensors announced, {i} given")
            got = spec_of(*item)
            if got != expected:
                raise ValueError(f"{path}: tensor {i} is {got}, the header announced {expected}")
            data = item[1].detach().cpu().contiguous().reshape(-1)
            written += f.write(memoryview(data.view(torch.uint8).numpy()))
            del item, data
        if next(it, None) is not None:
            raise ValueError(f"{path}: more tensors given than the {len(specs)} announced")
    return len(head) + written


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
