"""LightningModules: CM3Leon pretraining/SFT, and the tokenizer/retriever trainers."""

from cm3leon_lightning.modules.cm3leon import CM3LeonModule, WarmupDecay
from cm3leon_lightning.modules.vqgan import VQGANModule

__all__ = ["CM3LeonModule", "VQGANModule", "WarmupDecay"]
