"""Tokenization: the unified vocabulary, the BPE text tokenizer and (separately) the VQGAN image tokenizer."""

from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment, special_tokens

__all__ = ["MultimodalVocab", "Segment", "TextTokenizer", "special_tokens"]
