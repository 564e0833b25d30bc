"""``VQGANConfig``: the architecture of a VQGAN image tokenizer, its presets (:data:`PRESETS`) and the fields a
``VQGANModule`` may override (:func:`config_from_overrides`). The network itself is
:class:`cm3leon_lightning.tokenization.vqgan.VQGAN`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class VQGANConfig:
    """Architecture of a VQGAN (taming ``ddconfig`` + quantizer settings)."""

    resolution: int = 256
    """Image side length the network is built for (decides where attention sits); images must have this size."""
    in_channels: int = 3
    """Image channels in."""
    out_ch: int = 3
    """Image channels out."""
    ch: int = 128
    """Base channel count; multiplied by ``ch_mult`` per level. A multiple of 32 (GroupNorm with 32 groups)."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    """Channel multiplier per resolution level; the downsampling factor is ``2 ** (len(ch_mult) - 1)``."""
    num_res_blocks: int = 2
    """Residual blocks per level in the encoder (the decoder has one more)."""
    attn_resolutions: tuple[int, ...] = (32,)
    """Feature-map side lengths at which attention blocks follow the residual blocks (the middle always has one); each
    must be the side of a level, ``resolution // 2 ** i`` for ``i < len(ch_mult)`` (see :attr:`level_resolutions`)."""
    z_channels: int = 256
    """Channels of the encoder output / decoder input (any count: no GroupNorm sees them)."""
    embed_dim: int = 256
    """Code dimension (``quant_conv`` maps ``z_channels`` to it)."""
    n_embed: int = 8192
    """Number of codes."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    quantizer: Literal["vq", "gumbel"] = "vq"
    """``vq``: nearest neighbour (``quantize.embedding``); ``gumbel``: Gumbel-softmax (``quantize.proj/embed``)."""
    beta: float = 0.25
    """Commitment loss weight (vq)."""
    l2_normalize: bool = False
    """Cosine-similarity lookup with l2-normalised codes (vq)."""
    ema_decay: float | None = None
    """EMA codebook updates with this decay instead of gradients (vq); None = gradients."""
    dead_code_after: int = 0
    """Restart codes unused for this many training steps (vq); 0 = never."""
    legacy_beta: bool = False
    """Weight the codebook term by ``beta`` instead of the commitment term (vq; taming's ``legacy=True``)."""
    gumbel_kl_weight: float = 1e-8
    """KL-to-uniform weight (gumbel; taming's gumbel_f8 used 1e-8)."""
    gumbel_temperature: float = 1.0
    """Gumbel-softmax temperature while training (gumbel)."""

    def __post_init__(self) -> None:
        # resolution 16.0 failed only in decode, numpy numbers in save_pretrained's JSON: plain ints and floats here
        for name in (*_INT_FIELDS, "dead_code_after"):
            setattr(self, name, _int_value(getattr(self, name), name))
        for name in _FLOAT_FIELDS:
            if name != "ema_decay" or self.ema_decay is not None:
                setattr(self, name, _float_value(getattr(self, name), name))
        self.ch_mult = _int_tuple(self.ch_mult, "ch_mult")  # int(1.5) would build another network silently
        self.attn_resolutions = _int_tuple(self.attn_resolutions, "attn_resolutions")
        if self.quantizer not in ("vq", "gumbel"):
            raise ValueError(f"quantizer must be 'vq' or 'gumbel', got {self.quantizer!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(self.ch_mult)}")
        if self.ch < 32 or self.ch % 32:  # z_channels meets no GroupNorm: taming-layout VQ-f4/f8 models use 3 or 4
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups) and >= 32, got {self.ch}")
        for name in ("resolution", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "in_channels", "out_ch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta", "gumbel_kl_weight"):  # a negative weight turns the loss term into a reward
            if not (0.0 <= getattr(self, name) < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.dead_code_after < 0:
            raise ValueError(f"dead_code_after must be >= 0, got {self.dead_code_after}")
        if self.legacy_beta and (self.quantizer != "vq" or self.ema_decay is not None):
            raise ValueError(
                "legacy_beta moves beta to the codebook term of the vq quantizer trained by gradients; with "
                f"quantizer={self.quantizer!r} and ema_decay={self.ema_decay} there is no such term (taming's EMA "
                "quantizer weights the commitment by beta, as legacy_beta=False does)"
            )
        if not self.gumbel_temperature > 0 or not math.isfinite(self.gumbel_temperature):
            raise ValueError(f"gumbel_temperature must be a finite number > 0, got {self.gumbel_temperature}")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by the downsampling factor {self.downsample_factor} "
                f"(2 ** (len(ch_mult) - 1))"
            )
        self._check_attn_resolutions()

    def _check_attn_resolutions(self) -> None:
        """Refuse ``attn_resolutions`` that match no level (they would build no attention block); inside
        :func:`warn_unused_attn_resolutions` drop them with a warning instead."""
        levels = self.level_resolutions
        unused = [r for r in self.attn_resolutions if r not in levels]
        if not unused:
            return
        msg = (
            f"attn_resolutions {unused} match no level of this VQGAN: with resolution {self.resolution} and ch_mult "
            f"{list(self.ch_mult)} the levels have side lengths {list(levels)} (the middle blocks, at {levels[-1]}, "
            f"always have attention)"
        )
        source = _LOADED_FROM.get()
        if source is None:
            raise ValueError(f"{msg}; give values from that list, or [] for attention in the middle blocks only")
        warnings.warn(f"{source}: {msg}; they build no attention block and are dropped", UserWarning, stacklevel=3)
        self.attn_resolutions = tuple(r for r in self.attn_resolutions if r in levels)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side of each level, from the image side down: ``resolution // 2 ** i``."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    @property
    def downsample_factor(self) -> int:
        """Image side / grid side: ``2 ** (len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(grid_h, grid_w)`` of the code grid for a ``resolution x resolution`` image."""
        side = self.resolution // self.downsample_factor
        return side, side

    @property
    def num_tokens(self) -> int:
        """Codes per image, ``grid_h * grid_w``."""
        h, w = self.grid_size
        return h * w

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VQGANConfig:
        """Build from a dict (parsed JSON), naming ``source`` and the field on error.

        Raises:
            ValueError: ``d`` is not a dict, a field is unknown or of the wrong type, or the values are invalid.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: the VQGAN config must be an object of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown VQGAN config fields {unknown}; allowed: {sorted(names)}")
        for name, value in d.items():
            kind, check = _FIELD_CHECKS.get(name, ("", lambda v: True))  # a field without a check: the class checks
            if not check(value):
                raise ValueError(f"{source}: VQGAN config field {name!r} must be {kind}, got {value!r}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VQGANConfig:
        """A preset by name (see :data:`PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_LOADED_FROM: contextvars.ContextVar[str | None] = contextvars.ContextVar("_LOADED_FROM", default=None)


@contextlib.contextmanager
def warn_unused_attn_resolutions(source: str) -> Iterator[None]:
    """Within this context a :class:`VQGANConfig` whose ``attn_resolutions`` match no level warns, naming
    ``source``, and drops them (the network is the same: they built nothing) instead of raising.

    For configs read from files written elsewhere or earlier (taming / Chameleon yamls, saved configs, checkpoint
    hyper-parameters), which may list such values and must still load.
    """
    token = _LOADED_FROM.set(source)
    try:
        yield
    finally:
        _LOADED_FROM.reset(token)


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints; a float (``1.5``, even ``2.0``), a string or a bool raises naming ``name``."""
    try:
        items = tuple(values)
        out = tuple(operator.index(v) for v in items)
    except TypeError:
        raise ValueError(f"{name} must be a list of ints, got {values!r}") from None
    if any(isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be a list of ints, got {values!r}")
    return out


def _int_value(value: Any, name: str) -> int:
    """``value`` as an int; a float (even ``16.0``), a string or a bool raises naming ``name``."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def _float_value(value: Any, name: str) -> float:
    """``value`` (an int or float, numpy's included) as a float; a string or a bool raises naming ``name``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(map(_is_int, v))


_INT_FIELDS = ("resolution", "in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed")
_FLOAT_FIELDS = ("dropout", "beta", "ema_decay", "gumbel_kl_weight", "gumbel_temperature")
# What VQGANConfig.from_dict accepts per field (JSON has no tuples: lists stand for them).
_FIELD_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **dict.fromkeys((*_INT_FIELDS, "dead_code_after"), ("an int", _is_int)),
    **dict.fromkeys(tuple(f for f in _FLOAT_FIELDS if f != "ema_decay"), ("a number", _is_float)),
    "ema_decay": ("a number or null", lambda v: v is None or _is_float(v)),
    **dict.fromkeys(("l2_normalize", "legacy_beta"), ("true or false", lambda v: isinstance(v, bool))),
    **dict.fromkeys(("ch_mult", "attn_resolutions"), ("a list of ints", _is_ints)),
    "quantizer": ("a string", lambda v: isinstance(v, str)),
}


PRESETS: dict[str, VQGANConfig] = {
    # taming-transformers vqgan_gumbel_f8 (configs/model.yaml): the paper's shape, 256 -> 32x32 from 8192 codes.
    "f8_8192": VQGANConfig(
        resolution=256, ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, attn_resolutions=(32,), z_channels=256,
        embed_dim=256, n_embed=8192, quantizer="gumbel"
    ),
    # taming-transformers vqgan_imagenet_f16_16384.
    "f16_16384": VQGANConfig(
        resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
        embed_dim=256, n_embed=16384
    ),
    # Chameleon's tokenizer (data/tokenizer/vqgan.yaml, as remembered; from_pretrained reads the yaml when given):
    # 512 -> 32x32 from 8192 codes, no attention outside the middle blocks.
    "chameleon": VQGANConfig(
        resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(), z_channels=256,
        embed_dim=256, n_embed=8192
    ),
    "tiny": VQGANConfig(
        resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
        embed_dim=16, n_embed=64, dead_code_after=50
    ),
    "micro": VQGANConfig(
        resolution=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=32,
        embed_dim=8, n_embed=32, dead_code_after=20
    ),
}  # fmt: skip

OVERRIDABLE_FIELDS = (
    "resolution",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "z_channels",
    "embed_dim",
    "n_embed",
    "quantizer",
    "beta",
    "l2_normalize",
    "ema_decay",
    "dead_code_after",
    "legacy_beta",
    "gumbel_kl_weight",
    "gumbel_temperature",
)


def config_from_overrides(preset: str, overrides: Mapping[str, Any]) -> VQGANConfig:
    """The preset ``preset`` with the non-None entries of ``overrides`` named in :data:`OVERRIDABLE_FIELDS`.

    This is how ``VQGANModule``'s arguments, and so the ``hyper_parameters`` of its checkpoints, describe a VQGAN;
    other entries of ``overrides`` (learning rate, loss weights, ...) are ignored.
    """
    return VQGANConfig.from_name(
        preset, **{k: overrides[k] for k in OVERRIDABLE_FIELDS if overrides.get(k) is not None}
    )
