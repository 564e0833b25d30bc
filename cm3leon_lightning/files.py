"""Files written whole: into a temporary file beside the target, renamed over it only once complete.

A killed or failed write then leaves the old file (or none), never a truncated one, and a writer may read the old
file while it writes the new (a model directory re-saved from its own lazily read weights). The temporary name holds
the process id, so two processes writing one target never write into each other's file. This module imports no
Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
