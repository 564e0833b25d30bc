"""CM3Leon weights in Hugging Face ``transformers``' OPT layout (``OPTForCausalLM``), and back.

CM3Leon's transformer (paper section 2.3) is OPT's (metaseq's) without biases and without the LayerNorms'
parameters. OPT's config switches both off (``enable_bias``, ``layer_norm_elementwise_affine``), so
``transformers.OPTForCausalLM`` computes CM3Leon's logits from the same weights, and tools built on it (the Hub,
quantization, servers) take the model as it is. Only the weights move; what makes CM3Leon decode images (the image
code constraint, classifier-free guidance, CD-K) stays in :mod:`cm3leon_lightning.generation`.

Names (ours -> OPT's):

=====================================  ================================================================
``wte.weight``                         ``model.decoder.embed_tokens.weight``
``wpe.weight`` ``(P, C)``              ``model.decoder.embed_positions.weight`` ``(P + 2, C)``: OPT adds 2 to
                                       every position id; rows 0 and 1 stay zero (a padding token's position
                                       -1 reads row 1 and is never attended to)
``blocks.i.attn.qkv.weight`` ``(3C, C)``  ``model.decoder.layers.i.self_attn.{q,k,v}_proj.weight`` ``(C, C)`` each
``blocks.i.attn.out_proj.weight``      ``model.decoder.layers.i.self_attn.out_proj.weight``
``blocks.i.mlp.fc_in.weight``          ``model.decoder.layers.i.fc1.weight``
``blocks.i.mlp.fc_out.weight``         ``model.decoder.layers.i.fc2.weight``
``lm_head.weight``                     ``lm_head.weight`` (written only when not tied)
=====================================  ================================================================

SwiGLU (no OPT counterpart) and a LayerNorm epsilon other than OPT's fixed 1e-5 are refused. ``config.json`` keeps
CM3Leon's own architecture and vocabulary under ``"cm3leon"``, so the directory reads back (``cm3leon generate
--ckpt``, ``init_from``) exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HF_FORMAT = "cm3leon_lightning.hf_opt"
HF_FORMAT_VERSION = 1
POSITION_OFFSET = 2
"""OPT's learned position embedding reads row ``position + 2``."""
OPT_EPS = 1e-5
_PREFIX = "model.decoder."

_PER_LAYER = {"attn.out_proj.weight": "self_attn.out_proj.weight", "mlp.fc_in.weight": "fc1.weight",
              "mlp.fc_out.weight": "fc2.weight"}  # fmt: skip


def check_convertible(config: dict[str, Any]) -> None:
    """Raise ValueError when an architecture has no exact OPT counterpart (SwiGLU, another LayerNorm epsilon)."""
    where = "Hugging Face OPT layout (export --format hf)"
    if config.get("activation") not in ("gelu", "relu"):
        raise ValueError(f"{where}: OPT has no {config.get('activation')!r} MLP; only gelu and relu models convert")
    if config.get("layer_norm_eps") != OPT_EPS:
        raise ValueError(f"{where}: OPT's LayerNorm epsilon is {OPT_EPS}, the model's {config.get('layer_norm_eps')}")


def opt_config(config: dict[str, Any], vocab: dict[str, int], dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of ``OPTForCausalLM`` for a CM3Leon architecture, with ours under ``"cm3leon"``.

    Args:
        config: ``CM3LeonConfig.to_dict()``.
        vocab: ``MultimodalVocab.to_dict()``.
        dtype: the weights' dtype name (``float32``, ``bfloat16``, ``float16``).
        extra: more fields of the ``"cm3leon"`` block (``created_by``, ``source``).
    """
    from cm3leon_lightning.tokenization.vocab import EOS_ID, PAD_ID

    check_convertible(config)
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["d_model"],
        "word_embed_proj_dim": config["d_model"],
        "num_hidden_layers": config["n_layer"],
        "num_attention_heads": config["n_head"],
        "ffn_dim": config["d_ff"],
        "max_position_embeddings": config["max_seq_len"],
        "activation_function": config["activation"],
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": config["init_std"],
        "tie_word_embeddings": bool(config["tie_embeddings"]),
        "use_cache": True,
        "pad_token_id": PAD_ID,
        "bos_token_id": EOS_ID,  # every document starts with <eos> (DESIGN section 3)
        "eos_token_id": EOS_ID,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4.x reads
        "cm3leon": {
            "format": HF_FORMAT,
            "format_version": HF_FORMAT_VERSION,
            "config": dict(config),
            "vocab": dict(vocab),
            **extra,
        },  # fmt: skip
    }


def to_opt(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Our state dict (``CM3Leon.state_dict()`` keys) -> OPT's names and shapes (table in the module docstring).

    Each of our tensors maps on its own (:func:`opt_tensors`), so a part of the state dict converts to the matching
    part of OPT's: ``cm3leon export`` converts a large model a few tensors at a time.
    """
    check_convertible(config)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        out.update(opt_tensors(name, tensor, config))
    return out


def opt_tensors(name: str, tensor: Tensor, config: dict[str, Any]) -> dict[str, Tensor]:
    """OPT's tensors for our tensor ``name`` (three for a fused ``qkv``, none for a tied ``lm_head.weight``).

    Raises:
        ValueError: a name CM3Leon's network does not have.
    """
    if name == "wte.weight":
        return {_PREFIX + "embed_tokens.weight": tensor.contiguous()}
    if name == "wpe.weight":
        return {
            _PREFIX + "embed_positions.weight": torch.cat([tensor.new_zeros(POSITION_OFFSET, tensor.shape[1]), tensor])
        }
    if name == "lm_head.weight":
        return {} if config["tie_embeddings"] else {name: tensor.contiguous()}
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        theirs = f"{_PREFIX}layers.{parts[1]}."
        if parts[2] == "attn.qkv.weight":
            q, k, v = tensor.split(config["d_model"], dim=0)
            return {f"{theirs}self_attn.{p}_proj.weight": t.contiguous() for p, t in zip("qkv", (q, k, v))}
        if parts[2] in _PER_LAYER:
            return {theirs + _PER_LAYER[parts[2]]: tensor.contiguous()}
    raise ValueError(f"Hugging Face OPT layout: CM3Leon has no tensor {name!r}")


def from_opt(state: dict[str, Tensor], config: dict[str, Any], what: str = "path") -> dict[str, Tensor]:
    """OPT's names -> our state dict (the tied LM head, when tied, is left to ``load_weights``).

    Tensors the mapping does not take (a layer beyond ``config["n_layer"]``, an ``lm_head.weight`` beside a tied
    embedding) are passed on under their own names, so :func:`~cm3leon_lightning.model.weights.fit_state` refuses
    them as unexpected (or compares the tied pair) instead of their being dropped in silence.

    Raises:
        ValueError: a tensor the mapping needs is missing, the query, key and value projections of a layer differ
            in shape, the position embedding has fewer than OPT's 2 offset rows, or ``config`` lacks ``n_layer``
            (int) or ``tie_embeddings`` (bool) (named with ``what``). Other shapes are checked against the network
            by :func:`~cm3leon_lightning.model.weights.fit_state`.
    """
    for key, kind, noun in (("n_layer", int, "an int"), ("tie_embeddings", bool, "a bool")):
        value = config.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = f"lacks the field {key!r}" if key not in config else f"has {key!r} = {value!r}, not {noun}"
            raise ValueError(f"{what}: the model config ('cm3leon.config' of the config.json beside the weights) {got}")
    used: set[str] = set()

    def get(name: str) -> Tensor:
        if name not in state:
            raise ValueError(f"{what}: the OPT weights lack {name!r}")
        used.add(name)
        return state[name]

    positions = get(_PREFIX + "embed_positions.weight")
    if positions.ndim != 2 or positions.shape[0] < POSITION_OFFSET:
        raise ValueError(
            f"{what}: {_PREFIX}embed_positions.weight has shape {tuple(positions.shape)}; OPT's is (positions + "
            f"{POSITION_OFFSET}, hidden_size)"
        )
    out = {"wte.weight": get(_PREFIX + "embed_tokens.weight"), "wpe.weight": positions[POSITION_OFFSET:]}
    for i in range(config["n_layer"]):
        ours, theirs = f"blocks.{i}.", f"{_PREFIX}layers.{i}."
        names = [f"{theirs}self_attn.{p}_proj.weight" for p in "qkv"]
        qkv = [get(name) for name in names]
        if len({tuple(t.shape) for t in qkv}) != 1 or qkv[0].ndim != 2:
            shapes = {name: tuple(t.shape) for name, t in zip(names, qkv)}
            raise ValueError(f"{what}: the query, key and value projections must be matrices of one shape: {shapes}")
        out[ours + "attn.qkv.weight"] = torch.cat(qkv, dim=0)
        out.update({ours + key: get(theirs + name) for key, name in _PER_LAYER.items()})
    if not config["tie_embeddings"]:
        out["lm_head.weight"] = get("lm_head.weight")
    out.update({k: v for k, v in state.items() if k not in used})
    return out
