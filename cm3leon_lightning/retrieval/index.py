"""The memory bank: a faiss maximum-inner-product index over CLIP document embeddings (paper section 2.1).

"The final retrieval is done with Maximum Inner Product Search (MIPS) over the memory bank using the dense retriever
to obtain a list of candidate documents sorted by relevance score." With L2-normalised embeddings the inner product
is the cosine similarity, the relevance score the selection rules of :mod:`cm3leon_lightning.retrieval.select` read.

On disk a bank is a directory: ``index.faiss`` (the faiss index), ``keys.json`` (document key of each row id) and
``meta.json`` (format_version, CLIP model name, dimension, count, normalisation, factory string, metric), checked on
load. :meth:`MemoryBank.save` refuses a directory that already holds a bank unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

FORMAT_VERSION = 1
INDEX_FILE, KEYS_FILE, META_FILE = "index.faiss", "keys.json", "meta.json"


class SearchResult(NamedTuple):
    """Top-k hits per query, best first.

    Attributes:
        scores: ``(Q, k)`` float32 inner products (cosine when normalised); ``-inf`` where there is no hit.
        ids: ``(Q, k)`` int64 row ids into the bank; ``-1`` where there is no hit.
        keys: ``Q`` lists of document keys, shorter than ``k`` where the bank has fewer hits.
    """

    scores: np.ndarray
    ids: np.ndarray
    keys: list[list[str]]


def _on_disk_lists(index: faiss.Index) -> bool:
    """Whether ``index`` is an IVF index whose lists are memory-mapped from its file (``load(mmap=True)``).

    faiss maps those lists read-only: adding to them fails, at times by aborting the whole process (the C++ exception
    is thrown inside an OpenMP region), and ``write_index`` writes a reference to the mapped file, not the lists.
    """
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """Device, inode, size and modification time of ``path``: they change when the file is replaced or rewritten."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from e


_META_TYPES: dict[str, type] = {
    "model_name": str,
    "dim": int,
    "count": int,
    "normalize": bool,
    "factory": str,
    "metric": str,
}


def bank_model_name(path: str | os.PathLike[str]) -> str:
    """The CLIP model name a saved bank records (``meta.json``'s ``model_name``), without reading its index: what
    its queries must be embedded with.

    Raises:
        FileNotFoundError: ``path`` holds no ``meta.json`` (the message points at a ``cm3leon prepare`` output's bank,
            ``work/bank/index``, when ``path`` is that output or one of its splits).
        ValueError: ``meta.json`` is not a JSON object with a string ``model_name``.
    """
    src = Path(path)
    if not (src / META_FILE).is_file():
        raise FileNotFoundError(f"memory bank {src} has no {META_FILE}{_bank_hint(src)}")
    meta = _read_json(src / META_FILE, "a JSON object")
    name = meta.get("model_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{src / META_FILE}: field 'model_name' must be a str, got {name!r}")
    return name


def _bank_hint(src: Path) -> str:
    """Where the bank is when ``src`` is a ``cm3leon prepare`` output directory or one of its splits (its bank is
    ``work/bank/index``); else nothing."""
    for root in (src, src.parent):
        bank = root / "work" / "bank" / "index"
        if (bank / META_FILE).is_file():
            return f" (the memory bank of a cm3leon prepare output is {bank})"
    return ""


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _check_search_params(nprobe: int | None, ef_search: int | None) -> None:
    """Refuse an ``nprobe`` or ``ef_search`` below 1 (``None``: not set), naming it."""
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and not (isinstance(value, numbers.Integral) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class MemoryBank:
    """A faiss inner-product index with row ids mapped to document keys.

    Args:
        dim: embedding dimension (512 for ViT-B-32).
        model_name: the CLIP model that produced the embeddings; recorded and checked on load.
        factory: faiss ``index_factory`` string. ``"Flat"`` (default) is exact search; for large banks use
            ``"IVF{nlist},SQ8"`` (4x smaller, needs :meth:`train`), ``"HNSW32"`` (graph, no training, more memory
            than Flat) or ``"IVF{nlist},PQ{m}"`` (smallest, lowest recall). On clustered 512-d vectors
            (benchmarks/retrieval.py, 100k) recall@10 was 0.98 for IVF-SQ8, 0.996 for HNSW32 and 0.40 for IVF-PQ64.
        normalize: L2-normalise embeddings on add and queries on search, so inner product = cosine.
        nprobe: IVF lists visited per query (recall/speed trade-off; ignored by other indexes).
        ef_search: HNSW candidate list size per query (ignored by other indexes).
    """

    def __init__(
        self,
        dim: int,
        model_name: str,
        factory: str = "Flat",
        normalize: bool = True,
        nprobe: int = 32,
        ef_search: int = 128,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        _check_search_params(nprobe, ef_search)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"factory={factory!r} is not a valid faiss index_factory string: {e}") from e
        if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):  # faiss refuses add(): "use add_with_ids"
            raise ValueError(f"factory={factory!r}: the bank numbers its rows itself; drop the IDMap prefix")
        self._init(index, dim, model_name, factory, normalize, [])
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    def _init(
        self, index: faiss.Index, dim: int, model_name: str, factory: str, normalize: bool, keys: list[str]
    ) -> None:
        self.index, self.dim, self.model_name = index, dim, model_name
        self.factory, self.normalize, self.keys = factory, normalize, keys
        self._key_set = set(keys)
        self._source: Path | None = None  # the index file an mmap-loaded IVF index maps its lists from
        self._source_identity: tuple[int, int, int, int] | None = None  # that file's, when it was loaded

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index is ready for :meth:`add` (Flat and HNSW always are; IVF/PQ need :meth:`train`)."""
        return bool(self.index.is_trained)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set the approximate-search knobs (IVF ``nprobe``, HNSW ``efSearch``) where the index has them.

        faiss's ``ParameterSpace`` finds them inside wrappers too (``"PCA64,HNSW32"``, a refined IVF, an HNSW
        coarse quantizer), where the HNSW of a pre-transformed index used to keep faiss's default ``efSearch`` of 16.

        Raises:
            ValueError: a value below 1 (an ``efSearch`` of 0 returned one hit per query, ``nprobe`` 0 a C++ error).
        """
        _check_search_params(nprobe, ef_search)
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is not None:
                try:
                    space.set_index_parameter(self.index, name, float(value))
                except RuntimeError:  # "could not set parameter": this index has no such knob
                    pass

    def _check(self, x: np.ndarray, what: str, first_row: int = 0, keys: Sequence[str] = ()) -> np.ndarray:
        """``x`` as contiguous float32 ``(N, dim)``, normalised if the bank normalises.

        A row with NaN or inf is refused (faiss would store it and never return it, or return nothing for such a
        query); the error numbers rows from ``first_row`` and names the row's key when ``keys`` (of ``x``) are given.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (N, {self.dim}), got {x.shape}")
        x = np.asarray(x, dtype=np.float32)  # float16 beyond its range is already inf; float64 may overflow here
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            row = int(bad[0])
            key = f" (document key {keys[row]!r})" if len(keys) else ""
            raise ValueError(f"{what} row {first_row + row}{key} has NaN or infinite values ({bad.size} such rows)")
        x = _l2_normalize(x) if self.normalize else x
        return np.ascontiguousarray(x)

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse quantizer / product quantizer on a representative sample (no-op for Flat and HNSW).

        Args:
            sample: ``(S, dim)`` embeddings; IVF needs at least ``nlist`` rows (faiss advises 30-256 per list), PQ
                with 8-bit codes at least 256.

        Raises:
            ValueError: the sample has the wrong shape or NaN/inf values, or is too small for the index (faiss's
                reason included).
        """
        if self.is_trained:
            return
        x = self._check(sample, "sample")
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and len(x) < ivf.nlist:
            raise ValueError(
                f"training sample has {len(x)} rows, fewer than the {ivf.nlist} IVF lists of {self.factory}"
            )
        try:
            self.index.train(x)
        except RuntimeError as e:  # faiss's C++ assertions, e.g. fewer rows than a product quantizer's 256 centroids
            reason = str(e).rsplit("failed: ", 1)[-1].strip()
            raise ValueError(f"training {self.factory!r} on a sample of {len(x)} rows failed: {reason}") from e

    def add(self, embeddings: np.ndarray, keys: Sequence[str], batch_size: int = 65536) -> None:
        """Append embeddings with their document keys; row ids continue from ``len(self)``.

        Args:
            embeddings: ``(N, dim)`` array, may be a float16 ``np.memmap``: it is converted ``batch_size`` rows at a
                time so memory stays bounded by the index itself.
            keys: N unique document keys (non-empty, no newline).
            batch_size: rows converted and added per faiss call.

        Raises:
            ValueError: the index is untrained or memory-mapped read-only, the shapes or keys are wrong (``keys`` a
                single ``str`` included; checked before anything is added), or a row has NaN/inf values (its row and
                key named; the batches before its batch were added, with their keys).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.is_trained:
            raise ValueError(f"index {self.factory!r} must be trained before adding: call train(sample) first")
        if _on_disk_lists(self.index):
            raise ValueError(
                f"this {self.factory!r} bank was loaded with mmap=True from {self._source}; its inverted lists are "
                "read-only: load it with mmap=False to add documents"
            )
        if isinstance(keys, str):  # its characters would become the keys when the lengths happen to agree
            raise ValueError(f"keys must be a sequence of document keys, got a single str {keys[:40]!r}")
        if len(embeddings) != len(keys):
            raise ValueError(f"got {len(embeddings)} embeddings but {len(keys)} keys")
        shape = np.shape(embeddings)  # a memmap's shape is read without loading it
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (N, {self.dim}), got {shape}")
        new: set[str] = set()
        for k in keys:  # everything is checked before the index or the key set changes: a refused call changes nothing
            if not isinstance(k, str) or not k or "\n" in k:
                raise ValueError(f"document keys must be non-empty single-line strings, got {k!r}")
            if k in self._key_set or k in new:
                raise ValueError(f"duplicate document key {k!r}")
            new.add(k)
        for i in range(0, len(keys), batch_size):
            # Keys follow each faiss call, so an error in a later batch (a failing memmap read, an interrupt) leaves
            # the rows already added with their keys: row id j always names keys[j].
            x = self._check(embeddings[i : i + batch_size], "embeddings", i, keys[i : i + batch_size])
            self.index.add(x)
            self.keys.extend(keys[i : i + batch_size])
            self._key_set.update(keys[i : i + batch_size])

    @classmethod
    def build(
        cls,
        batches: Iterable[tuple[np.ndarray, Sequence[str]]] | tuple[np.ndarray, Sequence[str]],
        dim: int,
        model_name: str,
        factory: str = "Flat",
        normalize: bool = True,
        train_sample: np.ndarray | None = None,
        nprobe: int = 32,
        ef_search: int = 128,
    ) -> MemoryBank:
        """Build a bank from one ``(embeddings, keys)`` pair or an iterable of them (streamed, bounded memory).

        Args:
            batches: ``(embeddings, keys)`` or an iterable of such pairs, e.g. chunks of a float16 memmap.
            dim: embedding dimension.
            model_name: the CLIP model name recorded in the metadata.
            factory: faiss factory string (see :class:`MemoryBank`).
            normalize: L2-normalise on add and search.
            train_sample: rows to train IVF/PQ on; if ``None`` the first batch is used (it must then be big enough).
            nprobe: IVF ``nprobe``.
            ef_search: HNSW ``efSearch``.

        Returns:
            The filled bank.
        """
        bank = cls(dim, model_name, factory, normalize, nprobe, ef_search)
        if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], np.ndarray):
            batches = [batches]
        if train_sample is not None:
            bank.train(train_sample)
        for emb, keys in batches:
            if not bank.is_trained:
                bank.train(emb)
            bank.add(emb, keys)
        return bank

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> SearchResult:
        """Top-``k`` documents by inner product for each query, in batches.

        Args:
            queries: ``(Q, dim)`` query embeddings (normalised here when the bank normalises).
            k: hits per query (>= 1).
            batch_size: queries per faiss call.

        Returns:
            :class:`SearchResult` with scores, ids and keys, best first; an empty bank gives no hits.

        Raises:
            ValueError: ``k`` or ``batch_size`` not an integer or below 1, queries of the wrong shape, or a query with
                NaN/inf values (its row named).
        """
        for name, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # k=2.0 failed in numpy, unnamed
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        k, batch_size = int(k), int(batch_size)  # faiss's SWIG wrapper refuses a numpy integer, naming no argument
        q = self._check(queries, "queries")
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        n = min(k, len(self))  # faiss is asked for no more hits than the bank holds (an empty IVF bank: untrained)
        for i in range(0, len(q) if n else 0, batch_size):
            s, j = self.index.search(q[i : i + batch_size], n)  # (b, n), (b, n)
            scores[i : i + len(s), :n], ids[i : i + len(s), :n] = s, j
        scores[ids < 0] = -np.inf
        keys = [[self.keys[j] for j in row if j >= 0] for row in ids]
        return SearchResult(scores, ids, keys)

    def metadata(self) -> dict[str, object]:
        """The JSON metadata written next to the index."""
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "dim": self.dim,
            "count": len(self),
            "normalize": self.normalize,
            "factory": self.factory,
            "metric": "inner_product",
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``index.faiss``, ``keys.json`` and ``meta.json`` into directory ``path`` (created if needed).

        Each file is written to a temporary name in ``path`` first and moved into place only when all three are
        written, ``meta.json`` last: with ``overwrite``, an error while writing leaves the bank already saved at
        ``path`` as it was.

        Raises:
            FileExistsError: ``path`` already holds one of the three files and ``overwrite`` is false.
            ValueError: the bank is an IVF bank loaded with ``mmap=True`` whose index file has been replaced or
                changed since (the file named).
        """
        out = Path(path)
        existing = [name for name in (INDEX_FILE, KEYS_FILE, META_FILE) if (out / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{out} already holds a memory bank ({', '.join(existing)}); pass overwrite=True to replace it"
            )
        mapped = _on_disk_lists(self.index)
        if mapped and _file_identity(self._source) != self._source_identity:  # the copy would pair other lists and keys
            raise ValueError(
                f"{self._source} was replaced or changed since this bank was loaded from it with mmap=True, so copying "
                "it would pair another index with this bank's keys: load the bank again to save it"
            )
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
        try:
            if mapped:  # write_index would write a reference to the mapped file, not the lists
                shutil.copyfile(self._source, tmp / INDEX_FILE)
            else:
                faiss.write_index(self.index, str(tmp / INDEX_FILE))
            (tmp / KEYS_FILE).write_text(json.dumps(self.keys), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.metadata(), indent=2), encoding="utf-8")
            for name in (INDEX_FILE, KEYS_FILE, META_FILE):
                os.replace(tmp / name, out / name)
            if self._source is not None and (out / INDEX_FILE).resolve() == self._source:  # saved over its own file
                self._source_identity = _file_identity(self._source)  # a copy of it: the same lists
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model_name: str | None = None,
        dim: int | None = None,
        nprobe: int = 32,
        ef_search: int = 128,
        mmap: bool = False,
    ) -> MemoryBank:
        """Load a bank saved by :meth:`save`, checking its metadata.

        Args:
            path: the bank directory.
            model_name: if given, the CLIP model name the caller embeds queries with; must match the bank's.
            dim: if given, the caller's embedding dimension; must match the bank's.
            nprobe: IVF ``nprobe`` to search with.
            ef_search: HNSW ``efSearch`` to search with.
            mmap: memory-map the index file instead of reading it into RAM (faiss ``IO_FLAG_MMAP``). IVF banks loaded
                so are read-only (:meth:`add` refuses); :meth:`save` copies their file.

        Raises:
            FileNotFoundError: a file of the bank is missing.
            ValueError: the metadata is inconsistent or does not match ``model_name`` / ``dim`` (both values named); a
                file is not valid JSON, a ``meta.json`` field is missing or of the wrong type, ``keys.json`` is not a
                list of unique non-empty single-line strings (the row named), ``index.faiss`` cannot be read
                (truncated or corrupt), or the index is not inner-product (the file and field named); ``nprobe`` or
                ``ef_search`` is below 1.
        """
        src = Path(path)
        for name in (INDEX_FILE, KEYS_FILE, META_FILE):
            if not (src / name).is_file():
                raise FileNotFoundError(f"memory bank {src} has no {name}{_bank_hint(src)}")
        meta_path = src / META_FILE
        meta = _read_json(meta_path, "a JSON object")
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        for field, typ in _META_TYPES.items():
            value = meta.get(field)
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise ValueError(f"{meta_path}: field {field!r} must be a {typ.__name__}, got {value!r}")
        if meta["metric"] != "inner_product":
            raise ValueError(f"{meta_path}: field 'metric' is {meta['metric']!r}, expected 'inner_product'")
        if model_name is not None and meta["model_name"] != model_name:
            raise ValueError(
                f"memory bank {src} was built with CLIP model {meta['model_name']!r} but queries use {model_name!r}"
            )
        if dim is not None and meta["dim"] != dim:
            raise ValueError(f"memory bank {src} has dimension {meta['dim']} but queries have dimension {dim}")
        try:
            index = faiss.read_index(str(src / INDEX_FILE), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as e:  # faiss's C++ error: 'read error ... 5 != 640', 'Index type ... not recognized'
            reason = re.sub(r"^Error in .* at \S+:\d+: ", "", str(e).strip()).rsplit("failed: ", 1)[-1]
            raise ValueError(f"{src / INDEX_FILE}: not a readable faiss index (truncated or corrupt?): {reason}") from e
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{src / INDEX_FILE}: not an inner-product index (faiss metric {index.metric_type})")
        keys = _read_json(src / KEYS_FILE, "a list of document keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{src / KEYS_FILE}: expected a JSON list of document keys (strings)")
        bad = next((i for i, k in enumerate(keys) if not k or "\n" in k), None)
        if bad is not None:  # add() refuses such keys; a hand-edited file must not bring them in
            raise ValueError(
                f"{src / KEYS_FILE}: row {bad} has the key {keys[bad]!r}; document keys must be non-empty single-line "
                "strings"
            )
        if index.d != meta["dim"] or index.ntotal != meta["count"] or len(keys) != meta["count"]:
            raise ValueError(
                f"memory bank {src} is inconsistent: meta.json says dim={meta['dim']} count={meta['count']}, "
                f"index has d={index.d} ntotal={index.ntotal}, keys.json has {len(keys)} keys"
            )
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in Counter(keys).items() if n > 1)
            raise ValueError(f"{src / KEYS_FILE}: duplicate document key {dup!r}")
        bank = cls.__new__(cls)
        bank._init(index, meta["dim"], meta["model_name"], meta["factory"], meta["normalize"], keys)
        bank._source = (src / INDEX_FILE).resolve() if mmap else None
        bank._source_identity = _file_identity(bank._source) if mmap else None
        bank.set_search_params(nprobe=nprobe, ef_search=ef_search)
        return bank
