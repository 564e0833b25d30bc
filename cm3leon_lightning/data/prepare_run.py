"""Bookkeeping of a ``cm3leon prepare`` run: the :class:`Run` every stage receives, atomic "done" markers with the
sha256 of a directory's files, the validation split by key hash, and the kill hook the resume tests use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cm3leon_lightning.data.shards import file_sha256
from cm3leon_lightning.data.sources import PairSource
from cm3leon_lightning.files import write_text_whole

if TYPE_CHECKING:
    from cm3leon_lightning.data.prepare import PrepareConfig

DONE_FILE = "done.json"
KILL_ENV = "CM3LEON_PREPARE_KILL_AFTER"  # test hook, "<stage>:<n>": hard-exit in the middle of the (n+1)-th part


class MissingPartsError(RuntimeError):
    """A stage needs outputs of parts that are not (yet) complete: run them, or gather them from other machines."""


# ------------------------------------------------------------------------------------------------- helpers
def is_val(key: str, fraction: float, seed: int) -> bool:
    """Whether document ``key`` belongs to the held-out split (a hash of seed and key, so order-independent)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"val\x00{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (recursive, by relative path and content)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if not p.is_dir():
        raise FileNotFoundError(f"not found: {p}")
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\x00{file_sha256(f)}\n".encode())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    write_text_whole(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def seal(directory: Path) -> None:
    """Write ``done.json`` with the sha256 of every other file in ``directory`` (recursive)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != DONE_FILE)
    write_json(directory / DONE_FILE, {f.relative_to(directory).as_posix(): file_sha256(f) for f in files})


def is_sealed(directory: Path) -> bool:
    """Whether ``directory`` has a ``done.json`` whose sha256 all match (a complete, intact output)."""
    try:
        done = json.loads((directory / DONE_FILE).read_text(encoding="utf-8"))
        return all(file_sha256(directory / name) == sha for name, sha in done.items())
    except (OSError, ValueError):
        return False


def seal_digest(directory: Path) -> str | None:
    """The sha256 of ``directory``'s ``done.json`` (a digest of all its files once sealed); None without one."""
    done = directory / DONE_FILE
    return file_sha256(done) if done.is_file() else None


_done_in_process: Counter = Counter()


def reset_part_counts() -> None:
    """Forget the parts counted in this process (a new run starts)."""
    _done_in_process.clear()


def part_done(stage: str) -> None:
    """Count one finished part of ``stage`` in this process (what :func:`kill_point` counts)."""
    _done_in_process[stage] += 1


def kill_point(stage: str) -> bool:
    """Test hook (env ``CM3LEON_PREPARE_KILL_AFTER=<stage>:<n>[:raise]``): True for the part after ``n`` finished
    ones in this process, which then dies half way through (see :func:`hard_exit`)."""
    spec = os.environ.get(KILL_ENV, "").split(":")
    return len(spec) >= 2 and spec[0] == stage and _done_in_process[stage] >= int(spec[1])


class SimulatedKill(BaseException):
    """Raised by the test hook in ``raise`` mode: like a kill, nothing below catches it and nothing is cleaned up."""


def hard_exit() -> None:
    """Die like a killed process (``os._exit(137)``: no cleanup, no ``finally``), or raise :class:`SimulatedKill`
    when the hook's spec ends in ``:raise`` (in-process tests)."""
    if os.environ.get(KILL_ENV, "").endswith(":raise"):
        _done_in_process.clear()
        raise SimulatedKill(os.environ[KILL_ENV])
    os._exit(137)


@dataclass
class Run:
    """Everything a stage (in this process or a worker) needs; picklable."""

    cfg: PrepareConfig
    out: Path
    sources: dict[str, PairSource]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker_id: int = 0

    @property
    def work(self) -> Path:
        """The intermediate directory."""
        return self.out / "work"

    def n_parts(self, collection: str) -> int:
        """Number of parts of ``collection``."""
        return -(-len(self.sources[collection]) // self.cfg.samples_per_shard)

    def part_range(self, collection: str, index: int) -> tuple[int, int]:
        """Source documents ``[start, stop)`` of a part."""
        s = self.cfg.samples_per_shard
        return index * s, min((index + 1) * s, len(self.sources[collection]))

    def part_dir(self, collection: str, index: int) -> Path:
        """Where the encode stage writes a part."""
        return self.work / "parts" / f"{collection}-{index:06d}"

    def selected(self, collection: str) -> list[int]:
        """The part indices of ``collection`` that this run processes (``shard_range`` applied)."""
        n = self.n_parts(collection)
        a, b = self.cfg.shard_range or (0, n)
        return list(range(min(a, n), min(b, n)))

    def device(self) -> str:
        """The torch device of this process (workers spread over the visible GPUs)."""
        import torch

        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and torch.cuda.device_count() > 1:
            dev = f"cuda:{self.worker_id % torch.cuda.device_count()}"
        return dev


WRITE_SETTINGS = (
    "k_per_modality", "max_relevance", "duplicate_threshold", "image_duplicate_threshold", "prefer_multimodal",
    "search_k",
)  # fmt: skip
"""The settings only the write stage reads (the retrieval rules): neither the encoded parts nor the memory bank depend
on them, so they may change once those are built; the parts written with other values are then written again."""


def write_settings_digest(cfg: Any) -> str:
    """A short digest of ``cfg``'s :data:`WRITE_SETTINGS`, recorded with each written part."""
    doc = json.dumps({k: getattr(cfg, k) for k in WRITE_SETTINGS}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def write_inputs(run: Run, index: int) -> dict[str, str | None]:
    """What part ``index``'s shards are written from: the digests of its encoded part, of the memory bank and of the
    retrieval rules (:data:`WRITE_SETTINGS`)."""
    return {"part": seal_digest(run.part_dir("main", index)), "bank": seal_digest(run.work / "bank"),
            "selection": write_settings_digest(run.cfg)}  # fmt: skip
