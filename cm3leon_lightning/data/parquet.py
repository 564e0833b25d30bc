"""Image-caption pairs from Parquet files: the layout of image-caption datasets on the Hugging Face Hub and of
img2dataset's Parquet output with embedded images (``cm3leon prepare --source parquet``).

An image column may hold encoded bytes (``binary``), a path (``string``, relative to the Parquet file's directory) or
``datasets``' ``Image`` feature (a struct of ``bytes`` and ``path``; bytes win). A caption column holds a string or a
list of strings (the first one with text is taken, as ``coco --coco-mode first`` does). Files are read in sorted order
and rows in file order; a range is read one row group at a time, only the needed columns, so memory stays at one row
group. Keys come from ``key_column`` (a null value: the default key) or are ``{file}-{row:07d}``, made
WebDataset-safe by :func:`~cm3leon_lightning.data.sources.document_key`, where ``{file}`` is the file's path without
``.parquet`` relative to the folder holding all the files: the stem when they are in one folder, ``en/train-0`` and
``de/train-0`` (``en_train-0-0000000``...) for the configurations of a Hub dataset, whose file names repeat. Needs
``pyarrow`` (the ``parquet`` extra).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon_lightning.data.sources import PairSource, RawPair, _has_text, document_key, stat_fingerprint


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the dev extra
        raise ImportError("--source parquet needs pyarrow: pip install 'cm3leon_lightning[parquet]'") from e
    return pq


def list_parquet(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Parquet files named by a directory (``*.parquet`` under it, recursive), a glob pattern or a list, sorted.

    Raises:
        FileNotFoundError: nothing matches.
    """
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if p.is_dir():
            files = sorted(p.rglob("*.parquet"))
        elif p.is_file():
            files = [p]
        else:
            files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True))
    else:
        files = [Path(f) for f in spec]
    if not files:
        raise FileNotFoundError(f"--input: no Parquet files at {spec}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--input: Parquet files not found: {missing[:5]}")
    return files


def file_names(files: Sequence[Path]) -> list[str]:
    """Each file's path relative to the deepest folder holding them all, in POSIX form (``a.parquet`` when they are
    in one folder; ``en/train.parquet``, ``de/train.parquet`` when they are not): distinct for distinct files, where
    file names alone repeat across the folders of a Hub dataset's configurations."""
    folders = [os.path.abspath(f.parent) for f in files]
    base = os.path.commonpath(folders) if folders else ""
    return [Path(os.path.relpath(os.path.abspath(f), base)).as_posix() for f in files]


class ParquetSource(PairSource):
    """Parquet files with an image column and a caption column (see the module docstring).

    Args:
        files: a directory, a glob pattern or a list of ``.parquet`` files.
        image_column: the column holding the image (bytes, path, or ``{bytes, path}``).
        caption_column: the column holding the caption (string or list of strings).
        key_column: a column of stable ids (None: ``{file}-{row}``, the file's path relative to the folder of all
            the files, without ``.parquet``).

    Raises:
        FileNotFoundError: no files.
        ValueError: an unreadable file, or a column missing or of an unsupported type, naming the file, the column
            and the columns it has.
    """

    kind = "parquet"

    def __init__(
        self,
        files: str | Path | Sequence[str | Path],
        image_column: str = "image",
        caption_column: str = "caption",
        key_column: str | None = None,
    ) -> None:
        pq = _pyarrow()
        self.files = list_parquet(files)
        self.names = file_names(self.files)  # in keys and skip records: file names repeat across folders
        self.image_column, self.caption_column, self.key_column = image_column, caption_column, key_column
        self.row_groups: list[list[int]] = []  # rows per row group, per file
        for f in self.files:
            try:
                meta = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow's own error types for a damaged file
                raise ValueError(f"--input: {f} is not a readable Parquet file: {e}") from e
            self._check_columns(f, meta.schema_arrow)
            self.row_groups.append([meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)])
        counts = [sum(groups) for groups in self.row_groups]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _check_columns(self, path: Path, schema: Any) -> None:
        import pyarrow as pa

        names = list(schema.names)
        text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
        kinds = {
            self.image_column: ("image", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                or pa.types.is_string(t) or pa.types.is_large_string(t)
                                or (pa.types.is_struct(t) and {"bytes", "path"} & {t.field(i).name
                                                                                    for i in range(t.num_fields)})),
            self.caption_column: ("caption", lambda t: text(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t))
                                                                   and text(t.value_type))),
        }  # fmt: skip
        if self.key_column is not None:
            kinds[self.key_column] = ("key", lambda t: text(t) or pa.types.is_integer(t))
        for column, (role, ok) in kinds.items():
            if column not in names:
                raise ValueError(f"--input: {path} has no {role} column {column!r}; its columns: {names}")
            kind = schema.field(column).type
            if not ok(kind):
                raise ValueError(f"--input: {path} column {column!r} ({role}) has the unsupported type {kind}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "files": [str(f) for f in self.files], "image_column": self.image_column,
               "caption_column": self.caption_column, "key_column": self.key_column,
               "counts": [sum(g) for g in self.row_groups], "count": len(self),
               "fingerprint": self.fingerprint()}  # fmt: skip
        if self.key_column is None and any("/" in n for n in self.names):
            # files in several folders are keyed by their relative path since the fix of colliding keys: a
            # preparation begun by an earlier version (keyed by file stem, recording no scheme) is refused on resume
            out["keys"] = "relative path"
        return out

    def fingerprint(self) -> str:
        """The Parquet files' names, sizes and modification times (see :meth:`PairSource.fingerprint`)."""
        return stat_fingerprint((str(f), [f]) for f in self.files)

    def _rows(self, start: int, stop: int, columns: list[str]) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(file index, row in file, {column: value})`` for the source rows ``start .. stop - 1``."""
        pq = _pyarrow()
        import pyarrow as pa

        start, stop = self._check_range(start, stop, len(self))
        first = max(int(np.searchsorted(self.offsets, start, side="right")) - 1, 0)
        for f in range(first, len(self.files)):
            if self.offsets[f] >= stop:
                break
            reader, base = pq.ParquetFile(self.files[f]), int(self.offsets[f])
            for g, n in enumerate(self.row_groups[f]):
                lo, hi = max(start - base, 0), min(stop - base, n)
                if lo < hi:
                    try:
                        table = reader.read_row_group(g, columns=columns).slice(lo, hi - lo)
                    except (OSError, ValueError, pa.ArrowException) as e:  # a damaged data page
                        first_row, reason = base - int(self.offsets[f]), " ".join(str(e).split())[:200]
                        raise ValueError(
                            f"{self.files[f]}: row group {g} (rows {first_row}..{first_row + n - 1}) cannot be read "
                            f"({type(e).__name__}: {reason}); the file is damaged (an interrupted download or copy?): "
                            f"copy it again"
                        ) from e
                    for j, row in enumerate(table.to_pylist()):
                        yield f, base - int(self.offsets[f]) + lo + j, row
                base += n

    def _key(self, f: int, row: int, values: dict[str, Any]) -> str:
        """The key of row ``row`` of file ``f`` (``values`` holds the key column, if any)."""
        key = values[self.key_column] if self.key_column is not None else None
        if key is None:  # no key column, or a null id: the file's row
            key = f"{self.names[f].removesuffix(self.files[f].suffix)}-{row:07d}"
        return document_key(key)

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        columns = [self.image_column, self.caption_column] + ([self.key_column] if self.key_column else [])
        for f, row, values in self._rows(start, stop, columns):
            meta = {"file": self.names[f], "row": row}
            yield RawPair(self._key(f, row, values), _caption(values[self.caption_column]),
                          _image(values[self.image_column], self.files[f].parent), meta)  # fmt: skip

    def captions(self) -> Iterator[str | bytes | None]:
        """Every caption in order, reading only the caption column."""
        for _, _, values in self._rows(0, len(self), [self.caption_column]):
            yield _caption(values[self.caption_column])

    def split_captions(self) -> Iterator[tuple[str, str | bytes | None]]:
        """Every key and caption in order, reading only the caption and key columns (not the images)."""
        columns = [self.caption_column] + ([self.key_column] if self.key_column else [])
        for f, row, values in self._rows(0, len(self), columns):
            yield self._key(f, row, values), _caption(values[self.caption_column])


def _caption(value: Any) -> str | None:
    """A caption cell's caption: a string, or a list's first caption with text (all blank: the first, counted as
    ``caption_empty`` as ``coco`` mode ``first`` counts it; none: None, ``caption_missing``)."""
    if isinstance(value, list):
        texts = [v for v in value if isinstance(v, str)]
        return next((v for v in texts if _has_text(v)), texts[0] if texts else None)
    return value


def _image(value: Any, folder: Path) -> bytes | Path | None:
    if isinstance(value, dict):  # datasets' Image feature
        return value.get("bytes") or (_image(value["path"], folder) if value.get("path") else None)
    if isinstance(value, str):
        return folder / value
    return value
