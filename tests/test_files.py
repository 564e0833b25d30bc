"""cm3leon_lightning.files: a file is replaced only by a complete new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cm3leon_lightning.files import replaced_whole, write_bytes_whole, write_text_whole


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"), replaced_whole(target) as tmp:
        assert tmp.parent == tmp_path and str(os.getpid()) in tmp.name  # beside it, one per process
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    with replaced_whole(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # the old file stays readable while the new one is written
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_bytes_and_text_are_written_whole(tmp_path: Path) -> None:
    write_bytes_whole(tmp_path / "a.bin", b"\x00\x01", fsync=True)
    write_bytes_whole(tmp_path / "b.bin", b"\x02")
    write_text_whole(tmp_path / "c.json", '{"é": 1}\n')
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "b.bin").read_bytes() == b"\x02"
    assert (tmp_path / "c.json").read_bytes() == '{"é": 1}\n'.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin", "c.json"]
