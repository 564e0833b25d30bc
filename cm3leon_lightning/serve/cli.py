"""``cm3leon serve``: an HTTP server (LitServe) for text-to-image, image-to-text, editing and infilling from a trained
checkpoint.

Example::

    cm3leon serve --ckpt last.ckpt --tokenizer tok/ --vqgan vqgan/ \\
        --clip ViT-B-32-quickgelu --clip-pretrained clip.safetensors \\
        --max-batch-size 8 --batch-timeout 0.05 --port 8000
    JSON="Content-Type: application/json"; URL=localhost:8000/predict  # FastAPI reads JSON bodies only with the header
    curl -s $URL -H "$JSON" -d '{"prompt": "a red circle", "num_samples": 4, "rerank": true, "keep": 1}'
    curl -s $URL -H "$JSON" -d '{"image": "'"$(base64 -w0 x.png)"'", "instruction": "What is it?"}'
    curl -s $URL -H "$JSON" -d '{"image": "'"$(base64 -w0 x.png)"'", "edit": "make it blue", "num_samples": 2}'
    curl -s $URL -H "$JSON" -d '{"infill": "a <mask> circle", "image": "'"$(base64 -w0 x.png)"'", "rows": "16:32"}'
    cm3leon serve ... --clip ViT-B-32-quickgelu --clip-pretrained clip.safetensors --retrieve bank/ --shards data/train
    cm3leon serve --ckpt models/350m   # a model directory of cm3leon export: its tokenizer and VQGAN are the defaults

With ``--retrieve`` each text-to-image request gets the ``--k`` nearest documents of its prompt in the bank placed
before it (paper table 1), unless it asks for another number (``"retrieve": 0`` for none); the answer names them
(``"retrieved": [<bank keys>]``). The bank's documents are read from ``--shards`` into memory at start.

With ``--retrieve``, a ``--k`` whose documents can never fit the model's context (each holds at least its image's
codes, ``<eos>`` and ``<break>``; the prompt at least one text token; then the image to draw) is refused at start,
naming the largest ``--k`` that fits; a worker warns when the bank's longest documents would not fit.

``GET /health`` answers ``ok`` once every worker has loaded the model. The request and response fields are documented
in :mod:`cm3leon_lightning.serve.requests`; a malformed request is answered 422 naming the field, a body larger than
``--max-payload-mb`` 413. Missing files, unknown settings and an ``--accelerator``/``--devices`` this machine lacks
are reported in one line (exit status 2) before any worker starts, as are a ``--tokenizer`` or a ``--vqgan`` (its
config) that does not fit the checkpoint, CLIP weights that cannot be had, a ``--retrieve`` that is no memory bank
and ``--shards`` without a manifest, with fewer documents than the bank has keys or without the bank's documents (read
from the first tar header of each shard; all of them when a shard begins with a document the bank lacks), a port in
use, a ``--devices`` above 1 on the CPU, a flag that would go unused (``--shards`` without ``--retrieve``,
``--clip-pretrained`` without ``--clip``) and a ``--max-new-tokens`` that never fits the context
(:mod:`cm3leon_lightning.serve.checks`). Ctrl+C or SIGTERM (to the main process or its whole process group) stops the
server and its worker processes once the requests in flight are answered, and at once while the workers still load.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from cm3leon_lightning.generation.cli import DTYPES, bundled_tokenizers
from cm3leon_lightning.generation.cli_args import add_model_arguments
from cm3leon_lightning.generation.generate import TEXT_LAYOUTS, GenerationSettings
from cm3leon_lightning.generation.graphs import MODES, resolve_mode
from cm3leon_lightning.model import ATTENTION_IMPLS
from cm3leon_lightning.serve.checks import (  # noqa: F401 - re-exported: they were defined here
    DEFAULT_K,
    _named,
    check_accelerator,
    check_bank_keys,
    check_clip,
    check_max_new_tokens,
    check_model_files,
    check_port,
    check_request_ranges,
    check_retrieve_k,
    check_vqgan_config,
    tar_keys,
)
from cm3leon_lightning.serve.lifecycle import stop_processes
from cm3leon_lightning.serve.requests import IMAGE_METHODS, TEXT_METHODS
from cm3leon_lightning.signals import deferred_from_finalizer

CLIP_PRETRAINED = "openai"
"""The ``--clip-pretrained`` a server with ``--clip`` and without that flag uses (``cm3leon generate``'s default)."""

CLIP_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
"""Endings of a ``--clip-pretrained`` that names a weights file rather than an open_clip tag."""

SERVE_HOSTS = ("0.0.0.0", "127.0.0.1", "::")
"""The addresses LitServe binds (``--host``): all IPv4 interfaces, loopback, all IPv6 interfaces."""


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that shows each argument's default once: not after a help text that says it already
    (``--tokenizer``'s "(default: the model directory's)" was followed by "(default: None)"), nor a default of None
    (an unset option: "--clip ... (default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``cm3leon serve`` argument parser."""
    p = argparse.ArgumentParser(
        prog="cm3leon serve",
        description=__doc__.split("\n\n")[0].replace("\n", " ").replace("``", ""),
        formatter_class=DefaultsOnceFormatter,
    )
    add_model_arguments(p, "VQGAN directory: PNG answers, image-to-text and re-ranking need it")
    p.add_argument("--clip", help="open_clip model for 'rerank' requests and --retrieve (e.g. ViT-B-32)")
    p.add_argument("--clip-pretrained", help="open_clip weights tag or local weights file (default: openai)")
    p.add_argument("--retrieve", metavar="BANK", help="memory bank: requests may place retrieved documents first")
    p.add_argument("--shards", help="prepared shard directory holding the bank's documents (with --retrieve)")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"documents retrieved per request by default (with --retrieve: {DEFAULT_K}, or all of a bank of fewer)",
    )
    d = p.add_argument_group("defaults for fields a request leaves out")
    d.add_argument("--num-samples", type=int, default=4, help="candidates per text-to-image request")
    d.add_argument("--method", default="top_p", choices=IMAGE_METHODS, help="image sampling method")
    d.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    d.add_argument("--top-p", type=float, default=0.9, help="nucleus mass")
    d.add_argument("--top-k", type=int, default=None, help="keep the k most likely ids (default: all)")
    d.add_argument("--cdk-k", type=int, default=8, help="CD-K: k")
    d.add_argument("--cdk-alpha", type=float, default=0.5, help="CD-K: alpha")
    d.add_argument("--layout", default="infill", choices=TEXT_LAYOUTS, help="image-to-text prompt layout")
    d.add_argument("--max-new-tokens", type=int, default=32, help="longest image-to-text answer")
    d.add_argument("--text-method", default="greedy", choices=TEXT_METHODS, help="image-to-text decoding")
    d.add_argument("--text-cfg", type=float, default=7.5, help="edit requests: text guidance scale (the paper's)")
    d.add_argument("--image-cfg", type=float, default=1.5, help="edit requests: image guidance scale (the paper's)")
    s = p.add_argument_group("server")
    s.add_argument(
        "--max-num-samples", type=int, default=16, help="the most candidates one request may ask for (at most 64)"
    )
    s.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    s.add_argument(
        "--max-rows", type=int, default=128, help="the most sequences (streams x candidates) in one decode; a larger "
        "batch is decoded in chunks (bounds the KV cache's memory)"
    )  # fmt: skip
    s.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait for a batch to fill")
    s.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="device kind")
    s.add_argument("--devices", default="auto", help="number of devices, or auto")
    s.add_argument("--workers-per-device", type=int, default=1, help="worker processes (model copies) per device")
    s.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may wait in the queue before it is answered "
        "504 (a decode that has started is not cut short)"
    )  # fmt: skip
    s.add_argument("--max-payload-mb", type=float, default=32.0, help="largest request body; a larger one gets 413")
    s.add_argument("--host", default="0.0.0.0", help=f"address to listen on: one of {', '.join(SERVE_HOSTS)}")
    s.add_argument("--port", type=int, default=8000, help="port to listen on, 1024 to 65535")
    s.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="transformer weights and KV cache")
    s.add_argument("--compile", choices=("auto", *MODES), default="auto", help="how the decode step runs")
    s.add_argument("--attention", choices=ATTENTION_IMPLS, default="sdpa", help="attention implementation")
    return p


def build_api(args: argparse.Namespace) -> object:
    """The :class:`~cm3leon_lightning.serve.api.CM3LeonAPI` for parsed arguments, after checking the files exist
    and the defaults are valid (raises FileNotFoundError / ValueError naming the argument)."""
    for flag in ("ckpt", "tokenizer", "vqgan", "retrieve", "shards"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag}: not found: {path}")
    if args.retrieve and not (args.clip and args.shards):
        raise ValueError(
            "--retrieve needs --clip (the CLIP model the bank was built with) and --shards (its documents)"
        )
    # else silently unused; a value equal to the default (--clip-pretrained openai) is no error, as in cm3leon generate
    for flag, needs, default in (("shards", "retrieve", None), ("clip_pretrained", "clip", CLIP_PRETRAINED)):
        if getattr(args, flag) not in (None, default) and getattr(args, needs) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is used only with --{needs}, which is not given")
    if args.clip_pretrained is None:
        args.clip_pretrained = CLIP_PRETRAINED
    weights = args.clip_pretrained  # an open_clip tag ("openai") or a local file
    if args.clip and weights and ("/" in weights or weights.endswith(CLIP_WEIGHT_FILES)) and not Path(weights).exists():
        raise FileNotFoundError(f"--clip-pretrained: not found: {weights}")  # else the worker fails while loading
    args.tokenizer, args.vqgan = bundled_tokenizers(args.ckpt, args.tokenizer, args.vqgan)
    if args.clip and not (args.vqgan or args.retrieve):
        raise ValueError("--clip re-ranks decoded images (needs --vqgan) or retrieves (needs --retrieve)")
    if args.k is not None and (args.k < 0 or (args.k and not args.retrieve)):
        raise ValueError(f"--k must be >= 0, and 0 without --retrieve; got {args.k}")
    check_model_files(args)  # sets an unset --k below DEFAULT_K when the bank holds fewer documents
    k = args.k if args.k is not None else (DEFAULT_K if args.retrieve else 0)
    if k:
        check_retrieve_k(args.ckpt, k)
    if args.vqgan and args.max_new_tokens >= 1:  # image-to-text needs the VQGAN
        check_max_new_tokens(args.ckpt, args.max_new_tokens, args.layout)
    limits = (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-rows", args.max_rows, 1),
        ("--workers-per-device", args.workers_per_device, 1),
        ("--num-samples", args.num_samples, 1),
        ("--max-num-samples", args.max_num_samples, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
    )
    for flag, value, low in limits:  # fmt: skip
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not 0 <= args.batch_timeout <= args.timeout:  # NaN fails too; LitServe's own error named neither flag
        raise ValueError(f"--batch-timeout must lie in [0, --timeout {args.timeout:g}], got {args.batch_timeout}")
    if not 0 < args.max_payload_mb < float("inf") or int(args.max_payload_mb * 2**20) < 1024:
        raise ValueError(f"--max-payload-mb must be a number of at least 1 KiB (0.001), got {args.max_payload_mb}")
    check_request_ranges(args)  # what a request may ask for; NaN fails too (a NaN --cfg drew code 0 at every step)
    compile = None if args.compile == "auto" else args.compile
    cuda = args.accelerator in ("auto", "cuda") and torch.cuda.is_available()
    resolve_mode(compile, torch.device("cuda" if cuda else "cpu"))  # a CUDA-only mode on CPU fails now, not per request
    if args.num_samples > args.max_num_samples:
        raise ValueError(f"--num-samples {args.num_samples} exceeds --max-num-samples {args.max_num_samples}")
    from cm3leon_lightning.serve.api import CM3LeonAPI, EditSettings, TextSettings

    try:
        image = GenerationSettings(
            num_samples=args.num_samples, method=args.method, cfg=args.cfg, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, cdk_k=args.cdk_k, cdk_alpha=args.cdk_alpha,
        )  # fmt: skip
        text = TextSettings(
            layout=args.layout, max_new_tokens=args.max_new_tokens, method=args.text_method,
            temperature=args.temperature, top_p=args.top_p,
        )  # fmt: skip
        edit = EditSettings(
            num_samples=args.num_samples, method=args.method if args.method != "cd_k" else "top_p",
            text_cfg=args.text_cfg, image_cfg=args.image_cfg, temperature=args.temperature, top_p=args.top_p,
        )  # fmt: skip
    except ValueError as e:  # the settings' messages name their fields ("top_p must lie in (0, 1]"): name the flags
        flags = dict.fromkeys("--" + name.replace("_", "-") for name in SETTING_FIELDS.findall(str(e)))
        raise ValueError(f"{'/'.join(flags)}: {e}" if flags else str(e)) from e
    return CM3LeonAPI(
        args.ckpt, args.tokenizer, vqgan=args.vqgan, clip=args.clip, clip_pretrained=args.clip_pretrained,
        retrieve=args.retrieve, shards=args.shards, retrieve_k=k,
        image_defaults=image, text_defaults=text, edit_defaults=edit, max_num_samples=args.max_num_samples,
        max_rows=args.max_rows, dtype=args.dtype, compile=compile, attention=args.attention,
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
    )  # fmt: skip


SETTING_FIELDS = re.compile(r"\b(temperature|top_p|top_k|cdk_k|cdk_alpha)\b")
"""The sampling fields whose names the settings' errors give, each a flag (``top_p`` is ``--top-p``)."""


def build_server(args: argparse.Namespace) -> object:
    """The ``litserve.LitServer`` for parsed arguments (not started)."""
    import litserve as ls

    if args.devices != "auto" and not (str(args.devices).isdigit() and int(args.devices) >= 1):
        # 0 GPUs would start no inference worker, and LitServe would wait for one forever
        raise ValueError(f"--devices must be a number or auto, at least 1; got {args.devices!r}")
    check_accelerator(args.accelerator, args.devices)
    # What LitServer.run refuses, with a traceback, after the model files were checked
    if not 1024 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [1024, 65535] (LitServe's range), got {args.port}")
    if args.host not in SERVE_HOSTS:
        raise ValueError(f"--host must be one of {', '.join(SERVE_HOSTS)} (what LitServe binds), got {args.host!r}")
    devices: int | str = args.devices if args.devices == "auto" else int(args.devices)
    from cm3leon_lightning.serve.api import install_error_handlers

    server = ls.LitServer(
        build_api(args), accelerator=args.accelerator, devices=devices, workers_per_device=args.workers_per_device,
        timeout=args.timeout, max_payload_size=int(args.max_payload_mb * 2**20),
    )  # fmt: skip
    install_error_handlers(server.app)
    shutdown_once(server)
    return server


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``docker stop``, systemd) shut the server down like Ctrl+C, and Ctrl+C do so even when
    the server was started with SIGINT ignored (``cm3leon serve ... &`` in a script).

    LitServe stops its API-server and inference-worker processes only on KeyboardInterrupt; the default SIGTERM
    action ends the main process alone and leaves them running (found by a test that counts the processes left).
    With SIGINT ignored only the API server (uvicorn sets its own handler) stopped, and the rest waited forever.
    The processes forked from this one inherit the handler, and there it does nothing: LitServe's manager process
    carries the answers from the workers, and ended by a SIGTERM to the whole process group (``kill -- -PGID``) it
    left every request in flight unanswered until the connection dropped 30 seconds later; the API servers stop on
    their own handlers and re-raise the signal once stopped (a KeyboardInterrupt there printed a traceback)."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if os.getpid() == main_pid and not deferred_from_finalizer(signum, frame):  # forked: the main one stops it
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


MONITOR_THREAD = "litserve-monitoring"
"""The name of LitServe's thread that watches the inference workers."""


def _set_quietly(event: Any) -> None:
    try:
        event.set()
    except (OSError, EOFError):  # the manager is gone already
        pass


def shutdown_once(server: Any) -> None:
    """Make LitServe's shutdown run once, with its worker-monitoring thread stopped first.

    LitServe (0.2.19) shuts down from the main thread on Ctrl+C and from its monitoring thread when a worker dies (the
    workers end on the same signal), and never stops that thread: waking after the shutdown had closed the
    multiprocessing manager, it asked the manager's shutdown event and logged a ``BrokenPipeError`` traceback (seen
    under load). Now the first caller sets the event, waits for the thread to leave its loop, then shuts down; a
    second caller waits for that to finish. Private LitServe names that are missing leave the server unchanged.
    """
    shutdown = getattr(server, "_perform_graceful_shutdown", None)
    if shutdown is None or not hasattr(server, "_shutdown_event"):
        return
    lock, done = threading.Lock(), [False]

    def once(*args: Any, **kwargs: Any) -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
            if server._shutdown_event is not None:  # set from a thread of its own: a proxy has a connection per
                # thread, and the main thread's is still busy with the wait() that Ctrl+C interrupted
                setter = threading.Thread(target=_set_quietly, args=(server._shutdown_event,), daemon=True)
                setter.start()
                setter.join(timeout=5)
            if threading.current_thread().name != MONITOR_THREAD:
                for thread in threading.enumerate():
                    if thread.name == MONITOR_THREAD:
                        thread.join(timeout=getattr(server, "monitor_internal", 2) + 1)
            shutdown(*args, **kwargs)

    server._perform_graceful_shutdown = once


def main(argv: Sequence[str]) -> int:
    """Entry point of ``cm3leon serve``; returns the exit status (2 on bad input, with a one-line error)."""
    args = build_parser().parse_args(list(argv))
    try:
        import litserve  # noqa: F401
    except ImportError:
        print("cm3leon serve: error: needs LitServe: pip install 'cm3leon_lightning[serve]'", file=sys.stderr)
        return 2
    try:
        server = build_server(args)
        check_port(args.host, args.port)  # here, not in build_server: a server built in-process binds no port
    except (FileNotFoundError, ValueError) as e:
        print(f"cm3leon serve: error: {e}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False)  # type: ignore[attr-defined]
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM before LitServe's own shutdown covers it: while workers load
        print("cm3leon serve: stopped", file=sys.stderr)
    finally:  # such a stop left them loading for minutes; stopped ones are passed over
        stop_processes(getattr(server, "inference_workers", []))
    return 0
