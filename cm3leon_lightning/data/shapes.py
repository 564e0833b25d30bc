"""Synthetic shapes: seeded image-caption pairs and an attribute checker (the demo's dataset and quality judge).

Each image holds one or two flat-coloured shapes on a plain background; its caption names the attributes with one of
several templates ("a red circle on the left", "two shapes: a blue square above a green triangle"). Some
colour-shape combinations never appear in the training split: they form the zero-shot ``heldout`` split.

The :func:`check_image` judge recovers colour, shape, size and position from pixels (palette match, row widths, bounding
box, centroid), so generated images can be scored without any learned model. On clean renders it is right
in well over 99% of cases (tested); on generated images its verdicts are what the demo report counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {  # name -> centre (x, y) as fractions of the image
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
RELATIONS: dict[str, tuple[str, str]] = {  # relation -> positions of (first, second) shape
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "left of": ("left", "right"),
    "right of": ("right", "left"),
}
BACKGROUND: tuple[int, int, int] = (25, 25, 25)
SIZE_FRACTION = {"small": 0.26, "large": 0.42}  # side (or diameter) as a fraction of the image
# Zero-shot split: these colour-shape pairs never appear in training captions or images.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")}
)
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its colour, kind, size and position name (a key of :data:`POSITIONS`)."""

    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One or two shapes; with two, ``relation`` (a key of :data:`RELATIONS`) says where the first is."""

    shapes: tuple[ShapeSpec, ...]
    relation: str | None = None

    def pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs in the scene."""
        return {(s.colour, s.shape) for s in self.shapes}


def scene_to_dict(scene: Scene) -> dict:
    """A :class:`Scene` as JSON-friendly primitives (what the demo writes to ``<split>.jsonl``)."""
    return {"shapes": [asdict(s) for s in scene.shapes], "relation": scene.relation}


def scene_from_dict(d: dict) -> Scene:
    """The inverse of :func:`scene_to_dict`."""
    return Scene(tuple(ShapeSpec(**s) for s in d["shapes"]), d["relation"])


def is_heldout(scene: Scene) -> bool:
    """Whether a scene uses a colour-shape pair reserved for the zero-shot split."""
    return bool(scene.pairs() & HELDOUT_PAIRS)


def sample_scene(rng: np.random.Generator, split: str = "train", two_shape_prob: float = 0.3) -> Scene:
    """Draw a scene for ``split`` (``train``: no held-out pair; ``heldout``: at least one held-out pair)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    colours = list(COLOURS)
    while True:
        if rng.random() < two_shape_prob:
            relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
            c1, c2 = rng.choice(len(colours), size=2, replace=False)  # distinct colours keep the shapes separable
            pos = RELATIONS[relation]
            shapes = tuple(
                ShapeSpec(colours[c], SHAPES[rng.integers(len(SHAPES))], "small", p) for c, p in zip((c1, c2), pos)
            )
            scene = Scene(shapes, relation)
        else:
            spec = ShapeSpec(
                colours[rng.integers(len(colours))],
                SHAPES[rng.integers(len(SHAPES))],
                SIZES[rng.integers(len(SIZES))],
                list(POSITIONS)[rng.integers(len(POSITIONS))],
            )
            scene = Scene((spec,))
        if is_heldout(scene) == (split == "heldout"):
            return scene


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for ``scene`` from one of several templates."""
    if scene.relation is None:
        s = scene.shapes[0]
        where = _POSITION_PHRASE[s.position]
        templates = (
            f"a {s.colour} {s.shape} {where}",
            f"a {s.size} {s.colour} {s.shape} {where}",
            f"{where}, a {s.size} {s.colour} {s.shape}",
            f"a picture of a {s.size} {s.colour} {s.shape} {where}",
        )
    else:
        a, b = scene.shapes
        templates = (
            f"two shapes: a {a.colour} {a.shape} {scene.relation} a {b.colour} {b.shape}",
            f"a {a.colour} {a.shape} {scene.relation} a {b.colour} {b.shape}",
        )
    return templates[rng.integers(len(templates))]


def render(scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``scene`` as a uint8 ``(H, W, 3)`` image; ``rng`` adds a small jitter to positions and sizes."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        side = SIZE_FRACTION[s.size]
        if rng is not None:
            cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
            side *= rng.uniform(0.92, 1.08)
        cx, cy, half = cx * image_size, cy * image_size, side * image_size / 2
        if s.shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
        elif s.shape == "square":
            mask = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
        elif s.shape == "triangle":  # apex up, base at the bottom of the bounding box
            rel = (yy - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
            mask = (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * half)
        else:
            raise ValueError(f"unknown shape {s.shape!r}; known: {SHAPES}")
        img[mask] = COLOURS[s.colour]
    return img


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` found for one colour: shape, size, position and pixel count."""

    colour: str
    shape: str
    size: str
    position: str
    pixels: int


def _position_name(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _classify_shape(xs: np.ndarray, ys: np.ndarray, y0: int, y1: int) -> str:
    """Shape from the row widths of a colour's pixels between rows ``y0`` and ``y1``.

    A square's top and bottom rows are as wide as its widest row; a triangle (apex up) is much wider at the bottom
    than at the top; a circle is narrower at both ends than in the middle.
    """
    inside = (ys >= y0) & (ys <= y1)
    widths = np.bincount(ys[inside] - y0, minlength=y1 - y0 + 1).astype(np.float64)  # pixels per row
    widest = max(widths.max(), 1.0)
    top, bottom = widths[0] / widest, widths[-1] / widest  # the box's first and last rows
    if bottom > 0.85:
        return "square" if top > 0.85 else ("triangle" if top < 0.6 else "circle")
    return "circle"


def detect(image: np.ndarray, min_fraction: float = 0.01) -> list[Detection]:
    """Recover the shapes in an image: one detection per palette colour covering ``min_fraction`` of the pixels.

    Pixels are assigned to the nearest palette colour or the background (Euclidean RGB); colours with too few pixels
    are noise. Shape comes from the row widths (:func:`_classify_shape`), size from the bounding box side, position
    from the box centre (a 1% percentile box, so stray pixels do not stretch it). Sorted by pixel count, largest
    first.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    h, w, _ = img.shape
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # (C+1, 3)
    dist = ((img[:, :, None, :].astype(np.float32) - palette[None, None]) ** 2).sum(-1)  # (H, W, C+1)
    label = dist.argmin(-1)  # 0 = background
    found = []
    for i, name in enumerate(COLOURS, start=1):
        ys, xs = np.nonzero(label == i)
        if len(xs) < min_fraction * h * w:
            continue
        # Robust bounding box: ignore the outermost 1% of stray pixels on each side.
        x0, x1 = np.percentile(xs, [1, 99])
        y0, y1 = np.percentile(ys, [1, 99])
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        shape = _classify_shape(xs, ys, int(round(y0)), int(round(y1)))
        side = max(bw, bh) / w
        size = "small" if side < (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2 else "large"
        position = _position_name((x0 + x1 + 1) / 2 / w, (y0 + y1 + 1) / 2 / h)  # box centre, not centroid
        found.append(Detection(name, shape, size, position, int(len(xs))))
    return sorted(found, key=lambda d: -d.pixels)


def check_image(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Judge an image against the scene its caption describes.

    Returns per-attribute verdicts ``colour``, ``shape``, ``size``, ``position`` (for two shapes: the relation between
    the two colours' centroids, and size is not judged) and ``count`` (exactly as many shapes as asked), plus ``all``.
    """
    found = {d.colour: d for d in detect(image)}
    want = scene.shapes
    colour_ok = all(s.colour in found for s in want)
    shape_ok = colour_ok and all(found[s.colour].shape == s.shape for s in want)
    count_ok = len(found) == len(want)
    if scene.relation is None:
        s = want[0]
        size_ok = colour_ok and found[s.colour].size == s.size
        position_ok = colour_ok and found[s.colour].position == s.position
    else:
        size_ok = True
        position_ok = colour_ok and _relation_holds(image, want[0].colour, want[1].colour, scene.relation)
    verdict = {"colour": colour_ok, "shape": shape_ok, "size": size_ok, "position": position_ok, "count": count_ok}
    verdict["all"] = all(verdict.values())
    return verdict


def _centroid(image: np.ndarray, colour: str) -> tuple[float, float]:
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    label = ((image[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1).argmin(-1)
    ys, xs = np.nonzero(label == list(COLOURS).index(colour) + 1)
    return float(xs.mean()), float(ys.mean())


def _relation_holds(image: np.ndarray, first: str, second: str, relation: str) -> bool:
    (x1, y1), (x2, y2) = _centroid(image, first), _centroid(image, second)
    return {"above": y1 < y2, "below": y1 > y2, "left of": x1 < x2, "right of": x1 > x2}[relation]


def caption_attributes(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. ``{("red", "circle")}`` for "a small red circle on the left"."""
    words = text.lower().replace(",", " ").replace(":", " ").split()
    pairs = set()
    for a, b in zip(words, words[1:]):
        if a in COLOURS and b in SHAPES:
            pairs.add((a, b))
    return pairs


QUESTIONS: dict[str, str] = {  # question type -> question about a one-shape scene (instruction tuning, VQA)
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "size": "Is it small or large?",
    "position": "Where is the shape?",
}


def questions(scene: Scene) -> dict[str, tuple[str, str]]:
    """Question type -> ``(question, answer)`` about a one-shape scene (:data:`QUESTIONS`); none for two shapes."""
    if len(scene.shapes) != 1:
        return {}
    s = scene.shapes[0]
    answers = {"colour": s.colour, "shape": s.shape, "size": s.size, "position": s.position}
    return {kind: (q, answers[kind]) for kind, q in QUESTIONS.items()}


def recolour(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    """An editing instruction for a one-shape scene, ``make it <colour>``, and the scene it asks for (another colour,
    never a held-out colour-shape pair)."""
    if len(scene.shapes) != 1:
        raise ValueError("recolour edits one-shape scenes")
    s = scene.shapes[0]
    colours = [c for c in COLOURS if c != s.colour and (c, s.shape) not in HELDOUT_PAIRS]
    colour = colours[int(rng.integers(len(colours)))]
    return f"make it {colour}", Scene((replace(s, colour=colour),))


def instruction_texts(text: str, scene: Scene) -> list[str]:
    """The instruction-tuning texts of a pair, cleaned as ``cm3leon prepare`` cleans captions: its caption under
    every caption template, its questions (:func:`questions`) under every VQA template, and for one shape every
    ``make it <colour>`` edit under the editing template (``data/sft.py``)."""
    from cm3leon_lightning.data.sft import every_rendering

    texts = every_rendering("caption", {"caption": text})
    for question, answer in questions(scene).values():
        texts += every_rendering("vqa", {"question": question, "answer": answer})
    if len(scene.shapes) == 1:
        for colour in COLOURS:
            texts += every_rendering("edit", {"image": "-", "instruction": f"make it {colour}", "target": "-"})
    return [" ".join(t.split()) for t in texts]


@dataclass(frozen=True)
class ShapesPair:
    """One generated example: a stable key, its caption, its image and the scene it shows."""

    key: str
    caption: str
    image: np.ndarray
    scene: Scene


def generate_pairs(n: int, split: str = "train", image_size: int = 32, seed: int = 0) -> Iterator[ShapesPair]:
    """``n`` seeded pairs of ``split``; pair ``i`` depends only on ``(seed, split, i)``, so any prefix is stable."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:  # numpy's own error would not name it
        raise ValueError(f"seed must be >= 0, got {seed}")
    split_id = {"train": 0, "heldout": 1}.get(split)
    if split_id is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        scene = sample_scene(rng, split)
        yield ShapesPair(f"shapes-{split}-{seed}-{i:07d}", caption(scene, rng), render(scene, image_size, rng), scene)
