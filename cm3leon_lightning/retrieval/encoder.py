"""CLIP document encoder for the dense retriever (paper section 2.1, "Retrieval Augmentation").

The paper splits a multimodal document into its text and its image, encodes each with the frozen CLIP text and image
encoders (ViT-B-32), L2-normalises both, and averages them into one document vector. :class:`ClipEncoder` does that on
top of open_clip and L2-normalises the mean too (same direction; the memory bank's inner products are then cosines,
the scores the selection rules compare with 0.9). :data:`CLIP_CONFIGS` adds tiny open_clip architectures so tests and
the demo run offline in seconds, with weights trained by :class:`cm3leon_lightning.modules.clip.ClipModule`.
Building the open_clip model (those architectures, pretrained tags and weights files) is in
:mod:`cm3leon_lightning.retrieval.clip_loading`; its names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from cm3leon_lightning.retrieval.clip_files import (  # noqa: F401  (re-exported: imported here before the split)
    recorded_preprocess,
    size_hw,
    uses_quick_gelu,
    wants_quick_gelu,
)
from cm3leon_lightning.retrieval.clip_loading import (  # noqa: F401  (re-exported: the names' old home)
    CLIP_CONFIGS,
    PRECISIONS,
    ClipWeightsUnavailableError,
    clip_tag,
    create_clip,
    register_clip_configs,
)


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
    """One image (PIL, HWC uint8 array, or CHW tensor) -> (3, H, W) float in [0, 1]; PIL images and RGBA arrays
    convert to RGB as ``cm3leon prepare`` converts them (transparent pixels white, 16-bit grey scaled)."""
    if isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 4:  # alpha was dropped: hidden colour shown
        if img.dtype == np.uint8:  # what prepare's load_image does with such an array
            img = Image.fromarray(np.ascontiguousarray(img), "RGBA")
        else:  # float in [0, 1] (checked below): composite on white in float
            rgb, alpha = img[:, :, :3].astype(np.float32), img[:, :, 3:].astype(np.float32)
            img = rgb * alpha + (1.0 - alpha)
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
                ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` arrays (RGBA: transparent pixels white, as for PIL images)
                or ``(3, H, W)`` tensors of any sizes (resized and center-cropped).

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
