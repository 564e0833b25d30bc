"""cm3leon_lightning.files: a file is replaced only by a complete new one; text and JSON lines are read with their
line numbers, split at newlines only."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cm3leon_lightning.files import (
    check_output_dir,
    current_umask,
    jsonl_values,
    replaced_whole,
    save_safetensors,
    text_lines,
    write_bytes_whole,
    write_text_whole,
)


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


def test_json_lines_split_at_newlines_only_and_name_the_bad_line(tmp_path: Path) -> None:
    """A JSON string may hold U+2028 or U+0085 unescaped; str.splitlines() broke such a line in two (the VQA
    reader then failed with "not valid JSON" on a file that was)."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"q": "a\xe2\x80\xa8b\xc2\x85c"}\r\n\n  \n[1, 2]\n')  # BOM, CRLF, blank lines
    assert list(jsonl_values(path)) == [(1, {"q": "a\u2028b\x85c"}), (4, [1, 2])]
    assert [n for n, _ in text_lines(path)] == [1, 4]
    path.write_bytes(b'{"q": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"^where: .*rows.jsonl line 2 is not JSON: Expecting property name"):
        list(jsonl_values(path, "where: "))
    path.write_bytes(b'{"q": 1}\n{"q": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 2 is not UTF-8 text: invalid continuation byte at byte 19"):
        list(text_lines(path))


def test_an_output_dir_is_reused_only_by_the_same_settings_of_its_own_script(tmp_path: Path) -> None:
    labels = {"pairs": "--pairs", "seed": "--seed"}

    def check(out: Path, fresh: bool = False, **settings: int) -> None:
        check_output_dir(out, "data", {"pairs": 4, "seed": 0, **settings}, labels, fresh, "ex.py", "data", "its data")

    check(tmp_path / "new")  # absent and empty directories are free
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out: .*file is a file, not a directory$"):
        check(tmp_path / "file")
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    (theirs / "weights.bin").write_text("keep me")
    (mine / "args.json").write_text('{"data": {"pairs": 4, "seed": 0}}')
    for fresh, flag in ((False, "--out"), (True, "--fresh")):
        with pytest.raises(ValueError, match=rf"^{flag}: .*theirs is not empty and holds no args.json of ex.py; "):
            check(theirs, fresh)
    assert (theirs / "weights.bin").read_text() == "keep me"
    check(mine)  # the same settings: a rerun
    with pytest.raises(ValueError, match=r"other data \(--pairs 4, --seed 0; asked for: --pairs 5, --seed 1\): rerun"):
        check(mine, pairs=5, seed=1)
    check(mine, True, pairs=5)  # --fresh deletes its own earlier output
    assert not mine.exists()


def test_make_output_dir_names_the_flag_when_a_file_blocks_it(tmp_path: Path) -> None:
    """The examples and the demo printed a NotADirectoryError traceback for an --out below a file."""
    from cm3leon_lightning.files import make_output_dir

    (tmp_path / "afile").write_text("x")
    want = rf"^--dir: cannot create {re.escape(str(tmp_path))}/afile/sub: Not a directory$"
    with pytest.raises(ValueError, match=want):
        make_output_dir(tmp_path / "afile" / "sub", "--dir")
    make_output_dir(tmp_path / "a" / "b")
    make_output_dir(tmp_path / "a" / "b")  # exists: fine
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_safetensors_have_the_mode_open_gives(tmp_path: Path, umask: int) -> None:
    """safetensors wrote mode 0o600 whatever the umask: a VQGAN or CLIP saved by one account could not be read by
    the serving one. The mode is now 0o666 less the umask, as any file ``open`` creates; the tensors are intact."""
    import torch
    from safetensors.torch import load_file

    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.arange(6.0)}, tmp_path / "w.safetensors", metadata={"format": "pt"})
        (tmp_path / "plain").write_bytes(b"")
        assert current_umask() == umask  # read, not changed
    finally:
        os.umask(previous)
    mode = (tmp_path / "w.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain").stat().st_mode & 0o777
    assert load_file(tmp_path / "w.safetensors")["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
