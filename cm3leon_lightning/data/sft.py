"""Instruction-tuning (SFT) data: the paper's task templates, a balanced task mixture, and a ``cm3leon prepare`` source.

Paper section 4 and appendix E: supervised fine-tuning keeps the pretraining format and the CM3 objective; an
example is one interleaved document, the instruction and the output as text, then the image (``{text} <break>
{image}``), with several prompt templates per task (table 5), and the datasets are balanced by up/down sampling with
thresholds 3 / 0.3 (E.1). The rendered text becomes the document's caption, so SFT data goes through
``cm3leon prepare`` into ordinary shards and trains with ``CM3LeonDataModule``.

Input: a JSON-lines file, or a folder of ``*.jsonl`` files, one example per line (image paths relative to the file)::

    {"task": "vqa", "image": "img/1.jpg", "question": "What colour is the circle?", "answer": "red"}
    {"task": "caption", "dataset": "coco", "image": "img/2.jpg", "caption": "a red circle on the left"}
    {"task": "text", "image": "img/3.jpg", "text": "any instruction and output, used as given"}

``task`` picks the templates (:data:`TEMPLATES`); ``dataset`` (default: the task) is the unit of balancing. A
template is eligible when the example has every field it names (ScienceQA's step-by-step template needs
``explanation``); a field that is null, an empty or blank string or an empty list counts as absent. Each document
draws one eligible template, seeded by its key. Text fields (strings or numbers) are used as given, except that
``choices`` (a list) becomes ``(A) x (B) y`` and ``objects`` (a list of ``[name, location]``) becomes
``name at location, ...`` (at most 26 choices; each choice, name and location a string or a number); any other
list, object or boolean, a null item and a NaN / Infinity are refused. Newlines in templates become spaces when
``cm3leon prepare`` cleans captions. The file is UTF-8 (a leading BOM is dropped).

Tasks with several images (``edit``: InstructPix2Pix editing with ``image``, ``instruction`` and ``target``;
``edge_to_image``, ``seg_to_image``, ``hed_to_image``, ``pose_to_image``, ``depth_to_image``, ``norm_to_image``,
``scribble_to_image`` with ``condition``, ``caption`` and ``image``) become documents with segments (the template
split at ``<break>``, manifest format_version 2); their last image is the output, which stands for the document in
retrieval and evaluation.
"""

from __future__ import annotations

import json
import math
import string
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon_lightning.data.shards import sanitize_key
from cm3leon_lightning.data.sources import PairSource, RawPair, content_fingerprint
from cm3leon_lightning.data.stages import check_seed
from cm3leon_lightning.generation.tasks import EDIT_PREFIX, GROUNDED_FEATURES, TASK_PREFIXES

# Paper table 5 (text-focused datasets, and the single-image generation tasks), text part before ``<break> {image}``.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": ("{caption}", "Describe the given picture. {caption}"),
    "long_caption": (
        "Describe the given picture in very detail. {caption}",
        "Describe all the objects in the given image in very detail. {caption}",
        "Generate a long caption for the given image. {caption}",
    ),
    "narrative": (
        "Generate a long narration of what is happening in the given image. {caption}",
        "Generate a long caption for the given image. {caption}",
    ),
    "vqa": (
        "Question: {question} Answer: {answer}.",
        "Question: {question}\n{answer}",
        "Question: {question} The answer is {answer}.",
    ),
    "scienceqa": (
        "Question: {question}\nContext: {context}\nOptions: {choices}\nAnswer: {answer}.",
        "Question: {question}\nContext: {context}\nOptions: {choices}\nAnswer: Let's think step-by-step: "
        "{explanation} So the answer is {answer}.",
    ),
    "ocr": ('draw "{ocr}"',),
    "detection": ("Generate high quality image of {caption} with segmentations {objects}",),
    "text": ("{text}",),
    # Several images: the whole document, segments split at <break>; a segment that is only an image field
    # (IMAGE_FIELDS) is that image.
    # (The prefixes live in generation/tasks.py, which decoding reads too.)
    "edit": (f"{EDIT_PREFIX} <break> {{image}} <break> {{instruction}} <break> {{target}}",),
    **{
        f"{name}_to_image": (f"{TASK_PREFIXES[name + '_to_image']} <break> {{condition}} <break> {{caption}} <break> "
                             "{image}",)
        for name in GROUNDED_FEATURES
    },
}  # fmt: skip

IMAGE_FIELDS = ("image", "target", "condition")  # fields that name image files (relative to the JSON-lines file)
BREAK = " <break> "


def template_fields(template: str) -> set[str]:
    """The field names a template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def format_value(name: str, value: Any) -> str:
    """One field as text: ``choices`` lists become ``(A) x (B) y``, ``objects`` ``name at location, ...``.

    Raises:
        ValueError: naming the field (and the item, ``choices[1]``), for a list, object, boolean, null or non-finite
            number anywhere but as ``choices`` / ``objects`` themselves (its Python repr would be trained on), and
            for more than 26 ``choices``.
    """
    if name == "choices" and isinstance(value, (list, tuple)):
        if len(value) > 26:
            raise ValueError(f"field 'choices' has {len(value)} options; at most 26 can be lettered (A)..(Z)")
        return " ".join(f"({chr(ord('A') + i)}) {_scalar(f'choices[{i}]', c)}" for i, c in enumerate(value))
    if name == "objects" and isinstance(value, (list, tuple)):
        parts = []
        for i, obj in enumerate(value):
            if not (isinstance(obj, (list, tuple)) and len(obj) == 2):
                raise ValueError(f"'objects' holds [name, location] pairs, got {obj!r}")
            parts.append(f"{_scalar(f'objects[{i}][0]', obj[0])} at {_scalar(f'objects[{i}][1]', obj[1])}")
        return ", ".join(parts)
    return _scalar(name, value)


def _scalar(name: str, value: Any) -> str:
    """A string or a finite number as text; anything else (its repr: ``None``, ``True``, ``[1, 2]``, ``nan``) raises."""
    if value is None or isinstance(value, (list, tuple, dict, bool)):
        raise ValueError(f"field {name!r} must be a string or a number, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's non-standard NaN / Infinity
        raise ValueError(f"field {name!r} must be a string or a finite number, got {value!r}")
    return str(value)


def is_present(value: Any) -> bool:
    """Whether a field counts as given: not null, not an empty or blank string, not an empty list."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):
        return bool(value)
    return value is not None


def eligible_templates(task: str, fields: Mapping[str, Any]) -> list[int]:
    """Indices of the task's templates whose fields are all present (:func:`is_present`: null, ``""`` and ``[]``
    count as absent, so an empty ScienceQA ``explanation`` never fills the step-by-step template).

    Raises:
        ValueError: unknown task (multi-image tasks named as such), or no template can be filled; names the
            missing fields of the first template.
    """
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TEMPLATES)}")
    have = {k for k, v in fields.items() if is_present(v)}
    ok = [i for i, t in enumerate(TEMPLATES[task]) if template_fields(t) <= have]
    if not ok:
        missing = sorted(template_fields(TEMPLATES[task][0]) - have)
        raise ValueError(f"task {task!r} needs field(s) {missing} (missing, null or empty)")
    return ok


def render_text(task: str, fields: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, int]:
    """The example's text (instruction and output) from one eligible template drawn with ``rng``.

    Returns:
        ``(text, template index)``.
    """
    index = pick_template(task, fields, rng)
    return _joined_text(TEMPLATES[task][index], fields), index


def pick_template(task: str, fields: Mapping[str, Any], rng: np.random.Generator) -> int:
    """One eligible template of the task, drawn with ``rng`` (no draw when only one is eligible)."""
    choices = eligible_templates(task, fields)
    return choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]


def template_segments(template: str, fields: Mapping[str, Any], base: Path = Path()) -> list[tuple[str, Any]]:
    """A template filled as a document: ``("text", str)`` and ``("image", path under base)`` segments in order.

    A template without ``<break>`` is its text followed by the example's ``image`` when it has one (paper table 5's
    single-image form); otherwise the template is split at ``<break>``.
    """
    implicit = BREAK not in template and "image" in fields
    parts = template.split(BREAK) if BREAK in template else [template, "{image}"] if implicit else [template]
    out: list[tuple[str, Any]] = []
    for part in parts:
        name = part[1:-1] if part.startswith("{") and part.endswith("}") else None
        if name in IMAGE_FIELDS:
            out.append(("image", base / str(fields[name])))
        else:
            out.append(("text", part.format(**{n: format_value(n, fields[n]) for n in template_fields(part)})))
    return out


def every_rendering(task: str, fields: Mapping[str, Any]) -> list[str]:
    """The example's text under each eligible template (e.g. a tokenizer corpus that covers every instruction);
    the text segments of a template with several images are joined by a space."""
    return [_joined_text(TEMPLATES[task][index], fields) for index in eligible_templates(task, fields)]


def _joined_text(template: str, fields: Mapping[str, Any]) -> str:
    return " ".join(t for kind, t in template_segments(template, fields) if kind == "text")


def balanced_counts(sizes: Mapping[str, int], up: float = 3.0, down: float = 0.3) -> dict[str, int]:
    """Examples drawn from each dataset (paper E.1: up/down sampling with thresholds 3 / 0.3).

    Each dataset moves toward an equal share of the mixture, ``total / len(sizes)`` examples, but is repeated at most
    ``up`` times and kept at least at ``down`` of its size: ``round(n * clip(share / n, down, up))``, at least 1.
    ``up = down = 1`` keeps the natural mixture.
    """
    if not (0.0 < down <= 1.0 <= up):
        raise ValueError(f"need 0 < down <= 1 <= up, got up={up}, down={down}")
    nonempty = {k: int(n) for k, n in sizes.items() if n > 0}
    if not nonempty:
        return {k: 0 for k in sizes}
    share = sum(nonempty.values()) / len(nonempty)
    out = {k: 0 for k in sizes}
    for k, n in nonempty.items():
        out[k] = max(1, round(n * min(max(share / n, down), up)))
    return out


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def mixture_plan(sizes: Mapping[str, int], counts: Mapping[str, int], seed: int = 0) -> list[tuple[str, int, int]]:
    """The mixture's documents in a seeded, shuffled order: ``(dataset, example index, copy)``.

    A dataset drawn ``m`` times from ``n`` examples repeats all of them ``m // n`` times (copies ``0 ..``), then a
    seeded subset of ``m % n`` once more; downsampling (``m < n``) is that subset alone.
    """
    plan: list[tuple[str, int, int]] = []
    for name in sorted(sizes):
        n, m = int(sizes[name]), int(counts.get(name, 0))
        if n == 0:
            continue
        full, rest = divmod(m, n)
        plan += [(name, i, c) for c in range(full) for i in range(n)]
        plan += [(name, int(i), full) for i in np.sort(_stream(seed, name).permutation(n)[:rest])]
    order = np.random.default_rng([seed, len(plan)]).permutation(len(plan))
    return [plan[i] for i in order]


@dataclass
class SFTExample:
    """One input line: where it came from, its task, dataset and fields (image fields relative to ``base``)."""

    source: str  # "<file stem>-<line number>", unique within the input
    task: str
    dataset: str
    fields: dict[str, Any]
    base: Path


def read_sft_lines(path: Path) -> Iterator[SFTExample]:
    """Parse and check one JSON-lines file (UTF-8, a leading BOM dropped; blank lines skipped), rendering every
    eligible template so that a field that cannot be rendered fails here rather than in ``cm3leon prepare``.

    Raises:
        ValueError: naming ``file:line`` and the field, for bytes that are not UTF-8, invalid JSON, a missing
            ``task`` / ``image``, an unknown task, a template that cannot be filled or a field that cannot be
            rendered (:func:`format_value`).
    """
    with open(path, "rb") as f:  # bytes: a decoding error can name its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {e.start} of the line: {e.reason})") from e
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(entry).__name__}")
            task, image = entry.pop("task", None), entry.get("image")
            if not isinstance(task, str) or not isinstance(image, str) or not image.strip():
                raise ValueError(f"{where}: needs string fields 'task' and 'image' (a path relative to the file)")
            dataset = entry.pop("dataset", None)
            dataset = task if dataset is None else str(dataset)  # null is absent (not a dataset named "None")
            try:
                every_rendering(task, entry)  # eligible templates, and each renders
                sanitize_key(dataset)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            bad = [f for f in IMAGE_FIELDS if f in entry and not (isinstance(entry[f], str) and entry[f])]
            if bad:
                raise ValueError(f"{where}: image field(s) {bad} must name image files (paths relative to the file)")
            yield SFTExample(f"{path.stem}-{lineno}", task, dataset, entry, path.parent)


class SFTSource(PairSource):
    """Instruction-tuning examples (module docstring) as ``cm3leon prepare`` documents, balanced and shuffled.

    Every line is checked when the source is built, so a malformed file fails before anything is written. Keys are
    ``sft-<file stem>-<line>-<copy>``; the copies of one example share a group, so they land in the same split.

    Args:
        path: a JSON-lines file or a folder of ``*.jsonl`` files.
        up: most times a dataset is repeated (paper: 3).
        down: least share of a dataset kept (paper: 0.3).
        seed: seed of the subsets, the order and the template draws.
    """

    kind = "sft"

    def __init__(self, path: str | Path, up: float = 3.0, down: float = 0.3, seed: int = 0) -> None:
        check_seed(seed, "the SFT mixture's subsets, order and templates: --sft-seed")  # int() took 1.5 as 1
        self.path, self.up, self.down, self.seed = Path(path), float(up), float(down), int(seed)
        if not (0.0 < self.down <= 1.0 <= self.up):  # checked before the files are read (balanced_counts would, after)
            raise ValueError(
                f"the SFT thresholds need 0 < down (--sft-down) <= 1 <= up (--sft-up), got up={up}, down={down}"
            )
        if self.path.is_dir():
            files = sorted(self.path.glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"no *.jsonl files in the SFT folder {self.path}")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"SFT input not found: {self.path}")
        stems: dict[str, Path] = {}
        for file in files:  # keys are built from the sanitised stem: "a.b.jsonl" and "a_b.jsonl" would share them
            other = stems.setdefault(sanitize_key(file.stem), file)
            if other != file:
                raise ValueError(
                    f"{other.name} and {file.name} give the same example keys (sft-{sanitize_key(file.stem)}-<line>); "
                    "prepare would keep one file's examples and drop the other's as duplicates: rename one"
                )
        self.files = files
        self.examples: dict[str, list[SFTExample]] = {}
        for file in files:
            for ex in read_sft_lines(file):
                self.examples.setdefault(ex.dataset, []).append(ex)
        if not self.examples:
            raise ValueError(f"{self.path}: no examples")
        sizes = {k: len(v) for k, v in self.examples.items()}
        self.counts = balanced_counts(sizes, self.up, self.down)
        self.plan = mixture_plan(sizes, self.counts, self.seed)

    def __len__(self) -> int:
        return len(self.plan)

    def describe(self) -> dict[str, Any]:
        datasets = {k: {"examples": len(v), "drawn": self.counts[k]} for k, v in sorted(self.examples.items())}
        return {"kind": self.kind, "path": str(self.path), "up": self.up, "down": self.down, "seed": self.seed,
                "datasets": datasets, "count": len(self), "fingerprint": self.fingerprint()}  # fmt: skip

    def fingerprint(self) -> str:
        """The sha256 of the JSON-lines files (see :meth:`PairSource.fingerprint`); the images they name are read at
        encode time and not fingerprinted."""
        return content_fingerprint(self.files)

    def iter_range(self, start: int, stop: int) -> Iterator[RawPair]:
        start, stop = self._check_range(start, stop, len(self))
        for dataset, index, copy in self.plan[start:stop]:
            ex = self.examples[dataset][index]
            key = sanitize_key(f"sft-{ex.source}-{copy}")
            template = pick_template(ex.task, ex.fields, _stream(self.seed, key))
            segments = template_segments(TEMPLATES[ex.task][template], ex.fields, ex.base)
            text = " ".join(value for kind, value in segments if kind == "text")
            meta = {"task": ex.task, "dataset": dataset, "source": ex.source, "copy": copy, "template": template}
            if len(segments) > 2:  # the whole document; the last image (the output) is the pair's image
                meta["segments"] = [[kind, str(value)] for kind, value in segments]
            image = next(v for kind, v in reversed(segments) if kind == "image")
            yield RawPair(key, text, image, meta, sanitize_key(f"sft-{ex.source}"))
