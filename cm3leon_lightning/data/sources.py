"""Readers of raw image-caption pairs for ``cm3leon prepare``, and the rules that clean them.

Six sources, each a :class:`PairSource` with a fixed, deterministic document order and random access by range
(``iter_range(start, stop)``), so the prepare pipeline can cut it into parts and process them in any order:

- :class:`FolderSource`: an image folder with caption sidecar files (``cat.jpg`` + ``cat.txt``), recursive, sorted by
  relative path; key = relative path without suffix (``sub/cat.jpg`` -> ``sub_cat``; see :func:`document_key`).
- :class:`CocoSource`: a COCO-captions JSON (``captions_train2017.json``) plus its image folder, images sorted by id.
  ``mode="first"`` (default): one document per image, with the caption of the lowest annotation id that has text
  (key ``coco-{image_id}``); ``mode="all"``: one document per caption (key ``coco-{image_id}-{annotation_id}``), the
  captions of one image always in the same split.
- :class:`~cm3leon_lightning.data.wds_source.WebDatasetSource` (``data/wds_source.py``): local WebDataset tars
  (gzip, bzip2 or xz too) with ``jpg``/``jpeg``/``png``/``webp`` and ``txt`` members, in shard order then member order;
  key = the sample's ``__key__`` (the member path up to the first dot of its file name, folders included, as
  WebDataset groups members; extensions compared in lower case).
- :class:`~cm3leon_lightning.data.parquet.ParquetSource` (``data/parquet.py``): Parquet files with an image and a
  caption column (Hugging Face Hub datasets, img2dataset's Parquet output).
- :class:`ShapesSource`: the synthetic shapes generator (:func:`cm3leon_lightning.data.shapes.generate_pairs`).
- :class:`~cm3leon_lightning.data.sft.SFTSource` (``data/sft.py``): instruction-tuning examples rendered with the
  paper's task templates, datasets balanced.

A reader yields :class:`RawPair` records whose image is a path or bytes (opened only when needed) or a generated
array, so nothing holds more than one image at a time. The cleaning rules (:func:`clean_caption`,
:func:`load_image`, :class:`BadInput`) are in ``data/cleaning.py`` and importable from here too.

Every source but the generated ones has a :meth:`PairSource.fingerprint` of its input files, stored with the prepared
data, so a preparation resumed on input that changed since it began is refused instead of mixing parts encoded from
the old files with parts of the new ones.

"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cm3leon_lightning.data.cleaning import (  # noqa: F401 (the cleaning rules, importable from here too)
    REPAIR_REASONS,
    SKIP_REASONS,
    BadInput,
    clean_caption,
    load_image,
    source_jpeg,
)
from cm3leon_lightning.data.shards import file_sha256, sanitize_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_MEMBERS = ("txt", "caption", "caption.txt")


@dataclass
class RawPair:
    """One raw document from a source.

    Attributes:
        key: stable document id, already sanitised for WebDataset (``[A-Za-z0-9_-]``).
        caption: the caption as found (``bytes`` when read from a file; ``None`` when there is none).
        image: a path (opened lazily), encoded bytes, a uint8 ``(H, W, 3)`` array or a PIL image; ``None`` if absent.
        meta: source-specific metadata (file name, COCO ids, shard name...).
        group: documents sharing a group land in the same split (several captions of one image, the repeated copies
            of an upsampled instruction-tuning example); ``None``: the document is its own group.
    """

    key: str
    caption: str | bytes | None
    image: Path | bytes | np.ndarray | Image.Image | None
    meta: dict[str, Any] = field(default_factory=dict)
    group: str | None = None

    @property
    def split_key(self) -> str:
        """What decides the document's split (:func:`~cm3leon_lightning.data.prepare_run.is_val`)."""
        return self.key if self.group is None else self.group


def document_key(raw: object) -> str:
    """The WebDataset-safe key of a source's document id (a file name, a ``__key__``, a key column's value).

    An ASCII id is :func:`~cm3leon_lightning.data.shards.sanitize_key`'s (``sub/cat`` -> ``sub_cat``). An id with
    other characters (``猫``, ``café``), or none that sanitising keeps (``...``), gets ``-`` and 8 hex digits of its
    hash, so ids that differ only in the characters sanitising replaces stay distinct (``夏`` and ``冬`` are not
    duplicates) and no id stops a run. A key that would start with ``sft-``, the prefix of instruction-tuning
    documents, gets ``data-`` before it (``sft-photos/cat`` -> ``data-sft-photos_cat``): training skips a too-long
    ``sft-`` document instead of cutting its caption (:data:`~cm3leon_lightning.data.stages.SFT_KEY_PREFIX`).
    """
    from cm3leon_lightning.data.stages import SFT_KEY_PREFIX

    text = str(raw)
    if text.isascii() and re.search(r"[A-Za-z0-9-]", text):
        key = sanitize_key(text)
    else:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        base = re.sub(r"[^A-Za-z0-9_-]", "_", text)
        key = f"{base if base.strip('_') else 'id'}-{digest}"
    return f"data-{key}" if key.startswith(SFT_KEY_PREFIX) else key


# --------------------------------------------------------------------------------------------- fingerprints
def _stat(path: Path) -> str:
    """``size:mtime_ns`` of a file, ``-`` when it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def stat_fingerprint(entries: Iterable[tuple[str, Sequence[Path]]]) -> str:
    """Hex sha256 of ``(name, files)`` entries in order: each name with the size and modification time of its files.

    Changes when a file is added, removed, renamed, replaced or edited, without reading any file (for inputs too
    large to hash, such as image folders and tar shards).
    """
    h = hashlib.sha256()
    for name, files in entries:
        h.update(json.dumps([name, *(_stat(f) for f in files)]).encode() + b"\n")
    return h.hexdigest()


def content_fingerprint(files: Iterable[Path]) -> str:
    """Hex sha256 over each file's name and the sha256 of its bytes (for small inputs: caption JSON, JSON lines)."""
    h = hashlib.sha256()
    for f in files:
        h.update(json.dumps([str(f), file_sha256(f)]).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- sources
class PairSource:
    """Base class of the raw-pair readers: a fixed number of documents in a fixed order, readable by range."""

    kind = "base"

    def __len__(self) -> int:
        raise NotImplementedError

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        """Documents ``start .. stop - 1`` of the source order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Primitives that identify the source (kind, location, settings, count, fingerprint), stored with the data."""
        return {"kind": self.kind, "count": len(self)}

    def fingerprint(self) -> str | None:
        """A digest of the input files that changes when they change (None: nothing to check, e.g. generated pairs).

        ``cm3leon prepare`` stores it with the prepared data and refuses to resume once it differs.
        """
        return None

    def __iter__(self) -> Iterator[RawPair]:
        return self.iter_range(0, len(self))

    def captions(self) -> Iterator[str | bytes | None]:
        """Every caption in order; sources override it to skip image reads."""
        for pair in self:
            yield pair.caption

    def split_captions(self) -> Iterator[tuple[str, str | bytes | None]]:
        """Every document's split key (:attr:`RawPair.split_key`) and caption, in order: what training the text
        tokenizer reads (the training split's captions). Sources whose documents hold the image bytes override it to
        skip reading them (:class:`~cm3leon_lightning.data.parquet.ParquetSource` reads two columns)."""
        for pair in self:
            yield pair.split_key, pair.caption

    @staticmethod
    def _check_range(start: int, stop: int, n: int) -> tuple[int, int]:
        if not 0 <= start <= stop:
            raise ValueError(f"range must satisfy 0 <= start <= stop, got start={start}, stop={stop}")
        return start, min(stop, n)


class FolderSource(PairSource):
    """Images under ``root`` (recursive) with caption sidecars ``<stem>.txt`` next to them.

    An image without a sidecar yields ``caption=None`` (counted as ``caption_missing``).
    """

    kind = "folder"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root), "count": len(self), "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """The relative paths of the images with the sizes and modification times of the images and their sidecars."""
        return stat_fingerprint((p.relative_to(self.root).as_posix(), [p, p.with_suffix(".txt")]) for p in self.files)

    def _caption(self, path: Path) -> bytes | None:
        side = path.with_suffix(".txt")
        return side.read_bytes() if side.is_file() else None

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        start, stop = self._check_range(start, stop, len(self))
        for path in self.files[start:stop]:
            rel = path.relative_to(self.root).with_suffix("").as_posix()
            yield RawPair(document_key(rel), self._caption(path), path, {"file": rel + path.suffix})

    def captions(self) -> Iterator[bytes | None]:
        return (self._caption(p) for p in self.files)


def _has_text(caption: Any) -> bool:
    """Whether a COCO caption survives :func:`clean_caption` (not missing, not only whitespace or control chars)."""
    try:
        clean_caption(caption if caption is None or isinstance(caption, str) else str(caption))
    except BadInput:
        return False
    return True


class CocoSource(PairSource):
    """COCO captions: ``captions_json`` (``images`` + ``annotations``) and the folder holding ``file_name`` images.

    Args:
        captions_json: path of e.g. ``annotations/captions_train2017.json``.
        image_dir: folder of the images (e.g. ``train2017/``).
        mode: ``first`` (one document per image: the caption of the lowest annotation id among those with text, so
            a blank or missing first caption does not cost the image) or ``all`` (one per caption).

    Raises:
        ValueError: the JSON is not a COCO captions file, or gives one image id two different file names (both
            named). Captions of image ids the JSON's ``images`` does not list are left out with a warning naming them.
    """

    kind = "coco"

    def __init__(self, captions_json: str | Path, image_dir: str | Path, mode: str = "first") -> None:
        if mode not in ("first", "all"):
            raise ValueError(f"COCO mode must be 'first' or 'all', got {mode!r}")
        self.captions_json, self.image_dir, self.mode = Path(captions_json), Path(image_dir), mode
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        try:
            data = json.loads(self.captions_json.read_text(encoding="utf-8"))
            images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
            # sorted by ids only: two annotations of one id would otherwise compare their captions (None < str fails)
            anns = sorted(((int(a["image_id"]), int(a["id"]), a.get("caption")) for a in data["annotations"]),
                          key=lambda a: a[:2])  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.captions_json}: not a COCO captions file (images[id, file_name], "
                             f"annotations[id, image_id, caption]): {e}") from e  # fmt: skip
        files: dict[int, str] = {}
        for image_id, name in images:
            if files.setdefault(image_id, name) != name:
                raise ValueError(f"{self.captions_json}: image id {image_id} has two file names: "
                                 f"{files[image_id]!r} and {name!r}")  # fmt: skip
        orphans = sorted({image_id for image_id, _, _ in anns if image_id not in files})
        if orphans:
            warnings.warn(
                f"{self.captions_json}: {sum(a[0] not in files for a in anns)} caption(s) of image ids not listed in "
                f"'images' are left out: ids {orphans[:5]}{' ...' if len(orphans) > 5 else ''}",
                stacklevel=2,
            )
        by_image: dict[int, list[tuple[int, Any]]] = {}
        for image_id, ann_id, cap in anns:
            by_image.setdefault(image_id, []).append((ann_id, cap))
        # (key, file name, caption, image id, annotation id); images without any caption are kept (caption_missing).
        self.docs: list[tuple[str, str, Any, int, int | None]] = []
        for image_id in sorted(files):
            caps = by_image.get(image_id, [])
            if not caps:
                self.docs.append((f"coco-{image_id}", files[image_id], None, image_id, None))
            if mode == "first":  # the lowest annotation id with text; all blank: the lowest (counted as skipped)
                caps = [next((c for c in caps if _has_text(c[1])), caps[0])] if caps else []
            for ann_id, cap in caps:
                key = f"coco-{image_id}-{ann_id}" if mode == "all" else f"coco-{image_id}"
                self.docs.append((key, files[image_id], cap, image_id, ann_id))

    def __len__(self) -> int:
        return len(self.docs)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "captions_json": str(self.captions_json), "image_dir": str(self.image_dir),
                "mode": self.mode, "count": len(self), "fingerprint": self.fingerprint()}  # fmt: skip

    def fingerprint(self) -> str:
        """The sha256 of the captions JSON and the sizes and modification times of the images it names."""
        names = sorted({d[1] for d in self.docs})
        images = stat_fingerprint((name, [self.image_dir / name]) for name in names)
        return hashlib.sha256(f"{content_fingerprint([self.captions_json])}\n{images}".encode()).hexdigest()

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        start, stop = self._check_range(start, stop, len(self))
        for key, file_name, cap, image_id, ann_id in self.docs[start:stop]:
            meta = {"file": file_name, "image_id": image_id, "annotation_id": ann_id}
            caption = cap if cap is None or isinstance(cap, str) else str(cap)
            # every caption of an image in the same split (mode "all"), so validation images are never trained on
            yield RawPair(sanitize_key(key), caption, self.image_dir / file_name, meta, f"coco-{image_id}")

    def captions(self) -> Iterator[str | None]:
        return (d[2] for d in self.docs)


class ShapesSource(PairSource):
    """The synthetic shapes pairs (:func:`~cm3leon_lightning.data.shapes.generate_pairs`), generated on demand.

    Pair ``i`` depends only on ``(seed, split, i)``, so any range is generated without the pairs before it.
    """

    kind = "shapes"

    def __init__(self, n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"number of shapes pairs must be >= 1, got {n}")
        if seed < 0:  # numpy's own error ("expected non-negative integer") would not name it
            raise ValueError(f"shapes seed must be >= 0, got {seed}")
        self.n, self.split, self.image_size, self.seed = n, split, image_size, seed
        next(iter(self._generate(0, 1)))  # validates split and image_size now

    def _generate(self, start: int, stop: int) -> Iterator[Any]:
        from cm3leon_lightning.data import shapes

        split_id = {"train": 0, "heldout": 1}.get(self.split)
        if split_id is None:
            raise ValueError(f"shapes split must be 'train' or 'heldout', got {self.split!r}")
        for i in range(start, stop):  # the per-index recipe of shapes.generate_pairs (tested equal)
            rng = np.random.default_rng([self.seed, split_id, i])
            scene = shapes.sample_scene(rng, self.split)
            text = shapes.caption(scene, rng)
            yield shapes.ShapesPair(
                f"shapes-{self.split}-{self.seed}-{i:07d}", text, shapes.render(scene, self.image_size, rng), scene
            )

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "image_size": self.image_size, "seed": self.seed,
                "count": self.n}  # fmt: skip

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        start, stop = self._check_range(start, stop, len(self))
        for p in self._generate(start, stop):
            yield RawPair(sanitize_key(p.key), p.caption, p.image, {"scene": repr(p.scene)})


def make_source(
    kind: str,
    path: str | Path | None = None,
    captions: str | Path | None = None,
    num_pairs: int = 100,
    coco_mode: str = "first",
    shapes_split: str = "train",
    image_size: int = 32,
    seed: int = 0,
    sft_balance: tuple[float, float] = (3.0, 0.3),
    columns: tuple[str, str, str | None] = ("image", "caption", None),
    flags: tuple[str, str] = ("--input", "--captions"),
) -> PairSource:
    """Build a source by name (the ``--source`` values of ``cm3leon prepare``).

    Args:
        kind: ``folder``, ``coco``, ``wds``, ``parquet``, ``shapes`` or ``sft``.
        path: the image folder (folder, coco), the tar directory / pattern (wds), the Parquet directory / pattern
            (parquet), or the JSON-lines file / folder of instruction-tuning examples (sft,
            :class:`~cm3leon_lightning.data.sft.SFTSource`).
        captions: the COCO captions JSON (coco only).
        num_pairs: number of generated pairs (shapes).
        coco_mode: ``first`` or ``all`` (see :class:`CocoSource`).
        shapes_split: ``train`` or ``heldout`` (shapes).
        image_size: generated image side (shapes).
        seed: generator seed (shapes), or seed of the mixture's subsets, order and templates (sft).
        sft_balance: ``(up, down)`` sampling thresholds of the sft mixture (paper E.1: 3 / 0.3).
        columns: ``(image, caption, key or None)`` column names (parquet).
        flags: the command-line flags of ``path`` and ``captions``, named in errors (``--bank-input`` and
            ``--bank-captions`` for the memory-bank source).
    """
    if kind == "shapes":
        return ShapesSource(num_pairs, shapes_split, image_size, seed)
    if kind not in ("folder", "coco", "wds", "parquet", "sft"):
        raise ValueError(f"source must be one of shapes, folder, coco, wds, parquet, sft; got {kind!r}")
    if path is None:
        raise ValueError(f"source {kind!r} needs an input path ({flags[0]})")
    if kind == "sft":
        from cm3leon_lightning.data.sft import SFTSource  # sft builds on this module

        return SFTSource(path, *sft_balance, seed=seed)
    if kind == "parquet":
        from cm3leon_lightning.data.parquet import ParquetSource  # parquet builds on this module

        return ParquetSource(path, *columns)
    if kind == "folder":
        return FolderSource(path)
    if kind == "coco":
        if captions is None:
            raise ValueError(f"source 'coco' needs the captions JSON ({flags[1]} annotations/captions_train2017.json)")
        return CocoSource(captions, path, coco_mode)
    from cm3leon_lightning.data.wds_source import WebDatasetSource  # it builds on this module

    return WebDatasetSource(path)


def __getattr__(name: str) -> Any:
    """The WebDataset reader's names (``WebDatasetSource``, ``list_tars``, ``open_tar``), importable from here as
    before; they live in :mod:`cm3leon_lightning.data.wds_source`, which builds on this module."""
    if name in ("WebDatasetSource", "list_tars", "open_tar"):
        from cm3leon_lightning.data import wds_source

        return getattr(wds_source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
