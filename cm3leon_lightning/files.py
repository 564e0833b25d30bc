"""Files written whole, text / JSON-lines files read line by line with their line numbers, and output directories
that a rerun with other settings may not overwrite.

Writing: into a temporary file beside the target, renamed over it only once complete.

A killed or failed write then leaves the old file (or none), never a truncated one, and a writer may read the old
file while it writes the new (a model directory re-saved from its own lazily read weights). The temporary name holds
the process id, so two processes writing one target never write into each other's file. This module imports no
Lightning.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replaced_whole(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without an error it is renamed over
    ``path`` (atomic on one filesystem), else removed, ``path`` left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_whole(path: str | os.PathLike[str], data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` whole (:func:`replaced_whole`); with ``fsync``, on disk before the rename."""
    with replaced_whole(path) as tmp:
        if not fsync:
            tmp.write_bytes(data)
            return
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_whole(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` whole (:func:`replaced_whole`)."""
    write_bytes_whole(path, text.encode("utf-8"))


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with the file mode ``open`` gives, ``0o666`` less the umask: safetensors writes
    through a private temporary file (mode ``0o600``), so saved weights were unreadable by other users (a serving
    account, a shared group)."""
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` on Linux; elsewhere by setting it briefly to ``0o077``
    (never a looser mask: a file another thread creates meanwhile is private, not world-writable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def text_lines(path: str | os.PathLike[str], where: str = "") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a UTF-8 text file, counted from 1.

    Lines end at ``"\n"`` only (``str.splitlines`` also breaks at U+2028, form feeds ... which a caption or a JSON
    string may hold); a trailing ``"\r"`` is dropped, and a byte-order mark at the start.

    Raises:
        ValueError: bytes that are not UTF-8, naming ``where`` (a prefix such as ``"prompts: "``), the file and line.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{where}{path} line {line} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield n, line


def jsonl_values(path: str | os.PathLike[str], where: str = "") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file (:func:`text_lines`).

    Raises:
        ValueError: a line that is not UTF-8 or not JSON, naming ``where``, the file and line.
    """
    for n, line in text_lines(path, where):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}{path} line {n} is not JSON: {e}") from e
        yield n, value


ARGS_FILE = "args.json"
"""Where a script records the settings of its output directory (:func:`check_output_dir`)."""


def make_output_dir(out: Path, flag: str = "--out") -> None:
    """Create the output directory ``out`` (and its parents) if missing.

    Raises:
        ValueError: naming ``flag`` and ``out`` when it cannot be made (a file on its path, no permission), in place
            of an ``OSError`` traceback.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}: cannot create {out}: {e.strerror or e}") from e


def check_output_dir(
    out: Path, section: str, settings: dict[str, Any], labels: dict[str, str], fresh: bool, owner: str,
    what: str = "settings", replaces: str = "its outputs",
) -> None:  # fmt: skip
    """Check that ``out`` is new, empty, or an earlier output of ``owner`` made with the same ``settings`` (the keys of
    ``labels``, recorded under ``section`` of its :data:`ARGS_FILE`); with ``fresh``, delete such an output whatever
    its settings. The caller writes :data:`ARGS_FILE` before anything else.

    Args:
        out: the output directory.
        section: the key of ``args.json`` holding the settings (one per script, so no script takes another's output
            for its own).
        settings: this run's values.
        labels: the settings compared, each with the flag that sets it (for messages).
        fresh: delete an earlier output of ``owner`` first.
        owner: the script, for messages (``examples/sft_shapes.py``).
        what: what the settings are, for messages (``SFT data``).
        replaces: what a rerun would replace, for messages.

    Raises:
        ValueError: naming ``--out`` or ``--fresh``: a file; a non-empty directory without ``owner``'s
            ``args.json`` (never written into or deleted); an output of other settings, naming each.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a directory")
    if not any(out.iterdir()):
        return
    try:
        recorded = json.loads((out / ARGS_FILE).read_text(encoding="utf-8"))[section]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        recorded = None
    if not isinstance(recorded, dict):
        flag = "--fresh" if fresh else "--out"
        raise ValueError(
            f"{flag}: {out} is not empty and holds no {ARGS_FILE} of {owner}; refusing to write into or delete it: "
            "give a new or empty --out"
        )
    if fresh:
        shutil.rmtree(out)
        return
    differ = [k for k in labels if recorded.get(k) != settings[k]]
    if differ:
        was = ", ".join(f"{labels[k]} {recorded.get(k)}" for k in differ)
        asked = ", ".join(f"{labels[k]} {settings[k]}" for k in differ)
        raise ValueError(
            f"--out: {out} holds the output of other {what} ({was}; asked for: {asked}): rerunning would replace "
            f"{replaces}. Pass --fresh to delete it and start over, or give another --out"
        )
