"""Decoding (paper section 3.1): sampling rules, CFG / CD-K guidance, KV-cached decode loops, CLIP re-ranking.

This package imports no Lightning, except :mod:`~cm3leon_lightning.generation.predict` (``cm3leon predict``'s data
module and prediction writer), which this ``__init__`` does not import.
"""

from cm3leon_lightning.generation.decoder import Decoder, SamplingSpec, decode_step, process_logits
from cm3leon_lightning.generation.generate import (
    GenerationSettings,
    ImageGeneration,
    edit_image,
    generate_image,
    generate_text,
)
from cm3leon_lightning.generation.infilling import InfillResult, infill, infill_batch
from cm3leon_lightning.generation.rerank import RerankResult, clip_scores, rerank
from cm3leon_lightning.generation.sampling import (
    apply_temperature,
    cdk_logits,
    cfg_logits,
    dual_cfg_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Decoder",
    "GenerationSettings",
    "ImageGeneration",
    "InfillResult",
    "RerankResult",
    "SamplingSpec",
    "apply_temperature",
    "cdk_logits",
    "cfg_logits",
    "clip_scores",
    "decode_step",
    "dual_cfg_logits",
    "edit_image",
    "generate_image",
    "generate_text",
    "infill",
    "infill_batch",
    "process_logits",
    "rerank",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
