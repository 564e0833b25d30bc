"""``cm3leon export``: a training checkpoint -> a self-contained model directory to share, serve or fine-tune from.

Examples::

    cm3leon export --ckpt runs/pretrain/checkpoints/last.ckpt --tokenizer tok/ --vqgan vqgan/ --out models/350m
    cm3leon export --ckpt runs/7b/checkpoints/last.ckpt --dtype bfloat16 --out models/7b   # FSDP's sharded directory
    cm3leon generate --ckpt models/350m --prompt "a red circle" --out samples/   # tokenizers from the directory
    cm3leon serve --ckpt models/350m
    cm3leon fit --config sft.yaml --model.init_args.init_from models/350m
    cm3leon export --ckpt last.ckpt --tokenizer tok/ --vqgan vqgan/ --format hf --out models/350m-hf
    python -c "import transformers; transformers.OPTForCausalLM.from_pretrained('models/350m-hf')"

The directory (:mod:`cm3leon_lightning.model.pretrained`) holds ``config.json`` (architecture, vocabulary, provenance:
the ``--ckpt`` path as given, not made absolute, so a shared model names no local directory it was not given with, and
the step), ``model.safetensors`` (the network only: no optimizer state, no pickle; ``--dtype bfloat16`` halves it) and,
when given, ``tokenizer/`` and ``vqgan/``, checked against the checkpoint's vocabulary. A VQGAN in taming's or
Chameleon's format is converted to ours on the way. ``--format hf`` writes the network as ``transformers``'
``OPTForCausalLM`` instead (CM3Leon is OPT without biases and LayerNorm parameters, which OPT's config can switch off;
:mod:`cm3leon_lightning.model.hf_opt`), with ``tokenizer.json`` and ``tokenizer_config.json`` at the top for
``AutoTokenizer``; such a directory reads back everywhere ours does. It is written beside ``--out`` and renamed into
place when complete, so an existing model is never left half-replaced (``--force`` replaces it; without, an existing
non-empty ``--out`` is refused). Errors are reported in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cm3leon_lightning.model.pretrained import (
    DTYPES,
    TOKENIZER_DIR,
    VQGAN_DIR,
    bundled_paths,
    other_network,
    save_pretrained,
)

FORMATS = ("cm3leon", "hf")
"""``--format``: our model directory, or Hugging Face ``transformers``' OPT layout."""

AS_SAVED = "as-saved"


def export_model(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    vqgan: str | os.PathLike[str] | None = None,
    vqgan_config: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
    force: bool = False,
    format: str = "cm3leon",
) -> dict[str, Any]:
    """Write the model directory ``out`` from ``ckpt``; returns a summary (``path``, ``kind``, ``parameters``,
    ``dtype``, ``bytes``, ``tokenizer``, ``vqgan``).

    Args:
        ckpt: a ``CM3LeonModule`` checkpoint (``.ckpt`` or FSDP's sharded directory) or another model directory.
        out: the directory to create.
        tokenizer: the text tokenizer to bundle (``tokenizer.json`` or its directory); checked against the vocabulary.
        vqgan: the image tokenizer to bundle (anything ``VQGAN.from_pretrained`` reads); checked likewise.
        vqgan_config: architecture file for a bare VQGAN checkpoint (taming / Chameleon yaml).
        trust_pickle: let ``VQGAN.from_pretrained`` unpickle a Lightning 1.x VQGAN checkpoint (runs its code).
        dtype: store the weights in this dtype (None: as saved).
        force: replace an existing ``out``.
        format: ``cm3leon`` (our model directory) or ``hf`` (``transformers``' ``OPTForCausalLM``).

    Raises:
        FileExistsError: ``out`` exists and is not empty, without ``force``; a file stands at ``out`` or above it.
        FileNotFoundError, ValueError: a missing or unusable input, named by its argument.
    """
    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.model.transformer import CM3Leon
    from cm3leon_lightning.model.weights import fit_state, read_weights, tensor_reader
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    out, src = Path(out), Path(ckpt)
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a directory")
    above = next((d for d in out.absolute().parents if d.exists()), None)  # created with its missing parents
    if above is not None and not above.is_dir():
        raise FileExistsError(f"--out: {above} exists and is not a directory, so {out} cannot be created in it")
    if out.resolve() == Path.cwd() or out.resolve() in Path.cwd().parents:  # it is renamed into place: not from here
        raise ValueError(f"--out: {out} is the current directory or holds it; name the model directory to create")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out: {out} exists and is not empty (--force replaces it)")
    if src.exists() and (out.resolve() == src.resolve() or src.resolve() in out.resolve().parents):
        raise ValueError(f"--out: {out} is or lies inside --ckpt {src}")
    if vqgan_config is not None and vqgan is None:
        raise ValueError(f"--vqgan-config {vqgan_config} is the architecture of a --vqgan checkpoint: give --vqgan")
    inside_tokenizer, inside_vqgan = bundled_paths(src)  # re-exporting keeps the tokenizers unless others are given
    tokenizer, vqgan = tokenizer or inside_tokenizer, vqgan or inside_vqgan
    inputs = {"--ckpt": src, "--tokenizer": tokenizer, "--vqgan": vqgan, "--vqgan-config": vqgan_config}
    for flag, path in inputs.items():  # --force replaces --out: it must not hold what is being exported
        if path is not None and out.exists() and Path(path).exists():
            here, there = out.resolve(), Path(path).resolve()
            if there == here or here in there.parents:
                raise ValueError(f"--out: {out} holds {flag} {path}; replacing it would delete the input")
    weights = read_weights(src, "--ckpt", lazy=True)  # tensors read a chunk at a time while writing
    if not weights.config or not weights.vocab:
        raise ValueError(
            f"--ckpt: {src} ({weights.kind}) lacks the architecture and vocabulary ('config' and 'vocab')"
            f"{other_network(weights.state_dict)}; export reads CM3LeonModule checkpoints and model directories"
        )
    try:
        config = CM3LeonConfig.from_dict(weights.config)
    except (TypeError, ValueError) as e:  # a hand-edited file, or one from a newer version with more fields
        raise ValueError(f"--ckpt: {src} has an unusable architecture ('config'): {e}") from e
    MultimodalVocab.from_dict(weights.vocab, f"--ckpt: {src}: vocab")  # every field, none defaulted
    with torch.device("meta"):  # names and shapes only: a 7B network is never allocated here
        skeleton = CM3Leon(config)
    state = fit_state(skeleton, weights.state_dict, f"--ckpt {str(src)!r}")
    floats = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    if dtype is None and (len(floats) != 1 or floats[0] not in DTYPES):  # a model directory stores one of DTYPES
        raise ValueError(
            f"--ckpt: {src} holds weights in {', '.join(floats)}; give --dtype ({', '.join(DTYPES)}) to store "
            "them in one"
        )
    fetch = tensor_reader(weights.state_dict, weights.fetch)  # a tied pair read under the name the file has
    text_tok, image_tok = _load_tokenizers(weights.vocab, tokenizer, vqgan, vqgan_config, trust_pickle, src)
    vocab = _bundled_vocab(weights.vocab, image_tok)

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        # the path as given (no home dir); a model directory's own provenance is kept beside it, not over it
        earlier = {k: v for k, v in weights.source.items() if k not in ("checkpoint", "kind")}
        if "checkpoint" in weights.source:
            earlier["exported_from"] = {k: weights.source[k] for k in ("checkpoint", "kind") if k in weights.source}
        source = {"checkpoint": str(src), "kind": weights.kind, **earlier}
        save_pretrained(state, partial, config.to_dict(), vocab, dtype, source, layout=format, fetch=fetch)
        if text_tok is not None and format == "hf":
            text_tok.save(partial)  # tokenizer.json at the top, as transformers looks for it
            _write_tokenizer_config(partial, config.max_seq_len)
        elif text_tok is not None:
            text_tok.save(partial / TOKENIZER_DIR)
        if image_tok is not None:
            image_tok.save_pretrained(partial / VQGAN_DIR)
        stored = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
        summary = {
            "path": str(out),
            "kind": weights.kind,
            "format": format,
            "parameters": config.num_parameters(),
            "dtype": str(stored).removeprefix("torch."),
            "tokenizer": text_tok is not None,
            "vqgan": image_tok is not None,
        }
        (partial / "README.md").write_text(model_card(summary, config.to_dict(), vocab, source))
        _replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {**summary, "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def model_card(summary: dict[str, Any], config: dict[str, Any], vocab: dict[str, int], source: dict[str, Any]) -> str:
    """The ``README.md`` of an exported directory: a Hugging Face model card (YAML front matter, then what the model
    is, where it came from and how to run it), for the user to complete with data and evaluation."""
    hf = summary["format"] == "hf"
    name = Path(summary["path"]).name
    library = "transformers" if hf else "cm3leon_lightning"
    front = f"---\nlibrary_name: {library}\ntags:\n- cm3leon\n- text-to-image\n- image-to-text\n---\n"
    arch = ", ".join(f"{k} {config[k]}" for k in ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "activation"))
    step = f", step {source['global_step']}" if "global_step" in source else ""
    names = {"tokenizer": "text tokenizer", "vqgan": "VQGAN"}
    tokenizers = " and ".join(names[x] for x in names if summary[x]) or "none (pass --tokenizer and --vqgan)"
    codes = f"{vocab['n_codes']} image codes, {vocab['grid_h']}x{vocab['grid_w']} per image"
    lines = [
        f"# {name}",
        "",
        "A CM3Leon-style retrieval-augmented, token-based, decoder-only multimodal model (Yu et al. 2023) trained",
        f"with cm3leon_lightning. Text and images share one vocabulary: {vocab['n_text']} text ids, then {codes}.",
        "",
        f"- Parameters: {summary['parameters'] / 1e6:.1f}M ({arch}; no biases, parameter-free LayerNorm)",
        f"- Weights: `model.safetensors`, {summary['dtype']}" + (", in `transformers`' OPT layout" if hf else ""),
        f"- Bundled tokenizers: {tokenizers}",
        f"- Exported from: {source.get('kind', 'a checkpoint')}{step}",
        "",
        "## Use",
        "",
        "```bash",
        f'cm3leon generate --ckpt {name} --prompt "a red circle" --num-samples 4 --cfg 3 --out samples/',
        f"cm3leon serve --ckpt {name}",
        "```",
    ]
    if hf:
        load = f'model = OPTForCausalLM.from_pretrained("{name}")  # the logits of cm3leon_lightning'
        lines += ["", "```python", "from transformers import OPTForCausalLM", "", load, "```", ""]
        lines += ["Drawing images needs `cm3leon_lightning.generate_image` (image-code constraint, CFG)."]
    lines += ["", "## Training data and evaluation", "", "(to be completed)", ""]
    return front + "\n".join(lines)


def _load_tokenizers(
    vocab: dict[str, int],
    tokenizer: str | os.PathLike[str] | None,
    vqgan: str | os.PathLike[str] | None,
    vqgan_config: str | os.PathLike[str] | None,
    trust_pickle: bool,
    ckpt: Path,
) -> tuple[Any, Any]:
    """Load ``--tokenizer`` and ``--vqgan`` and check them against the checkpoint's vocabulary: sizes and, where the
    checkpoint records them, the tokenizers' hashes (refused naming both files and the short hashes)."""
    from cm3leon_lightning.generation.cli import check_tokenizers
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    text_tok = image_tok = None
    if tokenizer is not None:
        from cm3leon_lightning.tokenization.text import TextTokenizer

        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer: not found: {tokenizer}")
        try:
            text_tok = TextTokenizer.load(tokenizer)
        except FileNotFoundError as e:  # a directory without tokenizer.json, or a file that is not a .json
            raise FileNotFoundError(f"--tokenizer: {e}") from e
        except ValueError as e:
            raise ValueError(f"--tokenizer: {e}") from e
    if vqgan is not None:
        from cm3leon_lightning.tokenization.vqgan import VQGAN

        if not Path(vqgan).exists():
            raise FileNotFoundError(f"--vqgan: not found: {vqgan}")
        if vqgan_config is not None and not Path(vqgan_config).is_file():
            raise FileNotFoundError(f"--vqgan-config: not found: {vqgan_config}")
        try:
            image_tok = VQGAN.from_pretrained(vqgan, config_path=vqgan_config, trust_pickle=trust_pickle).eval()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--vqgan: {e}") from e
        except ValueError as e:
            raise ValueError(f"--vqgan: {e}") from e
    check_tokenizers(MultimodalVocab(**vocab), text_tok, image_tok, f"--ckpt {ckpt}", vqgan)
    return text_tok, image_tok


def _bundled_vocab(vocab: dict[str, Any], image_tok: Any) -> dict[str, Any]:
    """The vocabulary the model directory records: the checkpoint's, and when it bundles a VQGAN checked against the
    VQGAN hash the checkpoint records, that VQGAN's weights hash (``vqgan_weights_sha256``): the bundled copy is
    rewritten in our format, so its files no longer hash as the ones ``cm3leon prepare`` read. A checkpoint that
    records no VQGAN hash gets none (nothing says the bundled VQGAN is the one it was trained with)."""
    from cm3leon_lightning.tokenization.vocab import vqgan_weights_sha256

    if image_tok is None or not (vocab.get("vqgan_sha256") or vocab.get("vqgan_weights_sha256")):
        return dict(vocab)
    return {**vocab, "vqgan_weights_sha256": vqgan_weights_sha256(image_tok)}


def _write_tokenizer_config(directory: Path, max_len: int) -> None:
    """``tokenizer_config.json`` so ``transformers.AutoTokenizer`` loads ``tokenizer.json`` with the special tokens
    named (it adds none: CM3Leon's documents place ``<eos>``/``<break>`` themselves)."""
    from cm3leon_lightning.tokenization.vocab import EOS, PAD

    doc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "pad_token": PAD,
           "eos_token": EOS, "bos_token": EOS, "add_bos_token": False, "add_eos_token": False}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(doc, indent=2) + "\n")


def _replace(new: Path, out: Path) -> None:
    """Move the finished directory ``new`` to ``out``; an existing ``out`` is moved aside first and removed only
    once the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)
        raise
    if old.is_symlink():  # --out named a link: replace the link, never delete what it points to
        old.unlink()
    else:
        shutil.rmtree(old)


def build_parser() -> argparse.ArgumentParser:
    """The ``cm3leon export`` argument parser."""
    p = argparse.ArgumentParser(prog="cm3leon export", description=__doc__.split("\n")[0])
    p.add_argument(
        "--ckpt", required=True, help="CM3LeonModule checkpoint (.ckpt or FSDP's sharded directory) or model directory"
    )
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--tokenizer", help="text tokenizer to bundle: tokenizer.json or its directory")
    p.add_argument("--vqgan", help="VQGAN to bundle: our directory, or a taming / Chameleon checkpoint")
    p.add_argument("--vqgan-config", help="architecture yaml for a bare taming / Chameleon VQGAN checkpoint")
    p.add_argument(
        "--trust-pickle", action="store_true", help="unpickle a Lightning 1.x VQGAN checkpoint (runs code it names)"
    )
    p.add_argument("--dtype", choices=(AS_SAVED, *DTYPES), default=AS_SAVED, help="store the weights in this dtype")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--format", choices=FORMATS, default="cm3leon", help="cm3leon (ours) or hf (transformers' OPTForCausalLM)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cm3leon export``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        summary = export_model(
            args.ckpt, args.out, args.tokenizer, args.vqgan, args.vqgan_config, args.trust_pickle,
            None if args.dtype == AS_SAVED else DTYPES[args.dtype], args.force, args.format,
        )  # fmt: skip
    except (OSError, ValueError) as e:  # OSError: also a --out that cannot be written (permissions, disk full)
        print(f"cm3leon export: error: {e}", file=sys.stderr)
        return 2
    bundled = " and ".join(name for name in ("tokenizer", "vqgan") if summary[name])
    print(
        f"wrote {summary['path']}: {summary['parameters'] / 1e6:.1f}M parameters in {summary['dtype']} from a "
        f"{summary['kind']}, {summary['bytes'] / 2**20:.1f} MiB" + (f", with {bundled}" if bundled else "")
    )
    print(f"use: cm3leon generate --ckpt {summary['path']} ...   cm3leon serve --ckpt {summary['path']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
