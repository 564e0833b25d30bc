"""Building open_clip CLIP models for the dense retriever: the tiny offline architectures, and pretrained weights.

:data:`CLIP_CONFIGS` registers tiny open_clip architectures so tests and the demo run offline in seconds.
:func:`create_clip` builds a model from an open_clip pretrained tag or a local weights file, failing fast with a message
that names the file or tag when the weights cannot be had (not cached and no network, truncated, another
architecture's); :func:`clip_tag` is its tag and cache check, shared with ``cm3leon serve``'s start-up check.

Split from :mod:`cm3leon_lightning.retrieval.encoder` (which re-exports these names) so each file reads in one sitting.
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from copy import deepcopy
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from safetensors import SafetensorError

from cm3leon_lightning.retrieval.clip_files import (
    file_metadata,
    recorded_preprocess,
    set_quick_gelu,
    size_hw,
    uses_quick_gelu,
)

# Tiny architectures for tests and the demo. The text tower keeps open_clip's bundled BPE (vocab 49408), which loads
# offline; only widths, depths and context length shrink. "tiny" is a small ModifiedResNet (CLIP's RN layout): on
# coloured-shape captions it reaches 100% recall@1 in ~100 steps where a same-cost ViT needs several times more.
# "small" is a ViT like the paper's ViT-B-32, scaled down. Registered with open_clip by `register_clip_configs`.
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "cm3leon-clip-tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "cm3leon-clip-small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
}

_NETWORK_PROBE_HOST = ("huggingface.co", 443)

# open_clip precisions and the dtype images enter the model in (open_clip's ``get_input_dtype``): "fp16" and "bf16"
# keep some weights (a ViT's class and position embeddings, layer norms) in float32, so the input's dtype cannot be
# read off the first parameter.
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "pure_fp16": torch.float16,
    "pure_bf16": torch.bfloat16,
}


class ClipWeightsUnavailableError(RuntimeError):
    """The requested CLIP weights are neither a local file nor in the download cache, and cannot be downloaded."""


def register_clip_configs() -> None:
    """Make the names in :data:`CLIP_CONFIGS` known to ``open_clip.create_model`` and ``open_clip.get_tokenizer``.

    open_clip's public ``add_model_config`` only reads JSON files; the registry it fills is the module dict
    ``open_clip.factory._MODEL_CONFIGS`` (present in every open_clip release since 2.0), so we add ours there.
    Idempotent.
    """
    registry = open_clip.factory._MODEL_CONFIGS
    for name, cfg in CLIP_CONFIGS.items():
        registry.setdefault(name, deepcopy(cfg))


register_clip_configs()


def _in_hf_cache(hf_hub: str, cache_dir: str | None) -> bool:
    """Whether the open_clip ``hf_hub`` entry ``org/repo/[filename]`` is already in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hf_hub)  # "org/repo/" means open_clip's default file name
    filename = filename or HF_WEIGHTS_NAME
    # open_clip.pretrained.download_pretrained_from_hf fetches a safetensors alternative first: for the default
    # "open_clip_pytorch_model.bin" that is "open_clip_model.safetensors", for other .bin/.pth files the same stem.
    if filename == HF_WEIGHTS_NAME:
        names = [HF_SAFE_WEIGHTS_NAME, filename]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    else:
        names = [filename]
    for name in names:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return True
    return False


def _offline() -> bool:
    """True when Hugging Face downloads are disabled or the hub host does not resolve/connect within 3 seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection(_NETWORK_PROBE_HOST, timeout=3.0):
            return False
    except OSError:
        return True


def _weights_help(model_name: str) -> str:
    return (
        f"Pass a local checkpoint instead: ClipEncoder(model_name={model_name!r}, pretrained='/path/to/weights."
        "safetensors') (on the command line: --clip-weights of cm3leon prepare, --clip-pretrained of generate and "
        "serve); open_clip .bin/.pt/.safetensors state dicts and files "
        "written by ClipModule.export_weights are accepted. To fetch the weights once, run "
        f"open_clip.create_model({model_name!r}, pretrained=<tag>) on a machine with network and copy the "
        "Hugging Face cache (~/.cache/huggingface) or the downloaded file here (a file of a QuickGELU tag such as "
        "'openai' needs the '-quickgelu' architecture, e.g. 'ViT-B-32-quickgelu'), or train a CLIP on your own data "
        "with ClipModule (configs/clip/)."
    )


def _unreadable(e: BaseException) -> bool:
    """Whether loading a weights file failed because the file cannot be read at all (truncated, corrupt, or not a
    state dict), rather than because its tensors do not fit the architecture."""
    if isinstance(e, SafetensorError | pickle.UnpicklingError | EOFError):
        return True
    return isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)  # torch.load of a broken zip archive


def _unreadable_error(path: str, e: BaseException) -> ValueError:
    return ValueError(
        f"the CLIP weights file {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); it may be truncated "
        "(an interrupted copy or download), corrupt, or not a state dict: copy it again, or pass another file"
    )


def clip_tag(model_name: str, pretrained: str, cache_dir: str | None = None) -> dict[str, Any]:
    """open_clip's config of the pretrained tag ``pretrained`` of ``model_name``, once its weights are known to be
    had: in the Hugging Face cache, or the hub reachable (without this check open_clip retries a download for ~50 s
    before failing). What :func:`create_clip` checks before it builds a model; ``cm3leon serve`` checks it at start.

    Raises:
        ValueError: ``pretrained`` is not a tag of ``model_name`` (callers take an existing file first).
        ClipWeightsUnavailableError: its weights are not cached and the hub cannot be reached.
    """
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing file nor a pretrained tag of {model_name!r} "
            f"(tags: {tags}). " + _weights_help(model_name)
        )
    hf_hub = tag_cfg.get("hf_hub", "")
    if not (bool(hf_hub) and _in_hf_cache(hf_hub, cache_dir)) and _offline():
        raise ClipWeightsUnavailableError(
            f"CLIP weights {model_name!r}/{pretrained!r} are not in the local cache and the hub cannot be reached "
            "(no network or HF_HUB_OFFLINE=1). " + _weights_help(model_name)
        )
    return tag_cfg


def create_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> torch.nn.Module:
    """Build an open_clip CLIP model, failing fast with a clear message when pretrained weights cannot be had.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``), one of :data:`CLIP_CONFIGS`, or ``"local-dir:/path"``.
        pretrained: an open_clip pretrained tag (``"openai"``), a path to a local checkpoint file, or ``None`` for
            random initialisation (only useful before training with ``ClipModule``). A tag brings its own image
            preprocessing (``model.visual.preprocess_cfg``); a file gets the architecture's defaults, or the
            preprocessing and QuickGELU that ``ClipModule.export_weights`` recorded in its metadata.
        device: torch device.
        precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"pure_fp16"``, ``"pure_bf16"``).
        cache_dir: download cache directory passed to open_clip.

    Returns:
        The open_clip model (``open_clip.CLIP`` or subclass), in train mode as open_clip returns it.

    Raises:
        ClipWeightsUnavailableError: ``pretrained`` is a tag whose weights are not cached and there is no network, or
            whose cached file cannot be read.
        ValueError: unknown model name or ``precision``, ``pretrained`` is neither a known tag nor an existing file,
            the file cannot be read (truncated or corrupt; the file named), or the file's weights or recorded
            preprocessing (invalid, or another image size) do not fit ``model_name``.
    """
    register_clip_configs()
    if precision not in PRECISIONS:  # open_clip builds any other string in float32, silently
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not model_name.startswith(("local-dir:", "hf-hub:")) and open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"model_name={model_name!r} is not an open_clip architecture; known: {sorted(open_clip.list_models())}"
        )
    kwargs: dict[str, Any] = {}
    recorded_pp, recorded_quick = None, None
    if pretrained is not None and os.path.isfile(pretrained):
        try:
            recorded_quick = file_metadata(pretrained).get("quick_gelu")  # a header read: a broken file fails here
        except SafetensorError as e:
            raise _unreadable_error(pretrained, e) from e
        if recorded_quick == "true":
            kwargs["force_quick_gelu"] = True
        # A file exported after fine-tuning from a tag records the tag's preprocessing (e.g. mean/std 0.5 or
        # "squash"); open_clip would give a file the architecture's defaults. The size is checked, not forced.
        recorded_pp = recorded_preprocess(pretrained)
        if recorded_pp:
            kwargs["force_preprocess_cfg"] = {k: v for k, v in recorded_pp.items() if k != "size"}
    if pretrained is not None and not os.path.isfile(pretrained):
        tag_cfg = clip_tag(model_name, pretrained, cache_dir)
        if tag_cfg.get("quick_gelu", False):
            kwargs["force_quick_gelu"] = True  # e.g. OpenAI's weights were trained with QuickGELU
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir, **kwargs
        )
    except (RuntimeError, AssertionError, KeyError, SafetensorError, pickle.UnpicklingError, EOFError) as e:
        is_file = pretrained is not None and os.path.isfile(pretrained)
        if is_file and _unreadable(e):
            raise _unreadable_error(pretrained, e) from e
        if _unreadable(e):  # a tag's file in the download cache, e.g. left truncated by an interrupted download
            raise ClipWeightsUnavailableError(
                f"the cached CLIP weights {model_name!r}/{pretrained!r} cannot be read ({type(e).__name__}: "
                f"{str(e)[:300]}); delete them from the Hugging Face cache ({cache_dir or '~/.cache/huggingface'}) "
                "to download them again. " + _weights_help(model_name)
            ) from e
        if "download" in str(e).lower():
            raise ClipWeightsUnavailableError(f"{e}. " + _weights_help(model_name)) from e
        if is_file:  # open_clip's load_state_dict / resize asserts
            raise ValueError(
                f"the CLIP weights in {pretrained} do not fit the architecture {model_name!r} ({type(e).__name__}: "
                f"{str(e)[:300]}); name the architecture they were trained as (--clip-model of cm3leon prepare, "
                "--clip of generate and serve, model_name in Python)"
            ) from e
        raise
    if recorded_pp and "size" in recorded_pp:
        have, want = size_hw(model.visual.preprocess_cfg["size"]), size_hw(recorded_pp["size"])
        if have != want:  # open_clip resizes a ViT's position embedding to fit, silently: refuse instead
            raise ValueError(
                f"the CLIP weights in {pretrained} were trained at image size {want[0]}x{want[1]} (their metadata "
                f"'preprocess_cfg'), but the architecture {model_name!r} takes {have[0]}x{have[1]}; name the "
                "architecture they were trained as (--clip-model of cm3leon prepare, --clip of generate and serve, "
                "model_name in Python)"
            )
    if recorded_quick == "false" and uses_quick_gelu(model):  # e.g. "ViT-B-32-quickgelu" given GELU-trained weights
        set_quick_gelu(model, False)  # open_clip can only force QuickGELU on; the file says the weights ran without it
    if pretrained is None and not model_name.startswith("local-dir:"):
        warnings.warn(f"CLIP {model_name!r} is randomly initialised (pretrained=None)", stacklevel=2)
    return model
