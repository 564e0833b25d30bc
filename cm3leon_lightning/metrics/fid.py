"""FID helpers around torchmetrics' ``FrechetInceptionDistance`` (paper section 3.2, table 1: zero-shot MS-COCO FID).

The paper cites pytorch-fid (Seitzer 2020) for FID. torchmetrics' default extractor is torch-fidelity's
``inception-v3-compat``: the same TF-Inception weights (``pt_inception-2015-12-05``), fed uint8 images that it
resizes to 299x299 itself with TF1-compatible bilinear interpolation, 2048-d pool features. torchmetrics >= 1.8
resizes with antialiased PyTorch bilinear by default instead (other features, another FID); :func:`make_fid` asks
for the TF1-compatible resize (``antialias=False``), so the features are torch-fidelity's own.

Resize rule (FID figures depend on it): every image, real or generated, is first brought to ``image_size`` x
``image_size`` (256 for MS-COCO 30K) by :func:`fid_resize`: shorter side resized to ``image_size`` with PIL bicubic,
then the centre square cropped; generated images that already have that size are used unchanged. The extractor
then does its own resize to 299. Images go to the metric as uint8 ``(N, 3, H, W)``.

Weights: Inception weights come from torch-fidelity's usual download (cached under ``$TORCH_HOME``), from a local
file (``feature_weights_path``, e.g. ``weights-inception-2015-12-05-6726825d.pth``), or any ``nn.Module`` that maps
uint8 ``(N, 3, H, W)`` to ``(N, d)`` features replaces Inception (tests use a tiny one).

Reference statistics (the real images' feature sums) are cached on disk per reference set and extractor
(:func:`reference_cache_path`), so a 30K reference set is embedded once.

Devices: the metric keeps float64 sums (torchmetrics casts the features to float64), which Apple's MPS cannot hold,
so on MPS the metric stays on the CPU (:func:`fid_device`); on CPU and CUDA it runs where the model does.
"""

from __future__ import annotations

import hashlib
import inspect
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from cm3leon_lightning.files import replaced_whole

INCEPTION_DIMS = (64, 192, 768, 2048)
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def fid_resize(image: Image.Image | bytes | np.ndarray | Tensor, image_size: int) -> Tensor:
    """One image -> uint8 ``(3, image_size, image_size)``: shorter side to ``image_size`` (PIL bicubic), centre crop.

    Args:
        image: a PIL image, encoded bytes (jpg/png), an ``(H, W, 3)`` uint8 array, or a ``(3, H, W)`` uint8 tensor.
        image_size: the side length (256 for the MS-COCO 30K protocol).

    Raises:
        ValueError: ``image_size`` < 1, or a tensor / array image that is not uint8 with 3 channels (the message
            gives its shape). PIL images and encoded files are converted to RGB as ``cm3leon prepare`` converts
            training images (``data.cleaning.to_rgb``: transparent pixels white, 16-bit grey scaled to 8 bits).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.shape[1] == image.shape[2] == image_size:
            return image.contiguous()
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an array image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    from cm3leon_lightning.data.cleaning import to_rgb

    image = to_rgb(image)  # as training images are converted: transparent pixels white, 16-bit grey scaled
    w, h = image.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_uint8_images(images: Tensor) -> Tensor:
    """Float images in ``[-1, 1]`` (as ``VQGAN.decode`` returns them) -> uint8 ``[0, 255]``; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_fid(
    feature_extractor: nn.Module | None = None,
    feature_weights_path: str | Path | None = None,
    feature_dim: int = 2048,
    input_size: int = 299,
) -> FrechetInceptionDistance:
    """A ``FrechetInceptionDistance`` whose real statistics survive ``reset()`` (they are computed once).

    Args:
        feature_extractor: any module mapping uint8 ``(N, 3, H, W)`` to ``(N, d)``; replaces Inception.
        feature_weights_path: a local torch-fidelity Inception weights file (no download).
        feature_dim: Inception feature layer (64, 192, 768 or 2048; FID uses 2048).
        input_size: image size used to probe a custom extractor for its feature size.

    Raises:
        FileNotFoundError: ``feature_weights_path`` does not exist.
        ValueError: ``feature_dim`` is not an Inception layer.
        RuntimeError: the Inception weights could neither be loaded nor downloaded (the message says what to pass),
            or ``feature_weights_path`` does not hold them (the message names it).

    On Apple MPS keep the metric on the CPU (:func:`fid_device`): its float64 sums cannot move there.
    """
    if feature_extractor is not None:
        return FrechetInceptionDistance(
            feature=feature_extractor, reset_real_features=False, input_img_size=(3, input_size, input_size)
        )
    if feature_dim not in INCEPTION_DIMS:
        raise ValueError(f"feature_dim must be one of {INCEPTION_DIMS}, got {feature_dim}")
    if feature_weights_path is not None and not Path(feature_weights_path).is_file():
        raise FileNotFoundError(f"feature_weights_path: no Inception weights file at {feature_weights_path}")
    # torchmetrics >= 1.8 resizes to 299 with antialiased PyTorch bilinear unless told not to: ask for torch-fidelity's
    # TF1-compatible resize (older versions know no other and take no such argument)
    resize = {"antialias": False} if "antialias" in inspect.signature(FrechetInceptionDistance).parameters else {}
    try:
        return FrechetInceptionDistance(
            feature=feature_dim,
            reset_real_features=False,
            feature_extractor_weights_path=None if feature_weights_path is None else str(feature_weights_path),
            **resize,
        )
    except ModuleNotFoundError as err:  # torchmetrics' Inception needs torch-fidelity: not a weights problem
        raise RuntimeError(
            f"FID with the Inception features needs the torch-fidelity package ({err}); install it "
            "(pip install torch-fidelity) or pass feature_extractor=<nn.Module returning (N, d) features>"
        ) from err
    except Exception as err:  # download errors come as URLError, OSError, HTTPError, RuntimeError...
        if feature_weights_path is not None:  # the file was given: it is the problem, not the network
            raise RuntimeError(
                f"feature_weights_path: {feature_weights_path} is not torch-fidelity's Inception weights file "
                f"(weights-inception-2015-12-05-6726825d.pth): {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            ) from err
        raise RuntimeError(
            "FID: could not load the Inception weights "
            f"({type(err).__name__}: {err}). Without network access, download torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth elsewhere and pass feature_weights_path=<file>, "
            "or pass feature_extractor=<nn.Module returning (N, d) features>"
        ) from err


def fid_device(device: torch.device | str) -> torch.device:
    """Where an FID metric for a model on ``device`` runs: the CPU for Apple MPS, which has no float64 for the
    metric's feature sums (``metric.to("mps")`` fails), else ``device`` itself (CPU and CUDA numerics unchanged)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def extractor_fingerprint(metric: FrechetInceptionDistance) -> str:
    """sha256 of the feature extractor's class, weights, feature size (Inception gives 64 to 2048 features from one
    set of weights) and, for torchmetrics' Inception, its resize (antialiased or TF1-compatible): reference
    statistics are only valid for them."""
    h = hashlib.sha256(f"{type(metric.inception).__qualname__}|{metric.real_features_sum.shape[0]}".encode())
    if hasattr(metric.inception, "use_antialias"):  # statistics of the other resize are other statistics
        h.update(f"|antialias={bool(metric.inception.use_antialias)}".encode())
    for name, tensor in sorted(metric.inception.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_cache_path(cache_dir: str | Path, reference_id: str, metric: FrechetInceptionDistance) -> Path:
    """``cache_dir/fid-ref-<hash>.pt``, the hash covering the reference set's id and the extractor's weights."""
    key = hashlib.sha256(f"{reference_id}|{extractor_fingerprint(metric)}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"fid-ref-{key}.pt"


def real_stats(metric: FrechetInceptionDistance) -> dict[str, Tensor]:
    """The metric's current real-image statistics (sums, so they add across ranks), as CPU tensors."""
    return {name: getattr(metric, name).detach().cpu().clone() for name in _REAL_STATES}


def save_real_stats(path: str | Path, stats: dict[str, Tensor]) -> Path:
    """Write real statistics with ``torch.save`` (tensors only: loads with ``weights_only=True``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(path) as tmp:  # per process: two jobs writing one key never clash
        torch.save({k: v.cpu() for k, v in stats.items()}, tmp)
    return path


def load_real_stats(path: str | Path, metric: FrechetInceptionDistance, holds_totals: bool = True) -> None:
    """Put cached real statistics into ``metric``.

    Args:
        path: a file written by :func:`save_real_stats`.
        metric: the FID metric (its feature size must match).
        holds_totals: True on exactly one rank (rank zero). The states are sums that torchmetrics adds across ranks
            when it syncs, so the other ranks must hold zeros or the reference set would count world_size times.

    Raises:
        ValueError: the file's feature size differs from the metric's.
    """
    stats = torch.load(path, map_location="cpu", weights_only=True)
    have = metric.real_features_sum.shape
    if tuple(stats["real_features_sum"].shape) != tuple(have):
        raise ValueError(f"{path}: cached features have shape {tuple(stats['real_features_sum'].shape)}, not {have}")
    for name in _REAL_STATES:
        current = getattr(metric, name)
        value = stats[name].to(device=current.device, dtype=current.dtype)
        setattr(metric, name, value if holds_totals else torch.zeros_like(value))


def load_cached_real_stats(path: str | Path, metric: FrechetInceptionDistance, count: int) -> str | None:
    """Put the cached real statistics of ``count`` reference images into ``metric`` (rank zero's totals).

    Returns:
        None when loaded; else why not (the file unreadable, of another image count, non-finite), the metric left
        as it was, so the caller warns and recomputes.
    """
    before = real_stats(metric)
    try:
        load_real_stats(path, metric)
        have = int(metric.real_features_num_samples)
        if have != count:
            raise ValueError(f"it holds {have} images, the reference set {count}")
        if not all(torch.isfinite(v).all() for v in real_stats(metric).values()):
            raise ValueError("it holds non-finite values")
    except Exception as err:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, UnpicklingError, KeyError...
        for name, value in before.items():
            setattr(metric, name, value.to(metric.device))
        return f"{type(err).__name__}: {err}"
    return None
