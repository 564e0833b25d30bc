"""Architecture configuration of the CM3Leon transformer and its presets (paper section 2.3 and table 3).

The paper (table 3) fixes the number of layers and ``d_model`` of the three published sizes and says nothing about the
number of heads, the FFN width, the activation or embedding tying. Those were chosen here so that the total parameter
count, *counted the paper's (metaseq's) way*, matches the nominal size within 1%. The metaseq way is the number of
unique trainable parameters: a tied input/output embedding counted once, the learned position embeddings included.
:meth:`CM3LeonConfig.num_parameters` gives that count analytically, and the tests check it against a model built on
the meta device.

The three paper-sized presets use the default multimodal vocabulary: 56320 text ids + 8192 image codes = 64512 rows,
already a multiple of 128 (``MultimodalVocab.padded_size``), and a context of 4096 tokens.

======  =======  =======  =====  ========  ============  =====  ===========================================
preset  n_layer  d_model  heads  head dim  d_ff          tied   parameters (metaseq count)
======  =======  =======  =====  ========  ============  =====  ===========================================
tiny    2        64       4      16        256           yes    0.15M (vocab 512, context 256)
350m    24       1024     16     64        3584 (3.5 d)  yes    347.1M (-0.8% of 350M)
760m    24       1536     16     96        5888 (3.83 d) yes    766.0M (+0.8% of 760M)
7b      32       4096     32     128       16384 (4 d)   no     6987.7M (-0.2% of 7B)
======  =======  =======  =====  ========  ============  =====  ===========================================

All use GELU. The comments on :data:`PRESETS` give the per-preset reasoning (why each FFN width and tying).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Activation = Literal["gelu", "relu", "swiglu"]
ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "swiglu")
INIT_ONLY_FIELDS: tuple[str, ...] = ("init_std", "pos_init_std")
"""Fields that only set the random initialisation: weights loaded from a file make them moot, so a checkpoint that
differs from a module only in these has the same architecture (``check_same_architecture``)."""


@dataclass
class CM3LeonConfig:
    """Architecture of a decoder-only CM3Leon transformer (paper section 2.3).

    Only primitives, so the config can be saved as hyper-parameters and loaded with ``torch.load(weights_only=True)``.
    The defaults are the ``350m`` preset. Invalid values raise ``ValueError`` at construction.
    """

    vocab_size: int = 64512
    """Rows of the token embedding and LM head: the padded model vocabulary (``MultimodalVocab.padded_size``)."""
    n_layer: int = 24
    """Number of transformer blocks."""
    n_head: int = 16
    """Number of attention heads; must divide ``d_model``."""
    d_model: int = 1024
    """Width of the residual stream (embedding size)."""
    d_ff: int = 3584
    """Hidden width of the MLP (for ``swiglu``, the width of each of the gate and up projections)."""
    max_seq_len: int = 4096
    """Context length: rows of the learned absolute position embedding (paper: 4096)."""
    activation: Activation = "gelu"
    """MLP non-linearity: ``gelu`` (exact), ``relu`` or ``swiglu`` (gated, three projections)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    init_std: float = 0.006
    """Standard deviation of the truncated normal (cut at +-3 std) used for every weight but the position embedding."""
    pos_init_std: float = 0.0002
    """Standard deviation of the normal initialization of the learned position embedding."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the parameter-free LayerNorms."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the field and the allowed range."""
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CM3LeonConfig.{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"CM3LeonConfig.d_model ({self.d_model}) must be divisible by CM3LeonConfig.n_head ({self.n_head})"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CM3LeonConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"CM3LeonConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        for name, zero_ok in (("init_std", False), ("pos_init_std", True), ("layer_norm_eps", False)):
            value = getattr(self, name)
            # A string (YAML 1.1 reads ``1e-5`` as one) or an infinity would fail later, or init every weight to nan.
            real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (real and (value >= 0 if zero_ok else value > 0)):
                bound = ">= 0" if zero_ok else "> 0"
                raise ValueError(f"CM3LeonConfig.{name} must be a finite number {bound}, got {value!r}")

    # ------------------------------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``d_model // n_head``."""
        return self.d_model // self.n_head

    def num_parameters(self) -> int:
        """Unique trainable parameters, counted the paper's (metaseq's) way.

        Token embedding (``vocab_size * d_model``, counted once when tied), position embedding
        (``max_seq_len * d_model``), per block ``4 d^2`` for attention plus ``2 d d_ff`` (``3 d d_ff`` for swiglu) for
        the MLP, and the untied LM head. No biases and no LayerNorm parameters exist.
        """
        d = self.d_model
        mlp = (3 if self.activation == "swiglu" else 2) * d * self.d_ff
        blocks = self.n_layer * (4 * d * d + mlp)
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.max_seq_len * d + blocks

    def forward_flops(self, seq_len: int) -> int:
        """Matrix-multiply FLOPs of one forward pass over one sequence of ``seq_len`` tokens, logits at every position.

        Per token, 2 FLOPs per weight of the blocks and the LM head (the embedding lookups cost none); per layer,
        ``4 T^2 d`` for the attention scores and their weighted sum, counted in full as PaLM's MFU does (a causal
        kernel skips about half). A training step costs 3x this (the backward pass twice the forward; activation
        checkpointing's recomputation is not counted). Equal to ``torch.utils.flop_counter.FlopCounterMode`` with
        SDPA's math backend (tested). ``CM3LeonModule`` reports it as ``flops_per_batch``, which Lightning's
        ``ThroughputMonitor`` turns into FLOP/s and MFU.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        d = self.d_model
        mlp = (3 if self.activation == "swiglu" else 2) * d * self.d_ff
        per_token = 2 * (self.n_layer * (4 * d * d + mlp) + self.vocab_size * d)
        return seq_len * per_token + self.n_layer * 4 * seq_len * seq_len * d

    # ------------------------------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of primitives (for ``save_hyperparameters`` and YAML)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CM3LeonConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CM3LeonConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CM3LeonConfig:
        """A preset from :data:`PRESETS` (``tiny``, ``350m``, ``760m``, ``7b``) with fields overridden.

        Example:
            >>> CM3LeonConfig.from_preset("tiny", vocab_size=1024).vocab_size
            1024
        """
        if name not in PRESETS:
            raise ValueError(f"unknown CM3LeonConfig preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the demo: a forward takes milliseconds on a CPU. Override vocab_size with the real
    # MultimodalVocab.padded_size when the tokenizers are known.
    "tiny": dict(
        vocab_size=512,
        n_layer=2,
        n_head=4,
        d_model=64,
        d_ff=256,
        max_seq_len=256,
        activation="gelu",
        tie_embeddings=True,
    ),
    # Table 3: 24 layers, d_model 1024. Heads of width 64 (16 heads, as OPT-350M). With OPT's 4 d FFN the total would
    # be 372.2M (+6.3%): the 64512-row embedding (66M) is larger than OPT's 50k one. An FFN of 3.5 d (3584) with tied
    # embeddings gives 347.1M (-0.8%).
    "350m": dict(
        vocab_size=64512,
        n_layer=24,
        n_head=16,
        d_model=1024,
        d_ff=3584,
        max_seq_len=4096,
        activation="gelu",
        tie_embeddings=True,
    ),
    # Table 3: 24 layers, d_model 1536. 16 heads of width 96 (a multiple of 32, so it tiles on tensor cores and
    # flash attention). A 4 d FFN would give 784.9M (+3.3%); d_ff 5888 (3.83 d, a multiple of 256) with tied
    # embeddings gives 766.0M (+0.8%), the closest multiple of 256.
    "760m": dict(
        vocab_size=64512,
        n_layer=24,
        n_head=16,
        d_model=1536,
        d_ff=5888,
        max_seq_len=4096,
        activation="gelu",
        tie_embeddings=True,
    ),
    # Table 3: 32 layers, d_model 4096. The common 7B shape (OPT-6.7B, LLaMA-7B): 32 heads of width 128 and a
    # 4 d FFN. Tied embeddings would give 6723.6M (-3.9%); an untied LM head gives 6987.7M (-0.2%).
    "7b": dict(
        vocab_size=64512,
        n_layer=32,
        n_head=32,
        d_model=4096,
        d_ff=16384,
        max_seq_len=4096,
        activation="gelu",
        tie_embeddings=False,
    ),
}
"""Named architecture presets for :meth:`CM3LeonConfig.from_preset`; the module docstring gives the reasoning."""
