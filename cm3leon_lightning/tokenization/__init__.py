"""Tokenization: the unified vocabulary, the BPE text tokenizer and the VQGAN image tokenizer."""

from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment, special_tokens
from cm3leon_lightning.tokenization.vqgan import PRESETS as VQGAN_PRESETS
from cm3leon_lightning.tokenization.vqgan import VQGAN, VQGANConfig, to_uint8

__all__ = [
    "VQGAN",
    "VQGAN_PRESETS",
    "MultimodalVocab",
    "Segment",
    "TextTokenizer",
    "VQGANConfig",
    "special_tokens",
    "to_uint8",
]
