"""LightningModules: CM3Leon pretraining/SFT, and the tokenizer/retriever trainers."""

from cm3leon_lightning.modules.cm3leon import CM3LeonModule, WarmupDecay

__all__ = ["CM3LeonModule", "WarmupDecay"]
