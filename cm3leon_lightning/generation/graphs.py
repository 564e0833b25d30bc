"""How the single-token decode step runs: eager, compiled, or replayed from a captured CUDA graph.

A decode step at batch 2 is a few hundred small kernels; launching them one by one from Python costs more than
running them. Two ways to remove that cost, both giving the eager step's tokens:

* ``reduce-overhead``: ``torch.compile(decode_step, mode="reduce-overhead")``, i.e. inductor kernels replayed through
  CUDA-graph trees, which manage the static inputs themselves;
* ``graph`` / ``inductor-graph``: :class:`GraphedStep` captures the eager step (``graph``) or the inductor-compiled one
  (``inductor-graph``) once, in one ``torch.cuda.CUDAGraph`` with static input buffers, and replays it every token.
  Nothing is checked or copied per replay beyond the three small inputs, and the KV cache (the model's buffers) is
  read and written in place.

:func:`resolve_mode` turns the user-facing ``compile`` argument (``None``, a bool or a mode name) into one of
:data:`MODES`. This module imports no Lightning.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

MODES = ("eager", "inductor", "reduce-overhead", "max-autotune", "graph", "inductor-graph", "fused", "fused-graph")
"""Decode-step modes: ``eager``; ``inductor`` (``torch.compile``, no CUDA graphs; the compiled mode on CPU);
``reduce-overhead`` (``torch.compile`` with CUDA-graph trees); ``max-autotune`` (the same, with inductor benchmarking
Triton matmul templates against cuBLAS, which lets it fuse pointwise work into the matmuls; minutes of warm-up);
``graph`` (the eager step in one captured CUDA graph); ``inductor-graph`` (the compiled step in one captured CUDA
graph); ``fused`` (the transformer through the five Triton kernels per block of
:mod:`cm3leon_lightning.model.fused` and the sampling kernel of
:mod:`cm3leon_lightning.generation.sampling_kernel`, launched one by one; CUDA, or CPU under ``TRITON_INTERPRET=1``);
``fused-graph`` (that step in one captured CUDA graph)."""
CUDA_ONLY = ("reduce-overhead", "max-autotune", "graph", "inductor-graph", "fused-graph")
FUSED_MODES = ("fused", "fused-graph")
"""Modes whose step runs the transformer through :func:`~cm3leon_lightning.model.fused.fused_decode_forward`."""
GRAPH_MODES = ("graph", "inductor-graph", "fused-graph")
"""Modes whose step is captured by hand in one CUDA graph (:class:`GraphedStep`)."""
TREE_MODES = ("reduce-overhead", "max-autotune")
"""Modes replayed through torch.compile's CUDA-graph trees (a step must be marked, outputs copied before reuse)."""
DEFAULT_CUDA_MODE = "fused-graph"
"""What ``compile=None`` or ``True`` picks on CUDA for a model the fused step supports (GELU or ReLU MLP, Triton
installed): the fastest step measured (docs/benchmarks.md, one H200, 350m bf16 with CFG: 1.01 s per 1024-token image
and 1.18 s for eight, against 1.18 s / 1.48 s for ``reduce-overhead``, 1.6 s / 2.0 s for ``graph`` and 7.5 s eager;
about 16 s of warm-up, compiling and timing the linear kernel's tile sizes, which Triton caches on disk). Other models
get :data:`FALLBACK_CUDA_MODE`. Like ``graph`` it is one hand-captured CUDA graph per KV cache, which cannot notice
parameters replaced by new tensors (``load_state_dict(..., assign=True)``) while the cache lives: set up a new cache
(or pass ``compile="reduce-overhead"``, whose CUDA-graph trees re-check the addresses) after doing that."""

FALLBACK_CUDA_MODE = "reduce-overhead"
"""What ``compile=None`` or ``True`` picks on CUDA for a model the fused step does not support (SwiGLU) or without
Triton: ``torch.compile`` with CUDA-graph trees (``inductor-graph`` measures the same; ``graph`` needs no
compilation, seconds of warm-up instead of ~20 s: the choice for a handful of images)."""


def default_cuda_mode(model: Any = None, device: torch.device | None = None) -> str:
    """The CUDA mode ``compile=None`` / ``True`` picks for ``model`` on ``device``: :data:`DEFAULT_CUDA_MODE` where the
    fused step supports it, else :data:`FALLBACK_CUDA_MODE`: also for ``model=None`` (only the device known), on ROCm
    and on NVIDIA GPUs older than Ampere (compute capability 8.0), where the fused kernels have never run (asking
    for ``compile="fused-graph"`` by name still uses them)."""
    device = torch.device("cuda") if device is None else device
    if model is None or torch.version.hip is not None or torch.cuda.get_device_capability(device) < (8, 0):
        return FALLBACK_CUDA_MODE
    from cm3leon_lightning.model.fused import fused_unsupported

    return FALLBACK_CUDA_MODE if fused_unsupported(model, device) else DEFAULT_CUDA_MODE


def resolve_mode(compile: bool | str | None, device: torch.device, model: Any = None) -> str:
    """The decode-step mode for a ``compile`` argument: ``None`` means compiled on CUDA (:func:`default_cuda_mode`
    of ``model``) and eager elsewhere, ``True`` the device's compiled mode, ``False`` eager, a string one of
    :data:`MODES` by name (a fused mode is refused, with the reason, where ``model`` or ``device`` cannot run it)."""
    cuda = device.type == "cuda"
    if compile is None:
        return default_cuda_mode(model, device) if cuda else "eager"
    if compile is True:
        return default_cuda_mode(model, device) if cuda else "inductor"
    if compile is False:
        return "eager"
    if compile not in MODES:
        raise ValueError(f"compile must be None, a bool or one of {MODES}, got {compile!r}")
    if compile in CUDA_ONLY and not cuda:
        raise ValueError(f"compile={compile!r} needs a CUDA device; the model is on {device}")
    if compile in FUSED_MODES:
        from cm3leon_lightning.model.fused import fused_available, fused_unsupported

        reason = fused_available(device) if model is None else fused_unsupported(model, device)
        if reason is not None:
            raise ValueError(f"compile={compile!r}: {reason}")
    return compile


_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``torch.compile(fn)`` for ``mode`` (``inductor``/``inductor-graph``: default mode; ``reduce-overhead``;
    ``max-autotune``), compiled once per function and mode and shared; dynamo specializes it per model, shape and
    spec."""
    torch_mode = mode if mode in TREE_MODES else "default"
    key = f"{fn.__module__}.{fn.__qualname__}:{torch_mode}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode=torch_mode, fullgraph=True, dynamic=False)
    return _COMPILED[key]


class GraphedStep:
    """A decode step captured in one CUDA graph: copy the inputs into static buffers, replay, read static outputs.

    The step is ``step_fn(model, feed, input_pos, noise, *args)`` returning a tuple of tensors. Capture happens on
    the first call, with that call's inputs: two warm-up runs on a side stream (they compile, pick cuBLAS kernels,
    and write the KV cache at the current slot, which the captured replay then overwrites with the same values),
    then the capture, then one replay. Later calls must keep the shapes and the model's buffers (a new KV cache
    needs a new :class:`GraphedStep`).

    Args:
        step_fn: the step to capture (eager or compiled).
        args: the step's trailing arguments, fixed for the graph's lifetime (e.g. the sampling spec and
            constraint).
    """

    def __init__(self, step_fn: Callable[..., tuple[Tensor, ...]], *args: Any) -> None:
        self.step_fn, self.args = step_fn, args
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[Tensor | None, ...] = ()
        self.static_out: tuple[Tensor, ...] = ()

    def __call__(self, model: Any, feed: Tensor, input_pos: Tensor, noise: Tensor | None) -> tuple[Tensor, ...]:
        """Run the step on ``feed``, ``input_pos`` and ``noise``; the outputs are overwritten by the next call."""
        if self.graph is None:
            self._capture(model, feed, input_pos, noise)
        else:
            for buf, value in zip(self.static_in, (feed, input_pos, noise)):
                if buf is not None:
                    buf.copy_(value)
        self.graph.replay()
        return self.static_out

    def _capture(self, model: Any, feed: Tensor, input_pos: Tensor, noise: Tensor | None) -> None:
        self.static_in = (feed.clone(), input_pos.clone(), None if noise is None else noise.clone())
        stream = torch.cuda.Stream(device=feed.device)
        stream.wait_stream(torch.cuda.current_stream(feed.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step_fn(model, *self.static_in, *self.args)
        torch.cuda.current_stream(feed.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = tuple(self.step_fn(model, *self.static_in, *self.args))


MAX_GRAPHS_PER_CACHE = 32
"""Captured steps kept per KV cache, least recently used dropped first: the key holds the sampling settings (``cfg``,
``temperature``, ``top_p`` are floats), so a server whose clients sweep a setting would otherwise keep one graph, and
its memory pool, per value for as long as the cache lives."""

_GRAPHS: weakref.WeakKeyDictionary[Any, OrderedDict[Hashable, GraphedStep]] = weakref.WeakKeyDictionary()


def graphed_step(cache: Any, key: Hashable, step_fn: Callable[..., tuple[Tensor, ...]], *args: Any) -> GraphedStep:
    """The :class:`GraphedStep` of ``step_fn`` for this KV cache and ``key`` (mode, spec, shapes, constraint),
    created on first use; a graph lives as long as the cache whose buffers it reads and writes, or until
    :data:`MAX_GRAPHS_PER_CACHE` more recently used ones push it out (a decoder holding it keeps it alive)."""
    graphs = _GRAPHS.setdefault(cache, OrderedDict())
    if key in graphs:
        graphs.move_to_end(key)
    else:
        graphs[key] = GraphedStep(step_fn, *args)
        while len(graphs) > MAX_GRAPHS_PER_CACHE:
            graphs.popitem(last=False)
    return graphs[key]
