"""The ``cm3leon prepare`` command line: sources from flags, settings from :class:`PrepareConfig`'s fields.

Example (COCO captions, a VQGAN checkpoint and local CLIP weights)::

    cm3leon prepare --source coco --input coco/train2017 --captions coco/annotations/captions_train2017.json \\
        --out data/prepared --vqgan checkpoints/vqgan \\
        --clip-model ViT-B-32-quickgelu --clip-weights clip/openai-vit-b-32.safetensors \\
        --train-tokenizer-vocab 56320 --val-fraction 0.01 --workers 4

Every :class:`~cm3leon_lightning.data.prepare.PrepareConfig` field is a flag of the same name with dashes
(``--samples-per-shard``, ``--k-per-modality``...; booleans also as ``--no-...``). Errors in the input settings print
one line and exit with status 2; bad documents are counted, never fatal.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from cm3leon_lightning.data.prepare import STAGES, PrepareConfig, prepare, print_summary
from cm3leon_lightning.data.prepare_stages import MissingPartsError
from cm3leon_lightning.data.sources import PairSource, make_source

_SOURCE_FLAGS = ("source", "input", "captions", "coco_mode", "num_pairs", "shapes_split", "shapes_image_size")
_SOURCE_FLAGS += ("shapes_seed", "sft_up", "sft_down", "sft_seed", "bank_source", "bank_input", "bank_captions", "out")
_SOURCE_FLAGS += ("image_column", "caption_column", "key_column")
SOURCES = ("shapes", "folder", "coco", "wds", "parquet", "sft")
# source settings -> (the kind that reads them, whether a --bank-source of that kind reads them too)
_SOURCE_SETTINGS = {"coco_mode": ("coco", True), "image_column": ("parquet", True), "caption_column": ("parquet", True),
                    "key_column": ("parquet", True), "num_pairs": ("shapes", True), "shapes_split": ("shapes", False),
                    "shapes_image_size": ("shapes", True), "shapes_seed": ("shapes", True), "sft_up": ("sft", True),
                    "sft_down": ("sft", True), "sft_seed": ("sft", True)}  # fmt: skip


def _field_docs() -> dict[str, str]:
    """``name -> description`` from the ``Attributes:`` section of :class:`PrepareConfig`'s docstring."""
    doc = (PrepareConfig.__doc__ or "").split("Attributes:", 1)[-1]
    docs: dict[str, str] = {}
    name = None
    for line in doc.splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            name, docs[m.group(1)] = m.group(1), m.group(2)
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def _shard_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard-range must be START:STOP with START < STOP, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--stages takes a comma-separated subset of {','.join(STAGES)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cm3leon prepare``."""
    p = argparse.ArgumentParser(
        prog="cm3leon prepare",
        description="Turn raw image-caption pairs into retrieval-augmented training shards (manifest + WebDataset).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--source", required=True, choices=SOURCES, help="kind of input")
    g.add_argument("--input", help="image folder (folder, coco), WebDataset tar directory / brace pattern (wds), "
                   "Parquet directory / glob (parquet), or instruction-tuning JSON-lines file / folder "
                   "(sft)")  # fmt: skip
    g.add_argument("--captions", help="COCO captions JSON (coco)")
    g.add_argument("--coco-mode", default="first", choices=("first", "all"), help="coco: one document per image "
                   "(the lowest annotation id's caption) or one per caption")  # fmt: skip
    g.add_argument("--image-column", default="image", help="parquet: image column (bytes, path or {bytes, path})")
    g.add_argument("--caption-column", default="caption", help="parquet: caption column (string or list of strings)")
    g.add_argument("--key-column", help="parquet: column of stable document ids (default: file stem and row)")
    g.add_argument("--num-pairs", type=int, default=100, help="shapes: number of generated pairs")
    g.add_argument("--shapes-split", default="train", choices=("train", "heldout"), help="shapes: split")
    g.add_argument("--shapes-image-size", type=int, default=32, help="shapes: image side in pixels")
    g.add_argument("--shapes-seed", type=int, default=0, help="shapes: generator seed")
    g.add_argument("--sft-up", type=float, default=3.0, help="sft: most times a dataset is repeated (paper E.1: 3)")
    g.add_argument("--sft-down", type=float, default=0.3, help="sft: least share of a dataset kept (paper E.1: 0.3)")
    g.add_argument("--sft-seed", type=int, default=0, help="sft: seed of the mixture's subsets, order and templates")
    g.add_argument("--bank-source", choices=SOURCES, help="a separate memory-bank "
                   "dataset (default: the training split of --source)")  # fmt: skip
    g.add_argument("--bank-input", help="the bank dataset's folder / tars")
    g.add_argument("--bank-captions", help="the bank dataset's COCO captions JSON")
    g.add_argument("--out", required=True, help="output directory (train/, val/, stats/, summary.json, work/)")
    s = p.add_argument_group("settings (PrepareConfig)")
    docs = _field_docs()
    hints = typing.get_type_hints(PrepareConfig)
    for f in fields(PrepareConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        kwargs = {"help": docs.get(f.name, ""), "dest": f.name}
        if f.name == "shard_range":
            kwargs.update(type=_shard_range, metavar="START:STOP", default=None)
        elif f.name == "stages":
            kwargs.update(type=_stages, default=STAGES, metavar="A,B,...")
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            kwargs.update(type=base, required=required, default=None if required else f.default)
        s.add_argument(flag, **kwargs)
    return p


def sources_from_args(args: argparse.Namespace) -> tuple[PairSource, PairSource | None]:
    """The main source and the optional bank source named by the flags.

    Raises:
        ValueError: an input flag that the chosen sources do not read (``--bank-input`` without ``--bank-source``,
            ``--captions`` without ``--source coco``, ``--num-pairs`` without a shapes source, ``--key-column``
            without a Parquet one...): it would be ignored, and the data not be what was meant. A source setting
            given its default value changes nothing and passes.
    """
    unread = {
        "--input": args.input is not None and args.source == "shapes",
        "--captions": args.captions is not None and args.source != "coco",
        "--bank-input": args.bank_input is not None and args.bank_source in (None, "shapes"),
        "--bank-captions": args.bank_captions is not None and args.bank_source != "coco",
    }
    for flag, ignored in unread.items():
        if ignored and flag.startswith("--bank") and args.bank_source is None:
            raise ValueError(f"{flag} is given without --bank-source (the bank dataset's kind); it would be ignored")
        if ignored:
            given = f"--bank-source {args.bank_source}" if flag.startswith("--bank") else f"--source {args.source}"
            raise ValueError(f"{flag} is not read with {given}; it would be ignored")
    parser = build_parser()
    for name, (kind, bank) in _SOURCE_SETTINGS.items():
        read = args.source == kind or (bank and args.bank_source == kind)
        if not read and getattr(args, name) != parser.get_default(name):
            sources = f"--source {args.source}" + (f" and --bank-source {args.bank_source}" if args.bank_source else "")
            only = "--source or --bank-source" if bank else "--source"
            raise ValueError(
                f"--{name.replace('_', '-')} is read only with {only} {kind}, not with {sources}; it would be ignored"
            )
    balance = (args.sft_up, args.sft_down)
    seed = args.sft_seed if args.source == "sft" else args.shapes_seed
    columns = (args.image_column, args.caption_column, args.key_column)
    main = make_source(
        args.source, args.input, args.captions, args.num_pairs, args.coco_mode, args.shapes_split,
        args.shapes_image_size, seed, balance, columns,
    )  # fmt: skip
    bank = None
    if args.bank_source is not None:
        seed = args.sft_seed if args.bank_source == "sft" else args.shapes_seed + 1
        try:
            bank = make_source(
                args.bank_source, args.bank_input, args.bank_captions, args.num_pairs, args.coco_mode, "train",
                args.shapes_image_size, seed, balance, columns, flags=("--bank-input", "--bank-captions"),
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            if type(e) in (ValueError, FileNotFoundError) and str(e).startswith("--input"):  # parquet's errors
                raise type(e)("--bank-input" + str(e).removeprefix("--input")) from e
            raise
    return main, bank


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`~cm3leon_lightning.data.prepare.prepare`; returns the exit status."""
    from cm3leon_lightning.retrieval.encoder import ClipWeightsUnavailableError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = {k: v for k, v in vars(args).items() if k not in _SOURCE_FLAGS}
    try:
        config = PrepareConfig(**settings)
        source, bank = sources_from_args(args)
        summary = prepare(source, args.out, config, bank_source=bank)
    except (ValueError, FileNotFoundError, MissingPartsError, ClipWeightsUnavailableError) as e:
        print(f"cm3leon prepare: error: {e}", file=sys.stderr)
        return 2
    if not config.progress:  # with progress bars prepare() prints it (on stderr, beside the bars)
        print_summary(summary, Path(args.out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
