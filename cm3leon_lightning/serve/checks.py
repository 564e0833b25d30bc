"""The start-up checks of ``cm3leon serve``: what a worker would fail on (or a setting every request would be refused
for), found in the main process before any worker starts and raised as one ValueError naming the flag (``main``
prints it in one line, exit status 2). Each reads cheaply: checkpoint names and shapes, configs, tar headers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab


DEFAULT_K = 2
"""Documents retrieved per request with ``--retrieve`` and no ``--k`` (fewer when the bank holds fewer)."""


def model_context(ckpt: str) -> tuple[int, MultimodalVocab] | None:
    """The context length (``max_seq_len``) and vocabulary of the model at ``ckpt``, read without its weights (names
    and shapes: no tensor is read); None when the checkpoint records neither (the worker's load names what is
    missing)."""
    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model.weights import read_weights
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    weights = read_weights(ckpt, "--ckpt", lazy=True)
    if not weights.config or not weights.vocab:
        return None
    vocab = MultimodalVocab.from_dict(weights.vocab, f"--ckpt {ckpt}: vocab")
    return CM3LeonConfig.from_dict(weights.config).max_seq_len, vocab


def check_max_new_tokens(ckpt: str, max_new_tokens: int, layout: str) -> None:
    """Raise ValueError naming ``--max-new-tokens`` when an image-to-text prompt of ``layout`` with no instruction
    (its image's codes and the layout's few tokens) and ``max_new_tokens`` new tokens never fit the context of the
    model at ``ckpt``: the server started healthy and answered every image-to-text request that left
    ``max_new_tokens`` out 400 (and every infill request that left ``max_span_tokens`` out)."""
    from cm3leon_lightning.generation.generate import caption_prompt

    context = model_context(ckpt)
    if context is None:
        return
    limit, vocab = context
    prompt = len(caption_prompt(vocab, [0] * vocab.image_tokens, [], layout))
    if prompt + max_new_tokens > limit:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: an image-to-text prompt of --layout {layout} ({prompt} positions "
            f"with its {vocab.image_tokens} image tokens and no instruction) and {max_new_tokens} new tokens need "
            f"{prompt + max_new_tokens} positions, more than the model's context max_seq_len={limit}; the largest "
            f"--max-new-tokens that fits is {max(0, limit - prompt)}"
        )


def check_retrieve_k(ckpt: str, k: int) -> None:
    """Raise ValueError naming ``--k`` when ``k`` retrieved documents can never fit the context of the model at
    ``ckpt`` (read without its weights): each document holds at least its image's codes, ``<eos>`` and ``<break>``,
    the prompt ``<eos>``, one text token and ``<break>``, and then come the image tokens to draw. Every request that
    left ``retrieve`` out was answered 400 by a server that had started healthy."""
    context = model_context(ckpt)
    if context is None:
        return  # the worker's load_checkpoint names what is missing
    limit, image = context[0], context[1].image_tokens
    per_document, rest = image + 2, 3 + image  # <eos> text <break> image; <eos> text <break>, the image to draw
    need = k * per_document + rest
    if need > limit:
        largest = max(0, (limit - rest) // per_document)
        raise ValueError(
            f"--k {k}: {k} retrieved documents of at least {per_document} positions each ({image} image tokens, "
            f"<eos> and <break>), a one-token prompt and the {image} image tokens to draw need at least {need} "
            f"positions, more than the model's context max_seq_len={limit}; the largest --k that fits is {largest}"
        )


REQUEST_FIELDS: dict[str, str] = {
    **{name: name for name in ("cfg", "temperature", "top_p", "top_k", "cdk_k", "cdk_alpha", "text_cfg", "image_cfg")},
    "num_samples": "num_samples",
    "max_num_samples": "num_samples",
    "max_new_tokens": "max_new_tokens",
}
"""The server settings (``--cfg``, ``--temperature``...) whose values a request may also send, each with the request
field of that range: ``--max-num-samples`` is the most a request's ``num_samples`` may ask for."""


def check_request_ranges(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag of a default that a request could not send itself (``--temperature 50``,
    ``--top-k 0``, ``--max-new-tokens 2000``, a ``--max-num-samples`` above what a request's ``num_samples`` takes):
    the range of each :data:`REQUEST_FIELDS` flag is that of its request field
    (:mod:`cm3leon_lightning.serve.requests`), so the server's defaults and the requests mean the same things."""
    from pydantic import ValidationError

    from cm3leon_lightning.serve.requests import EditRequest, ImageRequest, TextRequest, allowed_numbers

    for name, field in REQUEST_FIELDS.items():
        value = getattr(args, name)
        model = next(m for m in (ImageRequest, TextRequest, EditRequest) if field in m.model_fields)
        try:
            model.__pydantic_validator__.validate_assignment(model.model_construct(), field, value)
        except ValidationError:
            allowed = str(allowed_numbers(model, field))
            rule = f"lie in {allowed[len('a number in ') :]}" if allowed.startswith("a number in ") else f"be {allowed}"
            whose = "" if field == name else f" (what a request's {field} takes)"
            raise ValueError(f"--{name.replace('_', '-')} must {rule}{whose}, got {value}") from None


def _named(flag: str, e: Exception) -> ValueError:
    """``e`` as a ValueError whose message names ``flag`` (prefixed unless it does already)."""
    return ValueError(str(e) if flag in str(e) else f"{flag}: {e}")


def check_model_files(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for what a worker's :meth:`~cm3leon_lightning.serve.api.CM3LeonAPI.setup`
    would fail on, read cheaply in this process (no network weights, no shard's samples, no bank index read): a
    ``--tokenizer`` or a ``--vqgan`` config that is none or does not fit the checkpoint's vocabulary, a
    ``--clip``/``--clip-pretrained`` whose weights cannot be had, a ``--retrieve`` that is no memory bank, a
    ``--shards`` without a manifest, with fewer documents than the bank has keys or without the bank's documents
    (:func:`check_bank_keys`), a ``--k`` above the bank's documents (which retrieved the whole bank, silently). Each
    printed "Uvicorn running", then the worker's traceback and "RuntimeError: One or more workers failed to start"
    (exit status 1)."""
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
        if args.k is not None and args.k > len(bank):  # the retriever returned the whole bank, silently
            raise ValueError(
                f"--k {args.k}: the memory bank {args.retrieve} (--retrieve) holds {len(bank)} documents; "
                f"retrieve at most {len(bank)}"
            )
        if args.k is None and len(bank) < DEFAULT_K:  # every request would have been refused for the implied k
            args.k = len(bank)
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
    if not cuda and devices != "auto" and int(devices) > 1:  # LitServe ran one worker on the CPU (MPS: failed)
        mps = accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available())
        raise ValueError(
            f"--devices {devices}: {'MPS' if mps else 'the CPU'} is one device (LitServe starts one worker there); "
            f"use --workers-per-device {devices} for {devices} model copies"
        )


def check_port(host: str, port: int) -> None:
    """Raise ValueError naming ``--port`` when ``host``:``port`` cannot be listened on (another server has it),
    found by binding a socket as uvicorn does and closing it: uvicorn logged "[Errno 98] Address already in use",
    naming neither the port nor the flag, and exited with status 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's bind_socket
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"--port {port}: cannot listen on {host} port {port}: {e.strerror or e} (another server uses it?); "
                "choose another --port"
            ) from e
