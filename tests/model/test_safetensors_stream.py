"""The streaming safetensors writer (``model/safetensors_stream.py``): the bytes of ``safetensors.torch.save_file``,
one tensor held at a time, and a broken promise caught."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cm3leon_lightning.model.safetensors_stream import header_bytes, spec_of, write_safetensors


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "brain": torch.randn(2, 3, generator=g).bfloat16(),
        "ids": torch.arange(4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "count": torch.arange(3, dtype=torch.int32),  # as wide as float32, named before "strided", written after it
        "double": torch.randn(2, generator=g).double(),  # as wide as int64, named before "ids", written after it
    }


SAFETENSORS_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
                      torch.float32, torch.float64, torch.int64]  # fmt: skip
"""safetensors' own order of dtypes (its ``Dtype`` enum): by width, not only."""


def save_file_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """safetensors' own order: dtype descending in :data:`SAFETENSORS_DTYPES`, then name (the module docstring's
    "dtype width descending" put an int32 tensor before a float32 one of a later name, unlike ``save_file``)."""
    return sorted(tensors, key=lambda k: (-SAFETENSORS_DTYPES.index(tensors[k].dtype), k))


def test_same_bytes_as_save_file(tmp_path: Path) -> None:
    tensors = mixed()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", {"format": "pt"})
    order = save_file_order(tensors)
    size = write_safetensors(
        tmp_path / "ours.safetensors",
        [spec_of(k, tensors[k]) for k in order],
        ((k, tensors[k]) for k in order),
        {"format": "pt"},
    )
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert size == len(ours)


def test_any_order_reads_back_with_metadata(tmp_path: Path) -> None:
    tensors = mixed()
    order = sorted(tensors, reverse=True)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [spec_of(k, tensors[k]) for k in order], ((k, tensors[k]) for k in order), {"a": "b"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "b"}


def test_each_tensor_is_dropped_before_the_next_is_asked_for(tmp_path: Path) -> None:
    specs = [(f"t{i}", (256, 256), torch.float32) for i in range(6)]
    refs: list[weakref.ref] = []

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape, _ in specs:
            gc.collect()
            assert all(r() is None for r in refs), "an earlier tensor is still alive"
            t = torch.full(shape, float(len(refs)))
            refs.append(weakref.ref(t))
            yield name, t
            del t

    write_safetensors(tmp_path / "x.safetensors", specs, produce())
    back = load_file(tmp_path / "x.safetensors")
    assert [float(back[n][0, 0]) for n, _, _ in specs] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_tensor_unlike_the_header_is_refused(tmp_path: Path) -> None:
    specs = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    cases = {
        "name": [("a", torch.zeros(2)), ("c", torch.zeros(3))],
        "shape": [("a", torch.zeros(2)), ("b", torch.zeros(4))],
        "dtype": [("a", torch.zeros(2)), ("b", torch.zeros(3, dtype=torch.float16))],
    }
    for what, given in cases.items():
        with pytest.raises(ValueError, match=r"tensor 1 is \(.*\), the header announced \('b', \(3,\)"):
            write_safetensors(tmp_path / f"{what}.safetensors", specs, iter(given))
    with pytest.raises(ValueError, match="2 tensors announced, 1 given"):
        write_safetensors(tmp_path / "few.safetensors", specs, iter([("a", torch.zeros(2))]))
    extra = [("a", torch.zeros(2)), ("b", torch.zeros(3)), ("c", torch.zeros(1))]
    with pytest.raises(ValueError, match="more tensors given than the 2 announced"):
        write_safetensors(tmp_path / "many.safetensors", specs, iter(extra))


def test_bad_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="tensor 'a' appears twice"):
        header_bytes([("a", (1,), torch.float32), ("a", (1,), torch.float32)])
    with pytest.raises(ValueError, match="tensor 'z': safetensors cannot store torch.complex64"):
        header_bytes([("z", (1,), torch.complex64)])
    with pytest.raises(ValueError, match="metadata must map str to str"):
        header_bytes([], {"step": 3})  # type: ignore[dict-item]
    head = header_bytes([("a", (3,), torch.bfloat16)], {"format": "pt"})
    assert len(head) % 8 == 0 and int.from_bytes(head[:8], "little") == len(head) - 8
