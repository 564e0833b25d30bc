"""CLIP document encoder for the dense retriever (paper section 2.1, "Retrieval Augmentation").

The paper splits a multimodal document into its text and its image, encodes each with the frozen CLIP text and image
encoders (ViT-B-32), L2-normalises both, and averages them into one document vector. :class:`ClipEncoder` does that on
top of open_clip and L2-normalises the mean too (same direction; the memory bank's inner products are then cosines,
the scores the selection rules compare with 0.9). :data:`CLIP_CONFIGS` adds tiny open_clip architectures so tests and
the demo run offline in seconds, with weights trained by :class:`cm3leon_lightning.modules.clip.ClipModule`.
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from collections.abc import Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from safetensors import SafetensorError

from cm3leon_lightning.retrieval.clip_files import (  # noqa: F401  (uses_quick_gelu: re-exported)
    recorded_preprocess,
    size_hw,
    uses_quick_gelu,
    wants_quick_gelu,
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
    recorded_pp = None
    if pretrained is not None and os.path.isfile(pretrained):
        try:
            quick_gelu = wants_quick_gelu(pretrained)  # reads a safetensors header: the first sign of a broken file
        except SafetensorError as e:
            raise _unreadable_error(pretrained, e) from e
        if quick_gelu:
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
    if pretrained is None and not model_name.startswith("local-dir:"):
        warnings.warn(f"CLIP {model_name!r} is randomly initialised (pretrained=None)", stacklevel=2)
    return model


def _center_crop_or_pad(x: torch.Tensor, th: int, tw: int, fill: float) -> torch.Tensor:
    """torchvision ``CenterCrop`` / open_clip ``CenterCropOrPad`` on a ``(B, C, H, W)`` batch: pad to at least
    ``(th, tw)`` (left/top get the smaller half), then crop at offsets ``int(round((H - th) / 2))``."""
    h, w = x.shape[-2:]
    if th > h or tw > w:
        dh, dw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (dw // 2, (dw + 1) // 2, dh // 2, (dh + 1) // 2), value=fill)
        h, w = x.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[:, :, top : top + th, left : left + tw]


def preprocess_images(
    images: torch.Tensor,
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> torch.Tensor:
    """Resize (antialiased), center-crop or pad, and normalise a batch the way open_clip's eval transform does.

    The output geometry is exactly open_clip's ``image_transform(..., is_train=False)``: for ``"shortest"`` a
    square ``size`` resizes the shorter side to ``size`` and the longer one to ``int(size * long / short)``
    (torchvision ``Resize(int)``), then crops at ``int(round((H - size) / 2))`` (torchvision ``CenterCrop``);
    ``"squash"`` resizes to ``size`` ignoring the aspect ratio; ``"longest"`` fits the longer side and pads with
    ``fill_color``. Pixel values differ slightly from PIL's (PIL resamples in uint8).

    Args:
        images: ``(B, 3, H, W)`` uint8 in ``[0, 255]`` or floating point in ``[0, 1]``.
        size: the model's input resolution, ``S`` or ``(H, W)``.
        mean: per-channel mean of the normalisation.
        std: per-channel std of the normalisation.
        resize_mode: open_clip ``preprocess_cfg["resize_mode"]``: ``"shortest"``, ``"squash"`` or ``"longest"``.
        interpolation: open_clip ``preprocess_cfg["interpolation"]``: ``"bicubic"`` or ``"bilinear"`` (open_clip
            evaluates ``"random"`` as bicubic).
        fill_color: padding value in ``[0, 255]`` for ``"longest"``.

    Returns:
        ``(B, 3, H', W')`` float32, normalised, where ``(H', W')`` is ``size``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if resize_mode not in ("shortest", "squash", "longest"):
        raise ValueError(f"resize_mode must be 'shortest', 'squash' or 'longest', got {resize_mode!r}")
    th, tw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        nh, nw = th, tw
    elif resize_mode == "shortest" and th == tw:  # torchvision Resize(int): the long side is truncated, not rounded
        nh, nw = (th, int(th * w / h)) if h <= w else (int(th * h / w), th)
    else:  # open_clip ResizeKeepRatio: rounded; for a non-square "shortest" target it is always bicubic
        ratio = max(h / th, w / tw) if resize_mode == "longest" else min(h / th, w / tw)
        nh, nw = round(h / ratio), round(w / ratio)
        mode = mode if resize_mode == "longest" else "bicubic"
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
    x = _center_crop_or_pad(x, th, tw, fill_color / 255.0 if resize_mode == "longest" else 0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s  # (B, 3, th, tw)


ImageLike = Image.Image | np.ndarray | torch.Tensor


def _to_chw_float(img: ImageLike) -> torch.Tensor:
    """One image (PIL, HWC uint8 array, or CHW tensor) -> (3, H, W) float in [0, 1]; PIL images convert to RGB as
    ``cm3leon prepare`` converts them (transparent pixels white, 16-bit grey scaled)."""
    if isinstance(img, Image.Image):
        from cm3leon_lightning.data.cleaning import to_rgb  # lazy: the data package imports Lightning

        img = np.asarray(to_rgb(img))
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
        t = torch.from_numpy(np.array(img[:, :, :3])).permute(2, 0, 1)  # copy: PIL arrays are read-only
    else:
        t = img
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"image tensors must be (3, H, W), got {tuple(t.shape)}")
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def _check_unit_range(x: torch.Tensor, first: int) -> torch.Tensor:
    """``x`` (``(B, 3, H, W)``, images ``first``.. of a call) unchanged; floating point images must be in ``[0, 1]``.

    Values in ``[0, 255]`` or ``[-1, 1]`` would otherwise be clamped after resizing, or passed on as they are: embedded
    as a white or dark picture, silently. A slack of 1e-3 allows rounding.
    """
    if x.dtype == torch.uint8 or x.numel() == 0:
        return x
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    bad = torch.nonzero((lo < -1e-3) | (hi > 1 + 1e-3)).flatten()  # NaN passes: it embeds to NaN, not silently
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"images[{first + j}] is floating point with values in [{float(lo[j]):.4g}, {float(hi[j]):.4g}]; float "
            "images must be in [0, 1] (divide [0, 255] values by 255, map [-1, 1] ones with (x + 1) / 2) or be uint8"
        )
    return x


def _check_texts(texts: Sequence[str | None], allow_none: bool) -> None:
    """Refuse a caption that is not a ``str`` (a pandas NaN, a number, bytes), naming its index and type."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) and not (allow_none and t is None):
            hint = "; pass None for a document without text" if allow_none else ""
            raise ValueError(f"texts[{i}] has type {type(t).__name__} ({t!r:.40}), not str{hint}")


class ClipEncoder:
    """Frozen CLIP text and image encoders that embed captions, images and documents (paper section 2.1).

    Args:
        model_name: open_clip architecture; the paper uses ``"ViT-B-32"``. ``"cm3leon-clip-tiny"`` and
            ``"cm3leon-clip-small"`` are tiny offline architectures (see :data:`CLIP_CONFIGS`).
        pretrained: open_clip pretrained tag (``"openai"``: the original CLIP weights), a local checkpoint path
            (e.g. written by ``ClipModule.export_weights``), or ``None`` for random weights (tests only). A local
            copy of OpenAI's weights needs the QuickGELU architecture (``"ViT-B-32-quickgelu"``), as the ``openai``
            tag gets; files from ``export_weights`` record it, and the image preprocessing of the model they were
            trained as (e.g. a tag's mean/std or resize mode), and get both by themselves.
        device: torch device for the encoders.
        precision: open_clip precision string (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"pure_fp16"``, ``"pure_bf16"``);
            embeddings are normalised in float32 whatever it is.
        batch_size: inputs are embedded in chunks of this many.
        cache_dir: open_clip download cache.

    All ``embed_*`` methods return float32 numpy arrays of shape ``(N, dim)`` with unit L2 norm per row.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 256,
        cache_dir: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = create_clip(model_name, pretrained, self.device, precision, cache_dir).eval()
        self.model.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = self.model.visual.preprocess_cfg
        size = pp["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])
        # The rest of open_clip's eval transform (SigLIP-style models squash, some use bilinear resampling).
        self._resize = {
            "size": size if isinstance(size, int) else tuple(size),
            "resize_mode": pp.get("resize_mode", "shortest"),
            "interpolation": pp.get("interpolation", "bicubic"),
            "fill_color": pp.get("fill_color", 0),
        }
        self._dtype = PRECISIONS[precision]  # images enter in this dtype
        with torch.inference_mode():  # works for every open_clip text tower (CLIP, CustomTextCLIP, CoCa)
            self._dim = int(self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1])

    @property
    def dim(self) -> int:
        """The embedding dimension."""
        return self._dim

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, 3, H, W)`` -> the model's normalised input, with open_clip's eval transform of this model."""
        r = self._resize
        return preprocess_images(
            images, r["size"], self.mean, self.std, r["resize_mode"], r["interpolation"], r["fill_color"]
        )

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions with the frozen text encoder.

        Args:
            texts: N strings (tokenized and truncated to the model's context length by open_clip's tokenizer).

        Returns:
            ``(N, dim)`` float32, L2-normalised.

        Raises:
            ValueError: a single ``str``, or an item that is not a ``str`` (its index and type named).
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got a single str")
        _check_texts(texts, allow_none=False)
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            ids = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)  # (b, L)
            z = F.normalize(self.model.encode_text(ids).float(), dim=-1)  # (b, D); in bf16 norms were 1 +- 5e-3
            out.append(z.cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor | Sequence[ImageLike]) -> np.ndarray:
        """Embed images with the frozen image encoder.

        Args:
            images: a ``(N, 3, H, W)`` tensor (uint8 in [0, 255] or float in [0, 1]), or a sequence of PIL images,
                ``(H, W, 3)`` uint8 arrays or ``(3, H, W)`` tensors of any sizes (resized and center-cropped).

        Returns:
            ``(N, dim)`` float32, L2-normalised.

        Raises:
            ValueError: an image of the wrong shape, or a floating point image with values outside ``[0, 1]`` (its
                index named).
        """
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            if isinstance(chunk, torch.Tensor):
                x = self._preprocess(_check_unit_range(chunk.to(self.device), i))
            else:  # different sizes: preprocess one by one
                x = torch.cat(
                    [
                        self._preprocess(_check_unit_range(_to_chw_float(im)[None], i + j).to(self.device))
                        for j, im in enumerate(chunk)
                    ]
                )
            z = F.normalize(self.model.encode_image(x.to(self._dtype)).float(), dim=-1)  # (b, D)
            out.append(z.cpu().numpy())
        return np.concatenate(out)

    def embed_documents(
        self, texts: Sequence[str | None], images: torch.Tensor | Sequence[ImageLike | None]
    ) -> np.ndarray:
        """Embed documents: ``normalize(normalize(text) + normalize(image))`` (paper section 2.1).

        The paper averages the separately normalised text and image embeddings; averaging then renormalising is the
        same direction as the normalised sum. A document missing one modality (``None`` or empty caption, ``None``
        image) is embedded by the modality it has, so text-only and image-only documents live in the same space.

        Args:
            texts: N captions, ``None`` or ``""`` where a document has no text.
            images: N images (see :meth:`embed_images`), ``None`` where a document has no image.

        Returns:
            ``(N, dim)`` float32, L2-normalised.

        Raises:
            ValueError: lengths differ, a caption is neither a str nor ``None`` (e.g. a pandas NaN), or a document
                has neither text nor image (its index is named).
        """
        _check_texts(texts, allow_none=True)
        n = len(texts)
        if len(images) != n:
            raise ValueError(f"texts and images must have the same length, got {n} and {len(images)}")
        has_text = np.array([t is not None and t.strip() != "" for t in texts], dtype=bool)
        has_image = (
            np.ones(n, bool) if isinstance(images, torch.Tensor) else np.array([im is not None for im in images])
        )
        empty = np.flatnonzero(~has_text & ~has_image)
        if empty.size:
            raise ValueError(f"documents {empty[:10].tolist()} have neither text nor image")
        z = np.zeros((n, self.dim), np.float32)
        ti, ii = np.flatnonzero(has_text), np.flatnonzero(has_image)
        if ti.size:
            z[ti] += self.embed_texts([texts[i] for i in ti])
        if ii.size:
            z[ii] += self.embed_images(images if isinstance(images, torch.Tensor) else [images[i] for i in ii])
        return z / np.linalg.norm(z, axis=1, keepdims=True)
