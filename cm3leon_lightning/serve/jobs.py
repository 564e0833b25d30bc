"""What ``cm3leon serve`` decodes: the server's default settings per request kind, and the jobs a request becomes
once checked against the model (``CM3LeonAPI.decode_request``), with the rules that group them into decodes.
This module imports no LitServe.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import torch
from pydantic import BaseModel

from cm3leon_lightning.generation.generate import SETTING_METHODS, TEXT_LAYOUTS, GenerationSettings
from cm3leon_lightning.generation.tasks import task_prefix
from cm3leon_lightning.serve.requests import group_key
from cm3leon_lightning.tokenization.vocab import Document

IMAGE_SETTINGS = ("num_samples", "method", "cfg", "temperature", "top_p", "top_k", "cdk_k", "cdk_alpha")
"""The fields of an :class:`ImageRequest` that override the server's :class:`GenerationSettings`."""

TEXT_SETTINGS = ("layout", "max_new_tokens", "method", "temperature", "top_p")
"""The fields of a :class:`TextRequest` that override the server's :class:`TextSettings`."""

EDIT_SETTINGS = ("num_samples", "method", "text_cfg", "image_cfg", "temperature", "top_p")
"""The fields of an :class:`EditRequest` that override the server's :class:`EditSettings`."""


def ignored_setting(request: BaseModel, defaults: Any, default_flag: str) -> str | None:
    """The message refusing a sampling field of ``request`` that its decoding method would ignore (``temperature``
    with greedy, ``top_p`` without ``top_p``, ``cfg`` with ``cd_k``, ``cdk_k`` without it...), None when there is
    none: such a request was decoded as if the field had been left out, silently. As ``cm3leon generate`` refuses
    its flags, a value equal to the server's default (``defaults``, whose ``method`` a request without one takes,
    given by ``default_flag``) is no error."""
    method = getattr(request, "method", None)
    given = f"method {method}" if method else f"method {defaults.method} (this server's {default_flag})"
    method = method or defaults.method
    kind_methods = get_args(get_args(type(request).model_fields["method"].annotation)[0])
    for name, readers in SETTING_METHODS.items():
        value = getattr(request, name, None)
        if value is None or method in readers or value == getattr(defaults, name, None):
            continue
        used = [m for m in kind_methods if m in readers]
        where = f"{', '.join(used[:-1])} or {used[-1]}" if len(used) > 1 else used[0]
        return f"{name} {value} applies to method {where} only; this request decodes with {given}, which ignores it"
    return None


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError naming ``temperature`` or ``top_p`` unless the decoder takes it: a server's bad default was
    accepted and then refused with every request (also the greedy ones, whose decoder checks it too) as if the request
    had sent it."""
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


@dataclass(frozen=True)
class TextSettings:
    """Image-to-text defaults of a server (``cm3leon serve --layout/--max-new-tokens/--text-method``).

    Attributes:
        layout: ``infill`` or ``image_first`` (see :func:`~cm3leon_lightning.generation.generate.generate_text`).
        max_new_tokens: the longest answer.
        method: ``greedy``, ``temperature`` or ``top_p``.
        temperature: softmax temperature for the sampling methods.
        top_p: nucleus mass for ``top_p``.
    """

    layout: str = "infill"
    max_new_tokens: int = 32
    method: str = "greedy"
    temperature: float = 1.0
    top_p: float = 0.9

    def __post_init__(self) -> None:
        if self.layout not in TEXT_LAYOUTS:
            raise ValueError(f"layout must be one of {TEXT_LAYOUTS}, got {self.layout!r}")
        if self.method not in ("greedy", "temperature", "top_p"):
            raise ValueError(f"text method must be greedy, temperature or top_p, got {self.method!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_p)


@dataclass(frozen=True)
class EditSettings:
    """Image-editing defaults of a server (``cm3leon serve --text-cfg/--image-cfg``; the rest from text-to-image's).

    Attributes:
        task: ``edit`` or a grounded-generation task (:data:`~cm3leon_lightning.generation.tasks.IMAGE_TASKS`).
        num_samples: edited candidates per request.
        method: ``greedy``, ``temperature`` or ``top_p``.
        text_cfg: text guidance scale (paper 7.5).
        image_cfg: image guidance scale (paper 1.5).
        temperature: softmax temperature.
        top_p: nucleus mass for ``top_p``.
    """

    task: str = "edit"
    num_samples: int = 4
    method: str = "top_p"
    text_cfg: float = 7.5
    image_cfg: float = 1.5
    temperature: float = 1.0
    top_p: float = 0.9

    def __post_init__(self) -> None:
        task_prefix(self.task)  # a known task
        if self.method not in ("greedy", "temperature", "top_p"):
            raise ValueError(f"edit method must be greedy, temperature or top_p, got {self.method!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        check_sampling(self.temperature, self.top_p)
        for name, scale in (("text_cfg", self.text_cfg), ("image_cfg", self.image_cfg)):
            if not abs(scale) < math.inf:  # NaN fails the comparison too
                raise ValueError(f"{name} must be finite, got {scale}")


@dataclass
class ImageJob:
    """A decoded text-to-image request: what :meth:`CM3LeonAPI.predict` needs to run it."""

    prompt: str
    ids: list[int]
    settings: GenerationSettings
    seed: int | None
    rerank: bool
    keep: int | None
    return_codes: bool
    retrieved_keys: list[str] = field(default_factory=list)
    retrieved: list[Document] = field(default_factory=list)


@dataclass
class TextJob:
    """A decoded image-to-text request."""

    codes: torch.Tensor  # (grid_h * grid_w,)
    instruction: list[int]
    settings: TextSettings
    seed: int | None


@dataclass
class EditJob:
    """A decoded image-editing request."""

    codes: torch.Tensor  # (grid_h * grid_w,) the source image
    instruction: list[int]
    settings: EditSettings
    seed: int | None
    return_codes: bool


@dataclass
class InfillJob:
    """A decoded infilling request: the masked document, its span kinds and the sampling of each filling."""

    ids: list[int]
    kinds: list[str]
    num_samples: int
    method: str
    temperature: float
    top_p: float
    max_span_tokens: int
    seed: int | None
    return_codes: bool
    has_image: bool


Job = ImageJob | TextJob | EditJob | InfillJob

INFILL_SETTINGS = ("method", "temperature", "top_p", "max_span_tokens")
"""The fields of an :class:`InfillJob` that must agree for it to share a decode."""


def job_rows(job: Job) -> int:
    """Sequences a job adds to a decode: guidance streams x candidates."""
    if isinstance(job, InfillJob):
        return job.num_samples
    if isinstance(job, TextJob):
        return 1
    if isinstance(job, EditJob):
        return 3 * job.settings.num_samples
    s = job.settings
    return (2 if s.method == "cd_k" or s.cfg != 1.0 else 1) * s.num_samples


def job_key(job: Job, index: int) -> tuple:
    """The decode group of the job at position ``index`` of a batch (see ``serve.requests.group_key``)."""
    if isinstance(job, InfillJob):  # documents whose spans have the same modalities decode together
        settings = {k: v for k, v in asdict(job).items() if k in INFILL_SETTINGS}
        seeded = job.seed if job.method != "greedy" else None
        return ("InfillJob", tuple(job.kinds), *group_key(settings, seeded, index))
    settings = asdict(job.settings)
    settings.pop("num_samples", None)  # a request is decoded as one row per candidate: any numbers mix
    seeded = job.seed if job.settings.method != "greedy" else None  # greedy ignores the seed
    return (type(job).__name__, *group_key(settings, seeded, index))
