"""The JSON requests and responses of ``cm3leon serve``, and the pure helpers around them.

One endpoint, ``POST /predict``, takes four kinds of request, told apart by their fields:

- text-to-image, ``{"prompt": "a red circle", "num_samples": 4, "cfg": 3, "seed": 1, "rerank": true}``
  (:class:`ImageRequest`), answered with ``{"images": [<base64 PNG>, ...], "seed": 1, "clip_scores": [...]}`` (and
  ``"retrieved": [<bank keys>]`` when documents were placed before the prompt, ``"codes"`` when asked for);
- image-to-text, ``{"image": <base64 PNG or JPEG>, "instruction": "Describe the given picture."}``
  (:class:`TextRequest`), answered with ``{"text": "..."}``;
- image editing, ``{"image": <base64>, "edit": "make the circle blue", "num_samples": 2}`` (:class:`EditRequest`),
  answered like text-to-image;
- infilling, ``{"infill": "a <mask> circle", "image": <base64>, "rows": "16:32"}`` (:class:`InfillRequest`),
  answered with ``{"texts": [...], "images": [...]}``.

The text fields (``prompt``, ``instruction``, ``edit``, ``infill``) are read as ``cm3leon prepare`` cleaned the
training captions: control characters become spaces, whitespace runs one space, the ends are stripped (a trailing
newline added tokens the model never saw after a caption); text left empty so is refused (422) naming its field.
Fields left out take the server's defaults (``cm3leon serve --num-samples/--method/--cfg ...``); a sampling field
the request's method (its own or the server's) would ignore, ``temperature`` with greedy, ``top_p`` without
``top_p``, ``cfg`` with ``cd_k``, ``cdk_k`` without it, is refused (422) naming it, as ``cm3leon generate`` refuses
its flag (:func:`~cm3leon_lightning.serve.jobs.ignored_setting`). The models forbid
unknown fields and check every bound, so FastAPI answers a malformed request with 422 naming the field before it
reaches the model (and before it can share a batch with other requests): a body whose fields mix two kinds
(``prompt`` with ``image``) or name none is refused in one sentence naming those fields and the four kinds
(:func:`check_kind`), and a number field given ``NaN`` or an infinity (which Python's JSON reader takes), a string
or ``true``/``false``, or a flag given anything but ``true``/``false``, in one naming the field and what it takes
(``cfg must be a number in [0, 100], not NaN``; ``num_samples must be an integer in [1, 64], not the string "4"``);
an unknown field is named with the fields its kind takes (:func:`explain_unknown_fields`). This module imports
pydantic, not LitServe.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from cm3leon_lightning.generation.sampling import SEED_LIMIT
from cm3leon_lightning.generation.tasks import IMAGE_TASKS

IMAGE_METHODS = ("greedy", "temperature", "top_p", "cd_k")
"""Decoding methods of a text-to-image request (``generate_image``)."""

TEXT_METHODS = ("greedy", "temperature", "top_p")
"""Decoding methods of an image-to-text request (``generate_text``)."""

ImageTask = Literal[IMAGE_TASKS]  # type: ignore[valid-type]
"""The ``task`` of an :class:`EditRequest`: ``edit`` or a grounded-generation task."""

MAX_IMAGE_PIXELS = 64_000_000
"""The most pixels (width x height) of an image a request may send; the model sees it at 256x256 anyway."""

MAX_TEXT_CHARS = 65_536
"""The longest text field (``prompt``, ``instruction``, ``edit``, ``infill``) in characters: 16 per position of a
4096-token context. Longer text is refused before it is tokenized (a 20 MB prompt held the worker, and every request
queued behind it, for 30 seconds only to be refused as too long for the context)."""


def _encodable(text: str) -> str:
    """``text`` if it is valid Unicode (JSON's ``\\udfff`` escapes give lone surrogates the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: {e.reason} at position {e.start}") from e
    return text


_WHAT = {"prompt": "the prompt", "instruction": "the instruction", "edit": "the edit", "infill": "the caption"}


def _model_text(text: str, info: ValidationInfo) -> str:
    """``text`` as the model reads it: ``cm3leon prepare``'s caption rule
    (:func:`~cm3leon_lightning.data.cleaning.model_text`), so a trailing newline, a tab or a doubled space tokenizes
    (and embeds with CLIP for retrieval and re-ranking) as the training captions did. An empty ``instruction`` stays
    empty (plain captioning); any other text that cleans to nothing is refused naming its field."""
    from cm3leon_lightning.data.cleaning import model_text

    name = info.field_name or "text"
    return model_text(text, name, _WHAT.get(name, "the text"), allow_empty=name == "instruction")


Text = Annotated[
    str, StringConstraints(max_length=MAX_TEXT_CHARS), AfterValidator(_encodable), AfterValidator(_model_text)
]
"""A request's text field: any valid Unicode string of at most :data:`MAX_TEXT_CHARS` characters, cleaned as the
training captions were (control characters to spaces, repeated whitespace to one, ends stripped)."""


def allowed_numbers(request: type[BaseModel], name: str) -> str | None:
    """What the number field ``name`` of ``request`` takes, from its type and bounds (``a number in [0, 100]``,
    ``an integer >= 1``); None for a field that is no number."""
    info = request.model_fields[name]
    types = set(get_args(info.annotation)) or {info.annotation}
    if not types & {int, float} or bool in types:
        return None
    bound = {a: getattr(c, a) for c in info.metadata for a in ("ge", "gt", "le", "lt") if hasattr(c, a)}
    text = {a: f"{v:g}" if isinstance(v, float) else str(v) for a, v in bound.items()}
    low = f"[{text['ge']}" if "ge" in text else f"({text['gt']}" if "gt" in text else ""
    high = f"{text['le']}]" if "le" in text else f"{text['lt']})" if "lt" in text else ""
    what = "a number" if float in types else "an integer"
    if low and high:
        return f"{what} in {low}, {high}"
    if low:
        return f"{what} {'>=' if low[0] == '[' else '>'} {low[1:]}"
    return what


class _Request(BaseModel):
    """The checks every request shares: unknown fields are refused, and so are non-finite numbers and values of
    the wrong JSON type (a string or a boolean for a number, anything but a boolean for a flag), by name."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``NaN`` and the infinities (``NaN``, ``Infinity``, ``1e400`` in the JSON) in a number field in one
        sentence naming the field and its range: pydantic said ``cfg: Input should be less than or equal to 100`` for
        ``NaN``, and ``Input should be a finite number`` without the range."""
        if isinstance(value, float) and not math.isfinite(value) and info.field_name:
            allowed = allowed_numbers(cls, info.field_name)
            if allowed is not None:
                got = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
                raise PydanticCustomError("finite_number", f"{info.field_name} must be {allowed}, not {got}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _json_type(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse a string or ``true``/``false`` in a number field, and anything but ``true``/``false`` in a flag, in
        one sentence naming the field and what it takes (``num_samples must be an integer in [1, 64], not true``):
        pydantic's lax mode read ``"num_samples": true`` as 1 sample, ``"seed": "7"`` as seed 7 and ``"rerank":
        "no"`` or ``0`` as false."""
        name = info.field_name
        if name is None or value is None:
            return value
        flag = cls.model_fields[name].annotation is bool
        if (flag and isinstance(value, bool)) or (not flag and not isinstance(value, (bool, str))):
            return value
        allowed = "true or false" if flag else allowed_numbers(cls, name)
        if allowed is None:  # a text field
            return value
        if isinstance(value, bool):
            got = "true" if value else "false"
        elif isinstance(value, str):
            got = f"the string {json.dumps(value[:40] + ('...' if len(value) > 40 else ''))}"
        else:
            got = json.dumps(json_safe(value, 40, 4))
        raise PydanticCustomError("bool_type" if flag else "number_type", f"{name} must be {allowed}, not {got}")


class ImageRequest(_Request):
    """A text-to-image request: sample ``num_samples`` images of ``prompt`` (paper section 3.1).

    ``seed`` makes the request reproducible: a seeded request is decoded on its own, so its images depend only on
    the seed and the settings. Requests without a seed and with equal settings share one decode batch.
    """

    prompt: Text = Field(min_length=1, description="the caption to draw")
    num_samples: int | None = Field(None, ge=1, le=64, description="candidates to sample")
    method: Literal["greedy", "temperature", "top_p", "cd_k"] | None = None
    cfg: float | None = Field(None, ge=0.0, le=100.0, description="classifier-free guidance scale (1 = none)")
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    cdk_k: int | None = Field(None, ge=1)
    cdk_alpha: float | None = Field(None, ge=0.0, le=1.0)  # 0: every id plausible, as generate takes it
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    retrieve: int | None = Field(
        None, ge=0, le=16, description="documents retrieved and placed before the prompt (server needs --retrieve)"
    )
    rerank: bool = Field(False, description="order the candidates by CLIP score, best first (server needs --clip)")
    keep: int | None = Field(None, ge=1, description="return only the best `keep` candidates (with rerank)")
    return_codes: bool = Field(False, description="also return the image codes")


class TextRequest(_Request):
    """An image-to-text request: caption an image or answer ``instruction`` about it (paper section 4.2)."""

    image: str = Field(min_length=1, description="base64 PNG or JPEG (a data: URL prefix is allowed)")
    instruction: Text = Field("", description="instruction or question; empty: plain captioning")
    layout: Literal["infill", "image_first"] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=1024)
    method: Literal["greedy", "temperature", "top_p"] | None = None
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)


class EditRequest(_Request):
    """An image-editing request: ``num_samples`` edits of ``image`` following ``edit``, with separate text and image
    guidance (paper section 4.1; a model instruction-tuned on ``edit`` documents). With ``task`` ``edge_to_image``
    (etc.) it is grounded generation: ``image`` holds the features and ``edit`` the caption. Seeds as in
    :class:`ImageRequest`."""

    image: str = Field(min_length=1, description="base64 PNG or JPEG of the picture to edit (or its features)")
    edit: Text = Field(min_length=1, description="the edit instruction (or, for a grounded task, the caption)")
    task: ImageTask = Field("edit", description="edit, or grounded generation: edge_to_image, ...")
    num_samples: int | None = Field(None, ge=1, le=64)
    method: Literal["greedy", "temperature", "top_p"] | None = None
    text_cfg: float | None = Field(None, ge=0.0, le=100.0, description="text guidance scale")
    image_cfg: float | None = Field(None, ge=0.0, le=100.0, description="image guidance scale")
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    return_codes: bool = Field(False, description="also return the image codes")


class InfillRequest(_Request):
    """A CM3 infilling request (paper section 2.2): fill each ``<mask>`` of ``infill`` (the caption of ``image`` when
    one is given) and, with ``rows``, redraw those grid rows of the image; ``num_samples`` fillings. Requests whose
    masked spans have the same modalities and settings share a decode; a seeded one (sampling) is decoded alone."""

    infill: Text = Field(min_length=1, description="the caption, with <mask> where text is to be filled")
    image: str | None = Field(None, min_length=1, description="base64 PNG or JPEG the caption belongs to")
    rows: str | None = Field(None, pattern=r"^\d*:\d*$", description="grid rows A:B of the image to redraw")
    num_samples: int | None = Field(None, ge=1, le=64)
    method: Literal["greedy", "temperature", "top_p"] | None = None
    temperature: float | None = Field(None, ge=0.0, le=10.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_span_tokens: int | None = Field(None, ge=1, le=1024, description="the longest text span")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    return_codes: bool = Field(False, description="also return the image codes")


KINDS = (
    "prompt (text-to-image), image with an optional instruction (image-to-text), image and edit (image editing) or "
    "infill with an optional image (infilling)"
)
"""The four kinds of request, by the fields that tell them apart (the end of :func:`check_kind`'s messages)."""


def check_kind(value: Any) -> Any:
    """``value`` (a request body) unchanged when its fields name one kind of request; else refused in one sentence
    naming the fields that clash (``prompt`` with ``image``, ``instruction``, ``edit`` or ``infill``; two of
    ``instruction``, ``edit`` and ``infill``) or saying that it has none of them, and the fields each kind takes.
    The union's errors named one kind's model: ``{"prompt": ..., "image": ...}`` got "image.prompt: Extra inputs are
    not permitted" and ``{}`` "prompt.prompt: Field required".

    Raises:
        PydanticCustomError: ``request_kind``, the message as above.
    """
    if not isinstance(value, dict):
        return value
    kinds = [name for name in ("prompt", "instruction", "edit", "infill") if name in value]
    if "prompt" in value and "image" in value:
        kinds.insert(1, "image")
    if len(kinds) > 1:
        names = f"{', '.join(kinds[:-1])} and {kinds[-1]}"
        raise PydanticCustomError("request_kind", f"{names} cannot be sent together: a request has either {KINDS}")
    if not kinds and "image" not in value:
        raise PydanticCustomError(
            "request_kind", f"the request has none of prompt, image or infill: it needs either {KINDS}"
        )
    return value


def request_kind(value: Any) -> str:
    """``"infill"`` for a request with an ``infill`` field, ``"edit"`` for one with an ``edit`` field (image editing),
    ``"image"`` for one with an ``image`` or ``instruction`` field (image-to-text), else ``"prompt"``
    (text-to-image)."""
    if isinstance(value, dict):
        for kind in ("infill", "edit", "image", "instruction"):
            if kind in value:
                return "image" if kind == "instruction" else kind
        return "prompt"
    return {InfillRequest: "infill", EditRequest: "edit", TextRequest: "image"}.get(type(value), "prompt")


GenerationRequest = Annotated[
    Union[  # noqa: UP007 - pydantic's tagged union
        Annotated[ImageRequest, Tag("prompt")],
        Annotated[TextRequest, Tag("image")],
        Annotated[EditRequest, Tag("edit")],
        Annotated[InfillRequest, Tag("infill")],
    ],
    Discriminator(request_kind),
    BeforeValidator(check_kind),  # runs first: a body of no single kind is named as such, not by one kind's fields
]
"""The body of ``POST /predict``: an :class:`ImageRequest`, :class:`TextRequest`, :class:`EditRequest` or
:class:`InfillRequest`, checked first by :func:`check_kind`."""


KIND_MODELS: dict[str, tuple[str, type[BaseModel]]] = {
    "prompt": ("a text-to-image request", ImageRequest),
    "image": ("an image-to-text request", TextRequest),
    "edit": ("an image-editing request", EditRequest),
    "infill": ("an infilling request", InfillRequest),
}
"""Each tag of :data:`GenerationRequest`'s union (the field that tells the kind apart): the kind's name and model."""


def unknown_field_message(tag: str, field: str) -> str:
    """The 422 message for a ``field`` that the request kind ``tag`` does not take, naming the fields it takes and the
    kinds that do take ``field`` (pydantic said only "Extra inputs are not permitted"); a long field name is cut."""
    what, model = KIND_MODELS[tag]
    name = json_safe(field, max_chars=40)  # the request's own text: cut short, lone surrogates escaped
    message = f"{name} is not a field of {what}, which takes {', '.join(model.model_fields)}"
    others = [f"{kind} (with {key})" for key, (kind, m) in KIND_MODELS.items() if field in m.model_fields]
    return message + (f"; {name} belongs to {' or '.join(others)}" if others else "")


def explain_unknown_fields(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``errors`` (pydantic's or FastAPI's, whose locations start with ``body``) with the message of each unknown
    field replaced by :func:`unknown_field_message`; the other errors unchanged."""
    out = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "extra_forbidden" and len(loc) >= 2 and loc[-2] in KIND_MODELS:
            e = {**e, "msg": unknown_field_message(str(loc[-2]), str(loc[-1]))}
        out.append(e)
    return out


def error_line(error: ValidationError) -> str:
    """A request's validation errors in one line, each naming its field as the HTTP endpoint's 422 does
    (``num_samples: Input should be greater than or equal to 1; colour is not a field of a text-to-image request,
    which takes prompt, ...``): pydantic's own text spans lines, names the union's model types and a documentation
    URL."""
    parts = []
    for e in explain_unknown_fields(error.errors(include_url=False)):
        field = ".".join(str(x) for x in e["loc"][1:])  # loc[0] is the kind's tag
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]  # without "Value error, "
        named = not field or msg.startswith((field, json_safe(field, max_chars=40)))  # a long unknown name is cut
        parts.append(msg if named else f"{field}: {msg}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Rejected:
    """A request that passed the schema but not the server's own checks (too long for the context, an unreadable
    image, a setting the server cannot honour); answered with ``status`` and ``detail`` without touching the
    other requests of its batch."""

    status: int
    detail: str


def group_key(settings: dict[str, Any], seed: int | None, index: int) -> tuple:
    """The decode batch a request joins: requests with equal settings and no seed share one; a seeded request gets
    its own (keyed by its position ``index``), so its samples do not depend on what else was in the batch."""
    return (tuple(sorted(settings.items())), index if seed is not None else None)


def chunk_by_rows(rows: list[int], max_rows: int) -> list[list[int]]:
    """Split a decode group into consecutive chunks of at most ``max_rows`` sequences (guidance streams x
    candidates of each request), so a burst of requests cannot outgrow the device's memory in one decode; a request
    larger than ``max_rows`` alone is its own chunk. Returns the positions of each chunk."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    chunks: list[list[int]] = []
    used = 0
    for i, n in enumerate(rows):
        if not chunks or used + n > max_rows:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks


def decode_base64_image(data: str, resolution: int) -> torch.Tensor:
    """A base64 PNG/JPEG (optionally a ``data:`` URL; whitespace such as the line breaks of wrapped base64 is ignored)
    -> ``(3, R, R)`` uint8, centre-cropped and resized (bicubic).

    Raises:
        ValueError: not base64 (naming the first character outside the alphabet), not a PNG or JPEG PIL can read,
            or more than :data:`MAX_IMAGE_PIXELS` pixels (a small file may declare a huge image); the message names
            the ``image`` field.
    """
    from PIL import Image, UnidentifiedImageError

    from cm3leon_lightning.generation.cli import square_image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())  # line breaks of wrapped base64 (MIME, `base64` without -w0), a trailing newline
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        bad = next(((i, c) for i, c in enumerate(data) if not (c.isascii() and (c.isalnum() or c in "+/="))), None)
        where = f": {bad[1]!r} at character {bad[0]} of the base64 text" if bad else ""
        raise ValueError(f"image: not valid base64 ({e}{where})") from e
    try:
        img = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))  # reads the header only
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, DecompressionBombError, ...
        # PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" says nothing; the first bytes tell a GIF
        # (b'GIF89a'), a TIFF or text apart
        why = f"they begin {raw[:8]!r}" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(f"image: {len(raw)} bytes that are not a readable PNG or JPEG ({why})") from e
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image: {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS:,} this server reads"
        )
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails while decoding, in PIL's error types
        raise ValueError(f"image: {len(raw)} bytes that are not a readable PNG or JPEG ({e})") from e
    return square_image(img, resolution)


def encode_png_base64(image: torch.Tensor) -> str:
    """A ``(C, H, W)`` float image in ``[-1, 1]`` (``VQGAN.decode``'s range) -> base64 PNG."""
    from cm3leon_lightning.generation.cli import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def json_safe(value: Any, max_chars: int = 200, max_items: int = 20) -> Any:
    """``value`` (a validation error's echo of the request) as strict, short JSON: NaN and infinities (Python's
    ``json`` reads ``NaN``, ``Infinity`` and ``1e400``) become strings, lone surrogates are escaped, strings longer
    than ``max_chars`` are cut and lists and dicts keep their first ``max_items`` entries (a misspelt field must not
    echo a 20 MB image or a long list back); recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        text = value if len(value) <= max_chars else f"{value[:max_chars]}... ({len(value)} characters)"
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        items = list(value.items())
        out = {json_safe(k, max_chars, max_items): json_safe(v, max_chars, max_items) for k, v in items[:max_items]}
        if len(items) > max_items:
            out["..."] = f"{len(items)} entries"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [json_safe(v, max_chars, max_items) for v in value[:max_items]]
        return out_list + ([f"... ({len(value)} items)"] if len(value) > max_items else [])
    return value
