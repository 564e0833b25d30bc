"""The VQGAN image tokenizer (Esser et al. 2021), with the taming-transformers parameter layout.

An image of ``resolution x resolution`` becomes a grid of ``(resolution / f) ** 2`` codes, ``f = 2 ** (len(ch_mult) -
1)``. CM3Leon (paper section 2.1) uses Make-A-Scene's tokenizer: 256x256 -> 32x32 codes from 8192; its weights are not
public, so the presets follow the public checkpoints of the same family:

- ``f8_8192``: taming ``vqgan_gumbel_f8``, 256 -> 32x32 from 8192 codes, Gumbel quantizer (the paper's shape).
- ``f16_16384``: taming ``vqgan_imagenet_f16_16384``, 256 -> 16x16 from 16384 codes.
- ``chameleon``: Chameleon's ``vqgan.ckpt``, 512 -> 32x32 from 8192 codes.
- ``tiny`` (demo): 32 -> 8x8 from 64 codes; ``micro`` (unit tests): 16 -> 8x8 from 32 codes.

Images go in as ``(B, C, H, W)``: uint8 in ``[0, 255]`` or float in ``[-1, 1]``. Images come out as float in
``[-1, 1]`` (:func:`to_uint8` converts). Codes are ``(B, h * w)`` long, row-major over the grid.
Loading and saving live in :mod:`cm3leon_lightning.tokenization.vqgan_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cm3leon_lightning.tokenization.quantize import GumbelQuantizer, QuantizerOutput, VectorQuantizer
from cm3leon_lightning.tokenization.vqgan_config import (  # noqa: F401  (re-exported)
    OVERRIDABLE_FIELDS,
    PRESETS,
    VQGANConfig,
    config_from_overrides,
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice with a residual; ``nin_shortcut`` (1x1 conv) when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        """Residual block."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        """Residual attention."""
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, as taming
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right and bottom), as taming."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        """Halve the resolution."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        """Double the resolution."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    """Image ``(B, in_channels, R, R)`` -> latents ``(B, z_channels, R/f, R/f)``."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        res, block_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _middle(block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)  # taming's double_z=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode."""
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``(B, z_channels, R/f, R/f)`` -> image ``(B, out_ch, R, R)`` (unbounded; ~[-1, 1] once trained)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _middle(block_in, cfg.dropout)
        up: list[nn.Module] = [nn.Module() for _ in range(n)]  # up[i] is level i, built from the lowest resolution
        for i in reversed(range(n)):
            level = up[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], cfg.dropout))
                block_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (clamped, rounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder with taming-transformers' parameter names.

    Args:
        config: the architecture (see :data:`PRESETS`).
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize: VectorQuantizer | GumbelQuantizer
        if config.quantizer == "gumbel":
            # taming builds GumbelQuantize(z_channels, ...) but feeds it quant_conv's embed_dim channels; the two are
            # equal in every published checkpoint, and embed_dim is the size that actually arrives.
            self.quantize = GumbelQuantizer(
                config.embed_dim, config.embed_dim, config.n_embed, config.gumbel_kl_weight, config.gumbel_temperature
            )
        else:
            self.quantize = VectorQuantizer(
                config.n_embed,
                config.embed_dim,
                config.beta,
                config.l2_normalize,
                config.ema_decay,
                config.dead_code_after,
                config.legacy_beta,
            )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQGAN:
        """A randomly initialised VQGAN of a preset."""
        return cls(VQGANConfig.from_name(name, **overrides))

    @property
    def n_embed(self) -> int:
        """Number of codes."""
        return self.config.n_embed

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``images`` and bring them to float ``[-1, 1]`` on the model's device and dtype.

        Args:
            images: ``(B, C, H, W)``, uint8 in ``[0, 255]`` or floating point in ``[-1, 1]``; ``H = W = resolution``.

        Raises:
            ValueError: wrong rank, channel count, size, dtype or value range.
        """
        cfg = self.config
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        if images.shape[1] != cfg.in_channels:
            raise ValueError(f"images must have {cfg.in_channels} channels (B, C, H, W), got {images.shape[1]}")
        if tuple(images.shape[2:]) != (cfg.resolution, cfg.resolution):
            raise ValueError(
                f"images must be {cfg.resolution}x{cfg.resolution} for this VQGAN, got "
                f"{images.shape[2]}x{images.shape[3]} (resize and centre-crop first, e.g. with ImageDataModule)"
            )
        param = self.conv_dtype_device()
        if images.dtype == torch.uint8:  # scaled in (at least) float32, then cast: what the float path gives
            wide = torch.promote_types(param[0], torch.float32)
            return (images.to(device=param[1], dtype=wide) / 127.5 - 1.0).to(param[0])
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
        if images.device.type != "meta" and images.numel():
            if not bool(torch.isfinite(images).all()):
                raise ValueError("images contain NaN or infinite values (float images must be finite and in [-1, 1])")
            lo, hi = images.min().item(), images.max().item()
            if lo < -1.001 or hi > 1.001:
                raise ValueError(
                    f"float images must lie in [-1, 1], got values in [{lo:.3f}, {hi:.3f}] (pass uint8 for 0..255)"
                )
        return images.to(device=param[1], dtype=param[0])

    def conv_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The dtype and device of the encoder's first conv."""
        w = self.encoder.conv_in.weight
        return w.dtype, w.device

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, C, R, R)`` in [-1, 1] -> pre-quantization latents ``(B, embed_dim, h, w)``."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``(B, embed_dim, h, w)`` -> images ``(B, out_ch, R, R)``, unclamped."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training pass: images -> (reconstruction, unclamped float; quantizer output with losses and codes)."""
        q = self.quantize(self.encode_latent(self.preprocess(images)))
        return self.decode_latent(q.z_q), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> codes.

        Args:
            images: ``(B, C, R, R)``, uint8 in ``[0, 255]`` or float in ``[-1, 1]``.

        Returns:
            Codes ``(B, grid_h * grid_w)``, long, row-major. Deterministic in eval mode (call ``.eval()``): in training
            mode a Gumbel quantizer samples, and an EMA quantizer updates its codebook and dead-code counters as a
            training forward does.
        """
        q = self.quantize(self.encode_latent(self.preprocess(images)))
        return q.codes.flatten(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> images.

        Args:
            codes: ``(B, grid_h * grid_w)`` or ``(B, grid_h, grid_w)`` integer codes in ``[0, n_embed)``.

        Returns:
            Images ``(B, out_ch, R, R)``, float in ``[-1, 1]`` (clamped); :func:`to_uint8` converts.
        """
        gh, gw = self.config.grid_size
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim == 2 and codes.shape[1] == gh * gw:
            codes = codes.view(-1, gh, gw)
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (gh, gw):
            raise ValueError(f"codes must have shape (B, {gh * gw}) or (B, {gh}, {gw}), got {tuple(codes.shape)}")
        if codes.device.type != "meta" and codes.numel():
            lo, hi = codes.min().item(), codes.max().item()
            if lo < 0 or hi >= self.n_embed:
                raise ValueError(f"codes must lie in [0, {self.n_embed}), got values in [{lo}, {hi}]")
        z_q = self.quantize.lookup(codes.to(self.conv_dtype_device()[1]).long())
        return self.decode_latent(z_q.to(self.conv_dtype_device()[0])).clamp(-1, 1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        preset: str | VQGANConfig | None = None,
        config_path: str | Path | None = None,
        trust_pickle: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> VQGAN:
        """Load weights; see :func:`cm3leon_lightning.tokenization.vqgan_io.load_vqgan` for the formats.

        Raises:
            FileNotFoundError, ValueError: as ``load_vqgan``; a ValueError saying what ``path`` is instead when it is
                another kind of file this package writes (a CM3Leon checkpoint or model directory, a CLIP model, ...).
        """
        from cm3leon_lightning.tokenization.vqgan_io import load_vqgan

        try:
            return load_vqgan(path, preset, config_path, trust_pickle, map_location)
        except (FileNotFoundError, ValueError) as e:
            other = _not_a_vqgan(path)
            if other is None:
                raise
            raise ValueError(other) from e

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; returns the directory.

        Raises:
            FileExistsError: ``directory`` already holds one of the two files and ``overwrite`` is false.
        """
        from cm3leon_lightning.tokenization.vqgan_io import save_vqgan

        return save_vqgan(self, directory, overwrite)


def _not_a_vqgan(path: str | Path) -> str | None:
    """Why ``path``, which did not load as a VQGAN, is none, when ``cm3leon info`` knows it as another kind of file
    (``"PATH is a CM3Leon model checkpoint, not a VQGAN: ..."``, with how to use it); None when it does not."""
    from cm3leon_lightning.info import describe
    from cm3leon_lightning.model.pretrained import VQGAN_DIR

    try:
        info = describe(path)
    except Exception:  # noqa: BLE001 - nothing it knows: the loader's own error stands
        return None
    kind = info["kind"]
    vqgan = "give the VQGAN the model was trained with (a VQGAN directory, or a VQGANModule checkpoint)"
    if kind in ("lightning checkpoint", "sharded checkpoint") and "architecture" in info:
        what, use = "a CM3Leon model checkpoint", f"it is what --ckpt takes (cm3leon generate, serve, export); {vqgan}"
    elif kind.startswith("model directory") or info.get("part_of", "").startswith("model directory"):
        whole = kind.startswith("model directory")
        model = Path(path) if whole else Path(path).parent
        what = "a CM3Leon model directory" if whole else f"the weights of the CM3Leon model directory {model}"
        bundled = model / VQGAN_DIR
        use = (
            f"its VQGAN is {bundled}" if bundled.is_dir() else f"it is what --ckpt takes (it bundles no VQGAN); {vqgan}"
        )
    elif kind in ("CLIP model", "lightning checkpoint (ClipModule)"):
        name = info.get("model_name") or info.get("clip_model")
        what = f"a CLIP model ({name})" if name else "a CLIP model"
        use = "it is the retriever's weights (--clip-pretrained, ClipEncoder(model_name, pretrained=PATH))"
    elif kind in ("memory bank", "prepared dataset", "dataset shard", "text tokenizer") or kind.startswith("prepare "):
        what, use = f"a {kind}", vqgan
    else:
        return None
    return f"{path} is {what}, not a VQGAN: {use}"
