"""The arguments of ``cm3leon generate``: its parser (:func:`build_parser`, with the ``--ckpt``/``--tokenizer``/
``--vqgan`` trio ``cm3leon serve`` shares) and the checks and cleaning applied to them before anything is loaded
(:func:`check_numbers`, :func:`check_used`, :func:`clean_texts`). The command itself is
:mod:`cm3leon_lightning.generation.cli`.
"""

from __future__ import annotations

import argparse

from cm3leon_lightning.generation.generate import SETTING_METHODS, TEXT_LAYOUTS
from cm3leon_lightning.generation.graphs import MODES
from cm3leon_lightning.generation.sampling import SEED_LIMIT
from cm3leon_lightning.generation.tasks import IMAGE_TASKS
from cm3leon_lightning.model import ATTENTION_IMPLS
from cm3leon_lightning.model.pretrained import DTYPES  # the --dtype choices besides auto

DEFAULT_CLIP, DEFAULT_CLIP_PRETRAINED = "ViT-B-32", "openai"
"""``--clip`` / ``--clip-pretrained`` for ``--rerank`` without ``--retrieve`` (with it, the bank's CLIP)."""


def add_model_arguments(parser: argparse.ArgumentParser, vqgan_help: str) -> None:
    """``--ckpt``, ``--tokenizer`` and ``--vqgan``, as ``cm3leon generate`` and ``cm3leon serve`` take them
    (:func:`~cm3leon_lightning.generation.cli.bundled_tokenizers` fills the last two from a model directory)."""
    parser.add_argument(
        "--ckpt", required=True, help="CM3LeonModule checkpoint (.ckpt or FSDP's sharded directory) or model directory"
    )
    default = " (default: the model directory's)"
    parser.add_argument("--tokenizer", help="text tokenizer: tokenizer.json or its directory" + default)
    parser.add_argument("--vqgan", help=vqgan_help + default)


def build_parser() -> argparse.ArgumentParser:
    """The ``cm3leon generate`` argument parser."""
    from cm3leon_lightning.generation import cli  # its docstring's first line is the command's summary

    p = argparse.ArgumentParser(prog="cm3leon generate", description=cli.__doc__.split("\n")[0])
    add_model_arguments(p, "VQGAN directory (VQGAN.from_pretrained); needed for PNGs and --image")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out may hold an earlier run's outputs (sample-*.png, grid.png, codes.npy, retrieved.json, answer.txt, "
        "answers.json): delete exactly those first (without it such a directory is refused; other files stay)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="caption to draw (text-to-image)")
    mode.add_argument("--image", help="image file to describe or question (image-to-text), or the image of --infill")
    p.add_argument(
        "--infill",
        metavar="TEXT",
        help="CM3 infilling: fill each <mask> of TEXT (the caption; with --image, of that picture) and with "
        "--infill-rows redraw rows of --image",
    )
    p.add_argument("--infill-rows", metavar="A:B", help="--infill: grid rows [A, B) of --image to redraw")
    p.add_argument("--instruction", default="", help="instruction or question for --image")
    p.add_argument(
        "--edit",
        help="with --image, write new images: the edit instruction (--task edit), or the caption of the image to draw "
        "from the --image features (--task edge_to_image, ...); for a model instruction-tuned on such documents",
    )
    p.add_argument("--task", default="edit", choices=IMAGE_TASKS, help="--edit: the SFT task whose prefix to use")
    p.add_argument("--text-cfg", type=float, help="--edit: text guidance scale (paper: 7.5 editing, 3 grounded)")
    p.add_argument("--image-cfg", type=float, help="--edit: image guidance scale (paper: 1.5 editing, 3 grounded)")
    p.add_argument(
        "--layout",
        default="infill",
        choices=TEXT_LAYOUTS,
        help="--image prompt: the answer infills a span before the image, or follows '<eos> image <break> "
        "instruction' (models trained on image-first documents)",
    )
    p.add_argument("--num-samples", type=int, default=8, help="candidates per prompt")
    p.add_argument(
        "--method",
        default="top_p",
        choices=["greedy", "temperature", "top_p", "cd_k"],
        help="sampling rule, also of --image answers and --infill (cd_k: for --prompt; --edit refuses it, --image "
        "answers and --infill decode greedily with it)",
    )
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--cdk-k", type=int, default=8)
    p.add_argument("--cdk-alpha", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer for --image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerank", action="store_true", help="order candidates by CLIP score (needs --clip)")
    p.add_argument(
        "--clip",
        default=None,
        help="open_clip model for --rerank/--retrieve (default: with --retrieve "
        f"the model the bank records, else {DEFAULT_CLIP})",
    )
    p.add_argument(
        "--clip-pretrained",
        default=None,
        help="open_clip weights tag or local path (default: with "
        f"--retrieve the tag the --shards manifest records, else {DEFAULT_CLIP_PRETRAINED})",
    )
    p.add_argument("--retrieve", metavar="BANK", help="memory bank directory: prepend retrieved documents")
    p.add_argument("--shards", help="prepared shard directory holding the bank's documents (with --retrieve)")
    p.add_argument("--k", type=int, default=2, help="documents to retrieve")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights and KV cache of the transformer (auto: bfloat16 on CUDA, float32 on CPU; sampling is float32)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--compile",
        choices=("auto", *MODES),
        default="auto",
        help="how the decode step runs (auto: fused-graph on CUDA, reduce-overhead for SwiGLU models, eager on CPU; "
        "see generation/graphs.py)",
    )
    how.add_argument("--no-compile", action="store_true", help="same as --compile eager")
    p.add_argument(
        "--attention",
        choices=ATTENTION_IMPLS,
        default="sdpa",
        help="attention over the KV cache: sdpa, or flex (FlexAttention: fused on CUDA; on CPU only when compiled)",
    )
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag of a numeric argument out of range, before anything is loaded (the decoders'
    own checks name their parameters, ``top_p``, ``num_samples``, and came after the checkpoint had been read)."""
    for flag, value in (
        ("--num-samples", args.num_samples),
        ("--max-new-tokens", args.max_new_tokens),
        ("--cdk-k", args.cdk_k),
        *((("--k", args.k),) if args.retrieve else ()),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.seed < SEED_LIMIT:  # torch's generator failed later with "Overflow when unpacking long long"
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if not 0 <= args.temperature < float("inf"):
        raise ValueError(f"--temperature must be finite and >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not 0 <= args.cdk_alpha <= 1:
        raise ValueError(f"--cdk-alpha must lie in [0, 1], got {args.cdk_alpha}")
    for flag, value in (("--cfg", args.cfg), ("--text-cfg", args.text_cfg), ("--image-cfg", args.image_cfg)):
        if value is not None and not abs(value) < float("inf"):  # NaN fails the comparison too
            raise ValueError(f"{flag} must be finite, got {value}")


def check_used(args: argparse.Namespace) -> None:
    """Raise ValueError naming a flag given a value other than its default that the requested task would ignore
    (``--instruction`` with ``--prompt``, ``--text-cfg`` without ``--edit``, ``--shards`` without ``--retrieve``...):
    such a run decoded as if the flag had not been given, silently.

    The tasks: text-to-image (``--prompt``), image answers (``--image`` alone), ``--edit`` and ``--infill``.
    """
    answer = bool(args.image) and args.edit is None and args.infill is None
    text_to_image = bool(args.prompt) and args.infill is None
    method = args.method if text_to_image or args.method != "cd_k" else "greedy"  # the other tasks: cd_k is greedy
    reads = {name: method in readers for name, readers in SETTING_METHODS.items()}
    uses = {
        "temperature": (reads["temperature"], "sampling (--method temperature or top_p; cd_k with --prompt)"),
        "top_p": (reads["top_p"], "--method top_p"),
        "instruction": (answer, "--image answers (image-to-text)"),
        "layout": (answer, "--image answers (image-to-text)"),
        "text_cfg": (args.edit is not None, "--edit"),
        "image_cfg": (args.edit is not None, "--edit"),
        "task": (args.edit is not None, "--edit"),
        "cfg": (text_to_image and reads["cfg"], "--prompt with greedy, temperature or top_p"),
        "cdk_k": (text_to_image and reads["cdk_k"], "--method cd_k with --prompt"),
        "cdk_alpha": (text_to_image and reads["cdk_alpha"], "--method cd_k with --prompt"),
        "num_samples": (not answer, "--prompt, --edit and --infill (an --image answer is one text)"),
        "max_new_tokens": (answer or args.infill is not None, "--image answers and --infill"),
        "shards": (bool(args.retrieve), "--retrieve"),
        "k": (bool(args.retrieve), "--retrieve"),
        "clip": (bool(args.rerank or args.retrieve), "--rerank and --retrieve"),
        "clip_pretrained": (bool(args.rerank or args.retrieve), "--rerank and --retrieve"),
    }
    defaults = build_parser().parse_args(["--ckpt", "-", "--out", "-"])
    for dest, (used, where) in uses.items():
        value = getattr(args, dest)
        if not used and value != getattr(defaults, dest):
            flag = "--" + dest.replace("_", "-")
            shown = repr(value) if isinstance(value, str) else value
            hint = " (--method cd_k guides by --cdk-k/--cdk-alpha, --edit by --text-cfg/--image-cfg)" * (dest == "cfg")
            raise ValueError(f"{flag} {shown} applies to {where} only; this run would ignore it{hint}")


def clean_texts(args: argparse.Namespace) -> None:
    """Replace ``--prompt``, ``--instruction``, ``--edit`` and ``--infill`` by the text the model reads
    (:func:`~cm3leon_lightning.data.cleaning.model_text`: ``cm3leon prepare``'s caption rule, so a trailing newline,
    a tab or a doubled space tokenizes, and embeds for ``--retrieve``/``--rerank``, as in training). An empty
    ``--instruction`` stays empty (plain captioning).

    Raises:
        ValueError: naming the flag, for text that holds nothing but whitespace and control characters, or an
            unpaired surrogate.
    """
    from cm3leon_lightning.data.cleaning import model_text

    for flag, what in (("prompt", "the prompt"), ("instruction", "the instruction"), ("edit", "the edit"),
                       ("infill", "the caption")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            setattr(args, flag, model_text(value, f"--{flag}", what, allow_empty=flag == "instruction"))


def resolve_clip(args: argparse.Namespace) -> None:
    """Fill ``--clip`` and ``--clip-pretrained`` where they were not given and a CLIP is used: with ``--retrieve``,
    the model the bank's ``meta.json`` records and the open_clip tag the ``--shards`` manifest records (queries must
    be embedded by the CLIP the bank was built with); else :data:`DEFAULT_CLIP` / :data:`DEFAULT_CLIP_PRETRAINED`.

    Raises:
        FileNotFoundError: ``--retrieve`` is no memory bank.
        ValueError: ``--clip-pretrained`` is not given and the manifest records a CLIP weights file (only its sha256
            is known: the message says to pass it).
    """
    from pathlib import Path

    from cm3leon_lightning.data.shards import MANIFEST_NAME, Manifest

    if not (args.rerank or args.retrieve):
        return
    if args.retrieve:
        from cm3leon_lightning.retrieval.index import bank_model_name

        try:
            name = bank_model_name(args.retrieve)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--retrieve: {e}") from e
        args.clip = args.clip or name
        manifest = Path(args.shards) / MANIFEST_NAME if args.shards else None
        if args.clip_pretrained is None and manifest is not None and manifest.is_file():
            try:
                weights = (Manifest.load(manifest).clip or {}).get("weights_sha256")
            except ValueError as e:
                raise ValueError(f"--shards: {e}") from e
            if isinstance(weights, str) and weights.startswith("open_clip:"):
                args.clip_pretrained = weights.removeprefix("open_clip:")
            elif isinstance(weights, str) and weights:
                raise ValueError(
                    f"--clip-pretrained: the memory bank {args.retrieve} was built with a CLIP weights file of sha256 "
                    f"{weights[:12]}... (the manifest of {args.shards}); pass that file"
                )
    args.clip = args.clip or DEFAULT_CLIP
    args.clip_pretrained = args.clip_pretrained or DEFAULT_CLIP_PRETRAINED
