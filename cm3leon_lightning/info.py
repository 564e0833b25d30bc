"""``cm3leon info PATH``: what a file or directory this package wrote holds, read from its metadata only.

Told apart by content: a training checkpoint (one ``.ckpt`` file or FSDP's sharded directory), a model directory of
``cm3leon export`` (either layout), a VQGAN directory, a prepared dataset (``manifest.json``, its directory, one of
its shards, the ``cm3leon prepare`` output holding ``train/`` and ``val/``, or its ``work/`` directory), a memory
bank, a text tokenizer, a CLIP model (``ClipModule.export_weights``' ``.safetensors``, with the architecture and
preprocessing its metadata records), or another ``.safetensors`` file. A file that is only a part of such a directory
(a bank's ``meta.json``, a sharded checkpoint's ``meta.pt``, ``cm3leon prepare``'s ``summary.json`` or ``work/``
files) is named as such, with the command that describes the whole; a directory whose weights (or a bank's files) are
missing or cut short is reported as such. No tensor is loaded: a Lightning checkpoint is memory-mapped and only its
small entries are read, a sharded one's ``meta.pt``, a safetensors file's header, a shard's tar headers. ``--json``
prints the fields as JSON (sizes in bytes).

Examples::

    cm3leon info runs/pretrain/checkpoints/last.ckpt
    cm3leon info models/350m --json
    cm3leon info data/prepared
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _model(
    kind: str, origin: Path, config: dict[str, Any] | None, vocab: dict[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    """The fields of a model's ``config`` and ``vocab``, read from ``origin`` (named when they are unusable)."""
    from cm3leon_lightning.config import CM3LeonConfig

    out: dict[str, Any] = {"kind": kind}
    try:
        if config:
            c = CM3LeonConfig.from_dict(config)  # a field left out takes its default, as loading does
            out["parameters"] = c.num_parameters()
            out["architecture"] = {k: getattr(c, k) for k in ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len",
                                                              "activation", "tie_embeddings")}  # fmt: skip
        if vocab:
            out["vocab"] = dict(vocab)
    except (TypeError, ValueError) as e:  # hand-edited, or written by a newer version with more fields
        raise ValueError(f"PATH: {origin} has an unusable architecture or vocabulary: {e}") from e
    return {**out, **{k: v for k, v in extra.items() if v is not None}}


def _dataset(manifest_path: Path) -> dict[str, Any]:
    from cm3leon_lightning.data.shards import Manifest

    m = Manifest.load(manifest_path)
    return {"kind": "prepared dataset", "samples": m.num_samples, "shards": len(m.shards),
            "format_version": m.format_version, "vocab": m.vocab().to_dict(),
            "clip": m.clip.get("model"), "created_by": m.created_by}  # fmt: skip


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip; ValueError when it is not loadable."""
    from cm3leon_lightning.model.weights import load_error

    zipped = zipfile.is_zipfile(path)
    if not zipped:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            raise ValueError(f"PATH: {path} is empty (0 bytes)")
        if head == b"PK\x03\x04":  # a zip's first entry, but no central directory at the end: cut short
            raise ValueError(f"PATH: {path} is a truncated or corrupt checkpoint (a zip file without its end)")
        if head[:1] != b"\x80":  # a pickle (torch's legacy format) starts with its protocol opcode
            raise ValueError(
                f"PATH: {path} is not a checkpoint, model, dataset, bank or tokenizer (neither a torch zip file "
                "nor a pickle)"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a file that is not a checkpoint
        raise ValueError(f"PATH: {path} is not a checkpoint, model, dataset, bank or tokenizer: {load_error(e)}") from e


def _checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint file (or a bare state dict), memory-mapped: only its small entries are read."""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"PATH: {path} holds a {type(obj).__name__}, not a checkpoint")
    if "state_dict" not in obj:
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        return {"kind": "state dict", "tensors": len(tensors), "elements": sum(t.numel() for t in tensors)}
    hp = obj.get("hyper_parameters") or {}
    optimizers = obj.get("optimizer_states") or []
    state = obj["state_dict"] if isinstance(obj["state_dict"], dict) else {}
    dtype = _dtypes(v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    common = dict(global_step=obj.get("global_step"), epoch=obj.get("epoch"), optimizer_state=bool(optimizers),
                  dtype=dtype, lightning=obj.get("pytorch-lightning_version"))  # fmt: skip
    other = _other_module(state, hp)
    if other is not None:
        return {**other, **{k: v for k, v in common.items() if v is not None}}
    config, vocab = hp.get("config"), hp.get("vocab")
    return _model("lightning checkpoint", path, config, vocab, init_from=hp.get("init_from"), **common)


def _other_module(state: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any] | None:
    """What a ``VQGANModule`` or ``ClipModule`` checkpoint holds (told apart by its weight names), else None."""
    from cm3leon_lightning.model.pretrained import holds_vqgan

    if holds_vqgan(state) and isinstance(hp.get("preset"), str):
        from cm3leon_lightning.tokenization.vqgan import config_from_overrides

        try:
            c = config_from_overrides(hp["preset"], hp)
        except (TypeError, ValueError):
            return {"kind": "lightning checkpoint (VQGANModule)", "preset": hp["preset"]}
        return {"kind": "lightning checkpoint (VQGANModule)", "preset": hp["preset"], "image_size": c.resolution,
                "grid": f"{c.grid_size[0]}x{c.grid_size[1]}", "codes": c.n_embed}  # fmt: skip
    if isinstance(hp.get("model_name"), str) and any(k.startswith("model.visual.") for k in state):
        shapes = {k.removeprefix("model."): list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        out = {"kind": "lightning checkpoint (ClipModule)", "clip_model": hp["model_name"], **(_clip(shapes) or {}),
               "pretrained": hp.get("pretrained"), "export_path": hp.get("export_path")}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}
    return None


def _clip(shapes: dict[str, list[int]]) -> dict[str, Any] | None:
    """The architecture an open_clip CLIP state dict's names and shapes show (its image tower, embedding dim, image
    size and text context length), None when they are not CLIP's (no ``logit_scale`` and ``visual.*``)."""
    from cm3leon_lightning.model.pretrained import holds_clip

    if not holds_clip(shapes):
        return None
    proj = shapes.get("text_projection") or []  # (width, embed_dim); a Linear's weight (embed_dim, width)
    embed = proj[1] if len(proj) == 2 else (shapes.get("text_projection.weight") or [None])[0]
    pos, patch, tower = shapes.get("visual.attnpool.positional_embedding"), 32, "ResNet"  # grid**2 + 1 positions
    if pos is None and "visual.conv1.weight" in shapes and "visual.class_embedding" in shapes:
        pos, patch, tower = shapes.get("visual.positional_embedding"), shapes["visual.conv1.weight"][-1], "ViT"
    grid = math.isqrt(pos[0] - 1) if pos else None
    image = grid * patch if grid and grid * grid == pos[0] - 1 else None  # type: ignore[index]
    context = (shapes.get("positional_embedding") or [None])[0]
    return {"vision": tower if pos else None, "embed_dim": embed, "image_size": image, "context_length": context}


def _dtypes(dtypes: Any) -> str | None:
    """The dtype name(s) of the weights (``float32``, or ``bfloat16, float32`` when mixed); None for none."""
    names = sorted({str(d).removeprefix("torch.") for d in dtypes})
    return ", ".join(names) or None


def _sharded_index(path: Path) -> tuple[bool, str | None]:
    """(optimizer state inside, the model tensors' dtype) of a sharded checkpoint, from its ``.metadata`` index;
    ValueError when a shard file is missing or shorter than the index says (a copy cut short)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        entries = metadata.state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a missing or corrupt .metadata file, in the reader's own error types
        raise ValueError(f"PATH: {path} has a meta.pt but its shard index (.metadata) is unreadable: {e}") from e
    ends: dict[str, int] = {}  # each shard file's size, as far as the index places data in it
    for item in (metadata.storage_data or {}).values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            held = "is missing" if size is None else f"holds {size} bytes"
            raise ValueError(f"PATH: {path / name} {held}; the shard index (.metadata) places {end} bytes in it")
    model = [m for k, m in entries.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)]
    return any(k.startswith("optimizer") for k in entries), _dtypes(m.properties.dtype for m in model)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"PATH: {path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"PATH: {path} holds a JSON {type(doc).__name__}, not an object")
    return doc


def _safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors from its header; a CLIP model's architecture and the metadata
    ``ClipModule.export_weights`` records (``model_name``, ``quick_gelu``, ``preprocess_cfg``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends for a corrupt header
        raise ValueError(f"PATH: {path} is not a readable safetensors file: {e}") from e
    tensors = {"tensors": len(shapes), "dtypes": dtypes,
               "elements": sum(int(torch.Size(s).numel()) for s in shapes.values())}  # fmt: skip
    clip = _clip(shapes)
    if clip is None:
        return {"kind": "safetensors", **tensors}
    from cm3leon_lightning.retrieval.clip_files import recorded_preprocess

    try:
        pp = recorded_preprocess(str(path)) or {}
    except ValueError as e:  # names the file and the entry
        raise ValueError(f"PATH: {e}") from e
    quick = {"true": True, "false": False}.get(meta.get("quick_gelu", ""))
    if "size" in pp:
        clip["image_size"] = pp["size"]  # the one the model was trained at, as recorded
    preprocess = {k: v for k, v in pp.items() if k != "size"} or None
    out = {"kind": "CLIP model", "model_name": meta.get("model_name"), **clip, "quick_gelu": quick,
           "preprocess": preprocess, **tensors}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def _shard(path: Path) -> dict[str, Any]:
    """A tar shard of a prepared dataset: its samples, counted from the member headers."""
    from cm3leon_lightning.data.shards import count_tar_samples

    try:
        return {"kind": "dataset shard", "samples": count_tar_samples(path)}
    except ValueError as e:
        raise ValueError(f"PATH: {e}") from e


PLAN_FILE, SUMMARY_FILE = "plan.json", "summary.json"
"""What marks ``cm3leon prepare``'s ``work/`` directory and its output directory."""


def _work_dir(p: Path) -> dict[str, Any]:
    """``cm3leon prepare``'s ``work/`` directory: its source, its tokenizer, the parts encoded, the memory bank."""
    from cm3leon_lightning.data.prepare_run import DONE_FILE

    plan = _read_json(p / PLAN_FILE)
    source = plan.get("source") if isinstance(plan.get("source"), dict) else {}
    parts = [d for d in (p / "parts").glob(f"*/{DONE_FILE}") if not d.parent.name.startswith(".")]  # .x.tmp: killed
    bank = p / "bank" / "index"
    out = {"kind": "prepare work directory", "source": {k: v for k, v in source.items() if k != "fingerprint"},
           "tokenizer": str(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else None,
           "parts_encoded": len(parts), "bank": str(bank) if (p / "bank" / DONE_FILE).is_file() else None}  # fmt: skip
    return out


def _prepare_output(p: Path) -> dict[str, Any]:
    """``cm3leon prepare``'s ``--out``: the samples of its splits, the vocabulary, the memory bank; while unfinished
    (no ``train/manifest.json`` yet), what its ``work/`` directory holds so far."""
    from cm3leon_lightning.data.shards import MANIFEST_NAME

    splits = {s: _dataset(p / s / MANIFEST_NAME) for s in ("train", "val") if (p / s / MANIFEST_NAME).is_file()}
    work = _work_dir(p / "work") if (p / "work" / PLAN_FILE).is_file() else {}
    if "train" not in splits:
        return {"kind": f"prepare output (unfinished: no train/{MANIFEST_NAME} yet)", "parts_encoded":
                work["parts_encoded"], "bank": work["bank"]}  # fmt: skip
    out = {"kind": "prepare output", **{f"{s}_samples": d["samples"] for s, d in splits.items()},
           "vocab": splits["train"]["vocab"], "bank": work.get("bank")}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def _prepare_holder(p: Path) -> tuple[str, Path] | None:
    """The ``cm3leon prepare`` work directory or output that ``p`` lies in (up to four levels below), by their marker
    files; None for none."""
    from cm3leon_lightning.data.shards import MANIFEST_NAME

    for d in list(p.parents)[:4]:
        if (d / PLAN_FILE).is_file():
            return "cm3leon prepare work directory", d
        if (d / "work" / PLAN_FILE).is_file() or (
            (d / SUMMARY_FILE).is_file() and (d / "train" / MANIFEST_NAME).is_file()
        ):
            return "cm3leon prepare output", d
    return None


def _check_weights(p: Path, hf: bool = False) -> None:
    """The weights of the model or VQGAN directory ``p``: there (for a Hugging Face directory re-saved in shards,
    every shard its index lists) and not shorter than their headers say; ValueError naming what is missing or cut."""
    from cm3leon_lightning.model.pretrained import CONFIG_FILE, HF_INDEX_FILE, WEIGHTS_FILE

    files = [p / WEIGHTS_FILE]
    if hf and not files[0].is_file() and (p / HF_INDEX_FILE).is_file():
        weight_map = _read_json(p / HF_INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"PATH: {p / HF_INDEX_FILE} lacks the field 'weight_map' (tensor name -> shard file)")
        files = [p / str(name) for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"PATH: {p / HF_INDEX_FILE} names the shard {f.name!r}, but {f} does not exist")
    elif not files[0].is_file():
        also = f" (nor {HF_INDEX_FILE})" if hf else ""
        raise ValueError(f"PATH: {p} has {CONFIG_FILE} but no {WEIGHTS_FILE}{also}: a copy cut short?")
    for f in files:
        _safetensors(f)  # the header, checked against the file's size


_PARTS = {
    "memory bank": ("index.faiss", "keys.json", "meta.json"),
    "model directory": ("config.json", "README.md", "tokenizer_config.json", "model.safetensors.index.json"),
    "VQGAN directory": ("config.json",),
    "prepared dataset": (),
}
"""The files of a directory kind that mean nothing alone (every file of a sharded checkpoint is one)."""


def _holder(path: Path) -> str | None:
    """The kind of directory this package writes that the file ``path`` lies in (from the directory's marker files
    only), None for none."""
    from cm3leon_lightning.data.shards import MANIFEST_NAME
    from cm3leon_lightning.model.pretrained import CONFIG_FILE, FORMAT_NAME, is_hf_dir
    from cm3leon_lightning.model.weights import SHARDED_META
    from cm3leon_lightning.retrieval.index import INDEX_FILE, META_FILE

    d = path.parent
    if (d / SHARDED_META).is_file():
        return "sharded checkpoint"
    if (d / META_FILE).is_file() and (d / INDEX_FILE).is_file():
        return "memory bank"
    if (d / MANIFEST_NAME).is_file():
        return "prepared dataset"
    if is_hf_dir(d):
        return "model directory"
    if (d / CONFIG_FILE).is_file():
        try:
            fmt = json.loads((d / CONFIG_FILE).read_text()).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return {FORMAT_NAME: "model directory", "cm3leon_lightning.vqgan": "VQGAN directory"}.get(fmt)
    return None


def describe(path: str | Path) -> dict[str, Any]:
    """The fields ``cm3leon info`` prints for ``path`` (``kind`` first, ``bytes`` last).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: not something this package reads.
    """
    from cm3leon_lightning.data.shards import MANIFEST_NAME
    from cm3leon_lightning.model.pretrained import CONFIG_FILE, FORMAT_NAME, bundled_paths, is_hf_dir, read_hf_block
    from cm3leon_lightning.model.weights import SHARDED_META
    from cm3leon_lightning.retrieval.index import INDEX_FILE, KEYS_FILE, META_FILE

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"PATH: {path} does not exist")
    info: dict[str, Any] | None = None
    if p.is_dir():
        doc = _read_json(p / CONFIG_FILE) if (p / CONFIG_FILE).is_file() else {}
        tokenizer, vqgan = bundled_paths(p)
        bundled = [name for name, x in (("tokenizer", tokenizer), ("vqgan", vqgan)) if x is not None]
        if is_hf_dir(p):
            block = read_hf_block(p, "PATH")  # ValueError for a Hugging Face model that is not CM3Leon
            info = _model("model directory (Hugging Face OPT layout)", p / CONFIG_FILE, block.get("config"),
                          block.get("vocab"), dtype=doc.get("dtype"), source=block.get("source"),
                          bundled=bundled)  # fmt: skip
        elif doc.get("format") == FORMAT_NAME:
            info = _model("model directory", p / CONFIG_FILE, doc.get("config"), doc.get("vocab"),
                          dtype=doc.get("dtype"), source=doc.get("source"), bundled=bundled)  # fmt: skip
        if info is not None:  # a model directory: its weights missing or cut short would only fail when loaded
            _check_weights(p, hf=is_hf_dir(p))
        elif doc.get("format") == "cm3leon_lightning.vqgan":
            c = doc.get("config", {})
            try:
                factor = 2 ** (len(c.get("ch_mult", [])) - 1)
                grid = c.get("resolution", 0) // factor if factor else None
            except (AttributeError, TypeError) as e:  # not a dict, or fields of the wrong types
                raise ValueError(f"PATH: {p / CONFIG_FILE} has an unusable VQGAN 'config': {e}") from e
            _check_weights(p)
            info = {"kind": "VQGAN", "resolution": c.get("resolution"), "codes": c.get("n_embed"), "grid": grid}
        elif (p / SHARDED_META).is_file():
            meta = _torch_load(p / SHARDED_META)
            meta = meta if isinstance(meta, dict) else {}
            hp = meta.get("hyper_parameters") or {}
            optimizer_state, dtype = _sharded_index(p)
            info = _model("sharded checkpoint", p / SHARDED_META, hp.get("config"), hp.get("vocab"),
                          global_step=meta.get("global_step"), epoch=meta.get("epoch"),
                          optimizer_state=optimizer_state, dtype=dtype)  # fmt: skip
        elif (p / MANIFEST_NAME).is_file():
            info = _dataset(p / MANIFEST_NAME)
        elif (p / "train" / MANIFEST_NAME).is_file() or (p / "work" / PLAN_FILE).is_file():
            info = _prepare_output(p)
        elif (p / PLAN_FILE).is_file():  # before its tokenizer.json: not a tokenizer's directory
            info = _work_dir(p)
        elif (p / META_FILE).is_file() and (p / INDEX_FILE).is_file():
            meta = _read_json(p / META_FILE)
            if not (p / KEYS_FILE).is_file():
                raise ValueError(f"PATH: {p} is a memory bank without its {KEYS_FILE} (a copy cut short?)")
            info = {"kind": "memory bank", **{k: meta.get(k) for k in ("count", "dim", "model_name", "factory")}}
        elif (p / "tokenizer.json").is_file():
            info = describe(p / "tokenizer.json")
    else:
        holder = _holder(p)
        if holder is not None and (holder == "sharded checkpoint" or p.name in _PARTS[holder]):
            raise ValueError(f"PATH: {p} is a file of the {holder} {p.parent}: cm3leon info {p.parent}")
        try:
            info = _file(p)
        except ValueError as e:  # summary.json, stats/part-*.json, work/plan.json, work/parts/*/codes.npy ...
            prepare = _prepare_holder(p) if holder is None else None
            if prepare is None:
                raise
            raise ValueError(f"PATH: {p} is a file of the {prepare[0]} {prepare[1]}: cm3leon info {prepare[1]}") from e
        if holder is not None and info["kind"] in ("safetensors", "dataset shard"):
            info["part_of"] = f"{holder} {p.parent}"
    prepare = _prepare_holder(p) if info is None else None
    if prepare is not None:  # work/bank/, work/parts/<part>/, stats/
        raise ValueError(f"PATH: {p} is a directory of the {prepare[0]} {prepare[1]}: cm3leon info {prepare[1]}")
    if info is None:
        raise ValueError(
            f"PATH: {path} is a directory this package does not know (no checkpoint, model, VQGAN, dataset, bank or "
            "tokenizer files)"
        )
    return {**info, "bytes": _size(p)}


def _file(p: Path) -> dict[str, Any]:
    """What the file ``p`` holds (a dataset's manifest or shard, a tokenizer, safetensors or a checkpoint)."""
    from cm3leon_lightning.data.shards import MANIFEST_NAME
    from cm3leon_lightning.model.weights import is_safetensors

    if p.name == MANIFEST_NAME:
        return _dataset(p)
    if p.suffix == ".json":
        from cm3leon_lightning.tokenization.text import TextTokenizer

        doc = _read_json(p)
        if not isinstance(doc.get("model"), dict):  # every tokenizers JSON file has its model section
            raise ValueError(f"PATH: {p} is a JSON file but not a text tokenizer (tokenizer.json) or {MANIFEST_NAME}")
        tok = TextTokenizer.load(p)
        return {"kind": "text tokenizer", "vocab_size": tok.vocab_size, "num_sentinels": tok.num_sentinels,
                "sha256": tok.sha256}  # fmt: skip
    if is_safetensors(p):
        return _safetensors(p)
    if p.suffix == ".tar" or (not zipfile.is_zipfile(p) and tarfile.is_tarfile(p)):
        return _shard(p)
    return _checkpoint(p)


def _bytes(n: int) -> str:
    """A size for people: ``512 B``, ``3.5 KiB``, ``1.2 MiB``, ``6.7 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cm3leon info``; returns the exit status (2 for a path it cannot read)."""
    p = argparse.ArgumentParser(prog="cm3leon info", description=__doc__.split("\n")[0])
    p.add_argument(
        "path", help="a checkpoint, model directory, VQGAN, prepared dataset or shard, memory bank, tokenizer or CLIP"
    )
    p.add_argument("--json", action="store_true", help="print the fields as JSON")
    args = p.parse_args(argv)
    try:
        info = describe(args.path)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"cm3leon info: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "parameters":
            value = f"{value / 1e6:.1f}M"
        elif key == "bytes":
            key, value = "size", _bytes(value)
        elif value is None:
            value = "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key + ':':<17} {value}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
