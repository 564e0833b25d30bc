"""The CLIP weights file of ``ClipModule.export_weights``: what it records beside the state dict, and reading it back.

A safetensors file whose metadata holds what the state dict lacks and ``create_clip`` rebuilds from: ``model_name``,
``quick_gelu`` (``"true"``/``"false"``: OpenAI-derived weights run QuickGELU) and ``preprocess_cfg``, JSON of the
image preprocessing (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``: a model
fine-tuned from a tag keeps the tag's). The metadata keys are written sorted, so one model always gives the same bytes
and the sha256 that ``cm3leon prepare`` records identifies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import CustomResidualAttentionBlock, QuickGELU, ResidualAttentionBlock

from cm3leon_lightning.files import replaced_whole, save_safetensors


def save_clip_weights(model: torch.nn.Module, model_name: str, path: Path) -> None:
    """Write an open_clip ``model`` (built as ``model_name``) to ``path`` with the metadata above.

    The file is written under a temporary name beside ``path`` and moved into place when complete: an error while
    writing (disk full, interrupted) leaves a file already at ``path`` as it was.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    pp = model.visual.preprocess_cfg  # defaults as in ClipModule.forward (open_clip releases before PreprocessCfg)
    size = pp["size"]
    preprocess = {
        "size": int(size) if isinstance(size, int) else [int(x) for x in size],
        "mean": [float(x) for x in pp["mean"]],
        "std": [float(x) for x in pp["std"]],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        "fill_color": int(pp.get("fill_color", 0)),
    }
    meta = {
        "model_name": model_name,
        "quick_gelu": "true" if uses_quick_gelu(model) else "false",
        "preprocess_cfg": json.dumps(preprocess),
    }
    with replaced_whole(path) as tmp:
        save_safetensors(state, tmp, metadata=meta)
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted.

    safetensors writes the metadata in a random order on every call, so exporting the same model twice gave files
    of different sha256 (which ``cm3leon prepare``'s plan and manifest record, and the query side checks). The
    re-serialised header has the same length (same JSON, other key order); it is padded with spaces as safetensors
    pads it.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # the same JSON in another key order is never longer; anything else would be a bug
            raise RuntimeError(
                f"{path}: the sorted safetensors header is longer than the written one ({len(text)} > {n})"
            )
        f.seek(8)
        f.write(text.ljust(n))


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """Whether an open_clip model was built with QuickGELU (OpenAI's weights were trained with it)."""
    return any(isinstance(m, QuickGELU) for m in model.modules())


def set_quick_gelu(model: torch.nn.Module, quick: bool) -> None:
    """Make the activations that open_clip's ``quick_gelu`` chooses (its transformer blocks' MLPs) QuickGELU or GELU,
    in place: the model then computes as one built with ``force_quick_gelu=quick`` (activations have no weights)."""
    for block in model.modules():
        if isinstance(block, ResidualAttentionBlock | CustomResidualAttentionBlock):
            act = block.mlp.gelu
            if quick and type(act) is torch.nn.GELU and act.approximate == "none":
                block.mlp.gelu = QuickGELU()
            elif not quick and isinstance(act, QuickGELU):
                block.mlp.gelu = torch.nn.GELU()


def file_metadata(path: str) -> dict[str, str]:
    """The safetensors metadata of a local checkpoint (``{}`` for other formats or a file without metadata)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def wants_quick_gelu(path: str) -> bool:
    """Whether a local checkpoint written by ``ClipModule.export_weights`` records a QuickGELU model.

    A model fine-tuned from the ``openai`` tag runs QuickGELU (``create_clip`` forces it for that tag); rebuilding its
    exported weights with the plain architecture (``"ViT-B-32"`` has GELU) would give other embeddings.
    """
    return file_metadata(path).get("quick_gelu") == "true"


def size_hw(size: Any) -> tuple[int, int]:
    """open_clip's image size (``S`` or ``(H, W)``) as ``(H, W)``."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def recorded_preprocess(path: str) -> dict[str, Any] | None:
    """The image preprocessing ``ClipModule.export_weights`` records in a file's metadata (``None`` if absent).

    Raises:
        ValueError: the ``preprocess_cfg`` entry is not JSON of the expected keys and values (the file is named).
    """
    raw = file_metadata(path).get("preprocess_cfg")
    if raw is None:
        return None
    try:
        pp = json.loads(raw)
    except json.JSONDecodeError:
        pp = None

    def is_num3(v: Any) -> bool:
        return isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) for x in v)

    def is_size(v: Any) -> bool:
        items = v if isinstance(v, list) and len(v) == 2 else [v]
        return all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in items)

    checks = {
        "size": is_size,
        "mean": is_num3,
        "std": lambda v: is_num3(v) and all(x > 0 for x in v),
        "interpolation": lambda v: v in ("bicubic", "bilinear", "random"),
        "resize_mode": lambda v: v in ("shortest", "squash", "longest"),
        "fill_color": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255,
    }
    bad = (
        ["not a JSON object"]
        if not isinstance(pp, dict)
        else [k for k in pp if k not in checks or not checks[k](pp[k])]
    )
    if bad:
        raise ValueError(
            f"{path}: the safetensors metadata 'preprocess_cfg' is invalid ({', '.join(bad)}): {raw[:300]!r}; expected "
            'JSON like {"size": 224, "mean": [m, m, m], "std": [s, s, s], "interpolation": "bicubic"|"bilinear", '
            '"resize_mode": "shortest"|"squash"|"longest", "fill_color": 0-255}, as ClipModule.export_weights writes'
        )
    return pp
