"""How the fused decode step's kernels are launched: the experimental launch options, programmatic dependent launch,
and the split kernels' arrival counters.

:class:`FusedOptions` holds four choices, each off until a GPU measurement makes it a default (docs/benchmarks.md):

* ``pdl``: programmatic dependent launch (sm_90+): each kernel is scheduled while the previous one finishes;
* ``splits``: the split kernels (split-K in the linear kernel's tuning configurations, the attention split over the
  filled cache), whose hand-off between programs has not yet run natively;
* ``prefetch_next``: each linear kernel asks the L2 cache for the next linear kernel's weights as it starts (the
  step's last asks for the first block's, for the next step), and each attention kernel for the next layer's
  filled cache slots, so that the stream from memory carries on through the gaps between kernels instead of
  starting again with each (:func:`prefetch_mode`: in bulk on sm_90, line by line before);
* ``persistent``: the whole transformer step in one launch of resident programs that take its work as tasks from a
  queue (:mod:`~cm3leon_lightning.model.persistent`; the other three options then apply to nothing but the sampling
  kernel's PDL), for steps of at most 63 rows.

They are read from the environment (``CM3LEON_PDL``, ``CM3LEON_FUSED_SPLITS``, ``CM3LEON_PREFETCH_NEXT``,
``CM3LEON_PERSISTENT``, ``1`` for on, ``0`` for off, another value refused) unless set in code with
:func:`use_fused_options` (what ``benchmarks/generation.py --fused-options`` does to compare them in one process). A
CUDA graph keeps the options it was captured with; the decoder captures one graph per set of options. This module
imports no Lightning and no Triton at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

OPTION_ENV = {
    "pdl": "CM3LEON_PDL",
    "splits": "CM3LEON_FUSED_SPLITS",
    "prefetch_next": "CM3LEON_PREFETCH_NEXT",
    "persistent": "CM3LEON_PERSISTENT",
}
"""The environment variable of each :class:`FusedOptions` field (``1``: on)."""

PDL_ENV, SPLITS_ENV, PREFETCH_NEXT_ENV, PERSISTENT_ENV = OPTION_ENV.values()


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """Experimental launch choices of the fused decode step (see the module docstring); all off by default."""

    pdl: bool = False
    splits: bool = False
    prefetch_next: bool = False
    persistent: bool = False

    @classmethod
    def from_env(cls) -> FusedOptions:
        """The options the environment sets (:data:`OPTION_ENV`): ``1`` (or ``true``, ``on``, ``yes``, as Triton reads
        its own switches) for on; unset, empty, ``0``, ``false``, ``off`` or ``no`` for off.

        Raises:
            ValueError: any other value (``CM3LEON_PERSISTENT=2`` would otherwise have left the option off silently,
                and a benchmark would have timed the step without it under its name).
        """
        return cls(**{name: env_flag(env) for name, env in OPTION_ENV.items()})

    @classmethod
    def parse(cls, text: str) -> FusedOptions:
        """Options from a label: ``base`` (none) or names joined by ``+`` (``pdl``, ``splits``, ``prefetch``,
        ``prefetch_next``, ``persistent``), e.g. ``prefetch+splits``.

        Raises:
            ValueError: an unknown name, naming the known ones.
        """
        names = [] if text.strip() == "base" else [n.strip() for n in text.split("+")]
        fields = {"prefetch": "prefetch_next", **{f: f for f in OPTION_ENV}}
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ValueError(
                f"fused options: unknown {unknown} in {text!r}; use 'base' or {sorted(fields)} joined by +"
            )
        return cls(**{fields[n]: True for n in names})

    @property
    def label(self) -> str:
        """The inverse of :meth:`parse`: ``base`` or the options on, joined by ``+``."""
        names = ["prefetch" if f == "prefetch_next" else f for f in OPTION_ENV if getattr(self, f)]
        return "+".join(names) or "base"


ON_VALUES = ("1", "true", "on", "yes", "y")
OFF_VALUES = ("", "0", "false", "off", "no", "n")


def env_flag(env: str) -> bool:
    """Whether the environment variable ``env`` is set on (:data:`ON_VALUES`, any case) or off (:data:`OFF_VALUES`,
    or unset).

    Raises:
        ValueError: another value, naming the variable and the values it takes.
    """
    value = os.environ.get(env, "").strip().lower()
    if value in ON_VALUES:
        return True
    if value in OFF_VALUES:
        return False
    raise ValueError(f"{env}={os.environ[env]!r}: use 1 (on) or 0 (off)")


_OPTIONS: FusedOptions | None = None


def fused_options() -> FusedOptions:
    """The options in force: those of the innermost :func:`use_fused_options`, else :meth:`FusedOptions.from_env`."""
    return _OPTIONS if _OPTIONS is not None else FusedOptions.from_env()


@contextlib.contextmanager
def use_fused_options(options: FusedOptions) -> Iterator[FusedOptions]:
    """Within the block, fused steps launch with ``options`` whatever the environment says (not thread-local: one
    decode at a time)."""
    global _OPTIONS
    before, _OPTIONS = _OPTIONS, options
    try:
        yield options
    finally:
        _OPTIONS = before


@functools.cache
def _pdl_capable(index: int) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra import cuda

    has_api = hasattr(cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__
    return has_api and torch.cuda.get_device_capability(index)[0] >= 9


def launch_options(device: torch.device, options: FusedOptions | None = None) -> dict[str, bool]:
    """Keyword arguments for launching a fused kernel on ``device``: ``PDL`` (the kernels' flag) and ``launch_pdl``
    (Triton's), both True when the ``pdl`` option is on, on CUDA GPUs of compute capability 9.0 or later (H100/H200)
    with a Triton that has grid dependency control, else none. Each kernel then waits for the previous one before
    touching memory; CUDA graphs keep the dependency. Opt-in: its first version was slower on an H200, and the present
    one (wait, then signal) is not yet measured. ``options`` default :func:`fused_options` (as for the functions
    below; a launch that asks several of them reads the environment once)."""
    if device.type != "cuda" or not (options or fused_options()).pdl:
        return {}
    if not _pdl_capable(device.index if device.index is not None else torch.cuda.current_device()):
        return {}
    return {"PDL": True, "launch_pdl": True}


def prefetches_next(device: torch.device, options: FusedOptions | None = None) -> bool:
    """Whether linear kernels on ``device`` prefetch the next one's weights: the ``prefetch_next`` option, on CUDA
    (the prefetch is inline PTX, which Triton's interpreter does not run; it changes no result, only timing)."""
    return device.type == "cuda" and (options or fused_options()).prefetch_next


@functools.cache
def _bulk_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def prefetch_mode(device: torch.device, aligned: bool) -> int:
    """The kernels' ``PREFETCH_NEXT`` for a prefetch on ``device``: 2 (bulk, one copy-engine instruction per 32 KB)
    on GPUs of compute capability 9.0 or later when every address asked for is 16-byte ``aligned``, else 1 (one
    ``prefetch.global.L2`` per line)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 if aligned and _bulk_capable(index) else 1


def attention_splits(pairs: int, device: torch.device, options: FusedOptions | None = None) -> int:
    """How many programs share one (row, head)'s cache in the fused attention by default: with the ``splits`` option,
    enough for ``pairs`` (rows x heads) to give every SM of the GPU two programs, at most 8 (one 128-slot tile each
    over a 1024-token image); else, and on a CPU, 1."""
    if device.type != "cuda" or not (options or fused_options()).splits:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, 2 * sms // pairs))


COUNTERS = 1 << 16
"""Arrival counters per device (256 KB): the linear kernel's split-K uses one per column block (at most
``fused_linear_kernel.SPLIT_MAX_BLOCKS``), the attention's split one per (row, head)."""

_COUNTERS: dict[torch.device, Tensor] = {}


def split_counters(device: torch.device, size: int = 0) -> Tensor:
    """The arrival counters of the split kernels on ``device`` (:data:`COUNTERS` int32, zero between launches, as
    the last split of each block or (row, head) resets its own). Allocated once and never replaced, since captured
    CUDA graphs keep its address; shared by every fused launch on the device, which the stream orders (two fused
    decodes running at once on different streams of one device would need their own).

    Raises:
        ValueError: ``size`` counters asked for, more than there are.
    """
    if size > COUNTERS:
        raise ValueError(f"the fused kernels' split counters hold {COUNTERS}, {size} asked for (rows x heads)")
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]
