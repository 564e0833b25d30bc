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
from the first tar header of each shard; all of them when a shard begins with a document the bank lacks). Ctrl+C or
SIGTERM (to the main process or its whole process group) stops the server and its worker processes once the requests
in flight are answered.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cm3leon_lightning.generation.cli import DTYPES, bundled_tokenizers
from cm3leon_lightning.generation.cli_args import add_model_arguments
from cm3leon_lightning.generation.generate import TEXT_LAYOUTS, GenerationSettings
from cm3leon_lightning.generation.graphs import MODES, resolve_mode
from cm3leon_lightning.model import ATTENTION_IMPLS
from cm3leon_lightning.serve.requests import IMAGE_METHODS, TEXT_METHODS

if TYPE_CHECKING:
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

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
    p.add_argument("--clip-pretrained", default="openai", help="open_clip weights tag or local weights file")
    p.add_argument("--retrieve", metavar="BANK", help="memory bank: requests may place retrieved documents first")
    p.add_argument("--shards", help="prepared shard directory holding the bank's documents (with --retrieve)")
    p.add_argument("--k", type=int, default=None, help="documents retrieved per request by default (2 with --retrieve)")
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
    s.add_argument("--max-num-samples", type=int, default=16, help="the most candidates one request may ask for")
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
    weights = args.clip_pretrained  # an open_clip tag ("openai") or a local file
    if args.clip and weights and ("/" in weights or weights.endswith(CLIP_WEIGHT_FILES)) and not Path(weights).exists():
        raise FileNotFoundError(f"--clip-pretrained: not found: {weights}")  # else the worker fails while loading
    args.tokenizer, args.vqgan = bundled_tokenizers(args.ckpt, args.tokenizer, args.vqgan)
    if args.clip and not (args.vqgan or args.retrieve):
        raise ValueError("--clip re-ranks decoded images (needs --vqgan) or retrieves (needs --retrieve)")
    if args.retrieve and not (args.clip and args.shards):
        raise ValueError(
            "--retrieve needs --clip (the CLIP model the bank was built with) and --shards (its documents)"
        )
    if args.k is not None and (args.k < 0 or (args.k and not args.retrieve)):
        raise ValueError(f"--k must be >= 0, and 0 without --retrieve; got {args.k}")
    k = args.k if args.k is not None else (2 if args.retrieve else 0)
    check_model_files(args)
    if k:
        check_retrieve_k(args.ckpt, k)
    limits = (
        ("--max-batch-size", args.max_batch_size, 1),
        ("--max-rows", args.max_rows, 1),
        ("--workers-per-device", args.workers_per_device, 1),
        ("--batch-timeout", args.batch_timeout, 0),
        ("--num-samples", args.num_samples, 1),
        ("--max-num-samples", args.max_num_samples, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
    )
    for flag, value, low in limits:  # fmt: skip
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not 0 < args.max_payload_mb < float("inf") or int(args.max_payload_mb * 2**20) < 1024:
        raise ValueError(f"--max-payload-mb must be a number of at least 1 KiB (0.001), got {args.max_payload_mb}")
    for flag, value in (("--cfg", args.cfg), ("--text-cfg", args.text_cfg), ("--image-cfg", args.image_cfg)):
        if not 0 <= value <= 100:  # what a request may ask for; NaN fails too (it drew code 0 at every step)
            raise ValueError(f"{flag} must lie in [0, 100], got {value}")
    compile = None if args.compile == "auto" else args.compile
    cuda = args.accelerator in ("auto", "cuda") and torch.cuda.is_available()
    resolve_mode(compile, torch.device("cuda" if cuda else "cpu"))  # a CUDA-only mode on CPU fails now, not per request
    image = GenerationSettings(
        num_samples=args.num_samples, method=args.method, cfg=args.cfg, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, cdk_k=args.cdk_k, cdk_alpha=args.cdk_alpha,
    )  # fmt: skip
    if args.num_samples > args.max_num_samples:
        raise ValueError(f"--num-samples {args.num_samples} exceeds --max-num-samples {args.max_num_samples}")
    from cm3leon_lightning.serve.api import CM3LeonAPI, EditSettings, TextSettings

    text = TextSettings(
        layout=args.layout, max_new_tokens=args.max_new_tokens, method=args.text_method,
        temperature=args.temperature, top_p=args.top_p,
    )  # fmt: skip
    edit = EditSettings(
        num_samples=args.num_samples, method=args.method if args.method != "cd_k" else "top_p",
        text_cfg=args.text_cfg, image_cfg=args.image_cfg, temperature=args.temperature, top_p=args.top_p,
    )  # fmt: skip
    return CM3LeonAPI(
        args.ckpt, args.tokenizer, vqgan=args.vqgan, clip=args.clip, clip_pretrained=args.clip_pretrained,
        retrieve=args.retrieve, shards=args.shards, retrieve_k=k,
        image_defaults=image, text_defaults=text, edit_defaults=edit, max_num_samples=args.max_num_samples,
        max_rows=args.max_rows, dtype=args.dtype, compile=compile, attention=args.attention,
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
    )  # fmt: skip


def check_retrieve_k(ckpt: str, k: int) -> None:
    """Raise ValueError naming ``--k`` when ``k`` retrieved documents can never fit the context of the model at
    ``ckpt`` (read without its weights): each document holds at least its image's codes, ``<eos>`` and ``<break>``,
    the prompt ``<eos>``, one text token and ``<break>``, and then come the image tokens to draw. Every request that
    left ``retrieve`` out was answered 400 by a server that had started healthy."""
    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model.weights import read_weights
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    weights = read_weights(ckpt, "--ckpt", lazy=True)  # names and shapes: no tensor is read
    if not weights.config or not weights.vocab:
        return  # the worker's load_checkpoint names what is missing
    limit = CM3LeonConfig.from_dict(weights.config).max_seq_len
    image = MultimodalVocab.from_dict(weights.vocab, f"--ckpt {ckpt}: vocab").image_tokens
    per_document, rest = image + 2, 3 + image  # <eos> text <break> image; <eos> text <break>, the image to draw
    need = k * per_document + rest
    if need > limit:
        largest = max(0, (limit - rest) // per_document)
        raise ValueError(
            f"--k {k}: {k} retrieved documents of at least {per_document} positions each ({image} image tokens, "
            f"<eos> and <break>), a one-token prompt and the {image} image tokens to draw need at least {need} "
            f"positions, more than the model's context max_seq_len={limit}; the largest --k that fits is {largest}"
        )


def _named(flag: str, e: Exception) -> ValueError:
    """``e`` as a ValueError whose message names ``flag`` (prefixed unless it does already)."""
    return ValueError(str(e) if flag in str(e) else f"{flag}: {e}")


def check_model_files(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for what a worker's :meth:`~cm3leon_lightning.serve.api.CM3LeonAPI.setup`
    would fail on, read cheaply in this process (no network weights, no shard's samples, no bank index read): a
    ``--tokenizer`` or a ``--vqgan`` config that is none or does not fit the checkpoint's vocabulary, a
    ``--clip``/``--clip-pretrained`` whose weights cannot be had, a ``--retrieve`` that is no memory bank, a
    ``--shards`` without a manifest, with fewer documents than the bank has keys or without the bank's documents
    (:func:`check_bank_keys`). Each printed "Uvicorn running", then the worker's traceback and "RuntimeError: One or
    more workers failed to start" (exit status 1)."""
    from cm3leon_lightning.generation.cli import check_tokenizers
    from cm3leon_lightning.model.weights import read_weights
    from cm3leon_lightning.tokenization.text import TextTokenizer
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    weights = read_weights(args.ckpt, "--ckpt", lazy=True)  # names and shapes: no tensor is read
    vocab = MultimodalVocab.from_dict(weights.vocab, f"--ckpt {args.ckpt}: vocab") if weights.vocab else None
    try:
        tokenizer = TextTokenizer.load(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise _named("--tokenizer", e) from e
    if vocab is not None:
        with warnings.catch_warnings():  # "cannot be checked" (no recorded hash): each worker warns once
            warnings.simplefilter("ignore")
            check_tokenizers(vocab, tokenizer, None, f"--ckpt {args.ckpt}")
    if args.vqgan and vocab is not None:
        check_vqgan_config(args.vqgan, vocab)
    if args.clip:
        check_clip(args.clip, args.clip_pretrained)
    if args.retrieve:
        from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest
        from cm3leon_lightning.generation.retrieve import check_clip_weights
        from cm3leon_lightning.retrieval.index import MemoryBank

        try:
            bank = MemoryBank.load(args.retrieve, model_name=args.clip, mmap=True)  # an IVF index's lists stay on disk
        except (FileNotFoundError, ValueError) as e:
            raise _named("--retrieve", e) from e
        try:
            manifest = Manifest.load(Path(args.shards) / MANIFEST_NAME)
        except (FileNotFoundError, ValueError) as e:
            raise _named("--shards", e) from e
        held = sum(shard.count for shard in manifest.shards)
        if held < len(bank):  # the worker reads every shard and finds keys missing
            raise ValueError(
                f"--shards: {args.shards} holds {held} documents, fewer than the {len(bank)} keys of the memory bank "
                f"{args.retrieve} (--retrieve): it is not the dataset the bank was built from"
            )
        check_bank_keys(bank.keys, args.retrieve, [Path(args.shards) / s.name for s in manifest.shards if s.count])
        check_clip_weights(manifest.clip, args.clip_pretrained, args.shards)


def tar_keys(path: Path, first_only: bool = False) -> list[str]:
    """The sample keys of the tar shard at ``path`` as WebDataset groups its members, in order, from the member
    headers alone (the samples' data is skipped, not read); with ``first_only`` just the first (one header).

    Raises:
        ValueError: ``path`` is missing or not a readable tar, naming it and ``--shards``.
    """
    from cm3leon_lightning.data.shards import tar_sample_keys

    try:
        return list(itertools.islice(tar_sample_keys(path), 1 if first_only else None))
    except FileNotFoundError as e:
        raise ValueError(f"--shards: {path}: not found (listed in the dataset's manifest.json)") from e
    except ValueError as e:  # not a readable tar, named
        raise ValueError(f"--shards: {e}") from e
    except OSError as e:
        raise ValueError(f"--shards: {path}: not a readable tar ({e})") from e


def check_bank_keys(keys: Sequence[str], bank_dir: str, shards: Sequence[Path]) -> None:
    """Raise ValueError naming the bank's ``keys.json`` and a shard when ``shards`` (the non-empty shards of
    ``--shards``) do not hold the bank's ``keys``, read cheaply: the first key of each shard (one tar header) is
    looked up among the bank's keys. When each is there (a ``cm3leon prepare`` dataset holds its bank's documents,
    shard by shard) the check passes; the worker finds any other key missing as it reads the documents. A shard that
    begins with another key (a dataset of other documents, or one holding more than its bank) makes it list every
    shard's keys from the tar headers and refuse only when bank keys are missing from all of them: the worker's
    traceback, after "Uvicorn running", then "RuntimeError: One or more workers failed to start"."""
    from cm3leon_lightning.retrieval.index import KEYS_FILE

    known = set(keys)
    for path in shards:
        first = tar_keys(path, first_only=True)
        if first and first[0] not in known:
            break
    else:
        return
    held = {key for shard in shards for key in tar_keys(shard)}
    missing = [key for key in keys if key not in held]
    if missing:
        raise ValueError(
            f"--shards: {path} begins with the document {first[0]!r}, which is not a key of the memory bank "
            f"{Path(bank_dir) / KEYS_FILE} (--retrieve), and {len(missing)} of the bank's {len(keys)} keys (first "
            f"{missing[0]!r}) are in no shard of {path.parent}: it is not the dataset the bank was built from"
        )


def check_vqgan_config(path: str, vocab: MultimodalVocab) -> None:
    """Raise ValueError naming ``--vqgan`` when the VQGAN at ``path`` has no weights file, or its ``config.json``
    (read without the weights) gives another codebook size or grid than ``vocab``. A weights file whose architecture
    comes from the file itself (a ``VQGANModule`` checkpoint) is left to the worker."""
    from cm3leon_lightning.tokenization.vqgan_io import _resolve, read_config

    try:
        weights, config_file = _resolve(Path(path))
        if weights.suffix != ".safetensors" or config_file is None:  # the architecture may be recorded inside
            return
        config = read_config(config_file)
    except (FileNotFoundError, ValueError) as e:
        raise _named("--vqgan", e) from e
    grid = tuple(config.grid_size)
    if (config.n_embed, grid) != (vocab.n_codes, (vocab.grid_h, vocab.grid_w)):
        raise ValueError(  # check_tokenizers' message
            f"vocabulary mismatch: the checkpoint has n_codes={vocab.n_codes}, grid {vocab.grid_h}x{vocab.grid_w} "
            f"but --vqgan has n_embed={config.n_embed}, grid {grid[0]}x{grid[1]}"
        )


def check_clip(model_name: str, pretrained: str | None) -> None:
    """Raise ValueError naming ``--clip``/``--clip-pretrained`` when ``model_name`` is no open_clip architecture, or
    ``pretrained`` is neither a file nor a tag of it, or a tag whose weights are not cached and cannot be downloaded:
    the checks of :func:`~cm3leon_lightning.retrieval.encoder.create_clip` before it builds the model."""
    import open_clip

    from cm3leon_lightning.retrieval import encoder

    encoder.register_clip_configs()
    if not model_name.startswith(("local-dir:", "hf-hub:")) and open_clip.get_model_config(model_name) is None:
        raise ValueError(f"--clip: {model_name!r} is not an open_clip architecture")
    if pretrained is None or os.path.isfile(pretrained) or model_name.startswith(("local-dir:", "hf-hub:")):
        return
    try:
        encoder.clip_tag(model_name, pretrained)
    except encoder.ClipWeightsUnavailableError as e:
        raise ValueError(f"--clip/--clip-pretrained: {e}") from e
    except ValueError as e:
        raise ValueError(f"--clip-pretrained: {e}") from e


def check_accelerator(accelerator: str, devices: str) -> None:
    """Raise ValueError naming ``--accelerator`` or ``--devices`` when this machine lacks them: LitServe printed
    "Uvicorn running" and then failed with "num_api_servers must be greater than 0" (no GPU), or its workers failed
    while loading (an index beyond the GPUs)."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--accelerator cuda: CUDA is not available on this machine (no GPU or driver); use cpu or auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--accelerator mps: MPS is not available on this machine; use cpu or auto")
    cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    if cuda and devices != "auto" and int(devices) > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"--devices {devices}: this machine has {n} CUDA device(s)")


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

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:  # else a forked process: the main one stops it
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
    except (FileNotFoundError, ValueError) as e:
        print(f"cm3leon serve: error: {e}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    server.run(host=args.host, port=args.port, generate_client_file=False)  # type: ignore[attr-defined]
    return 0
