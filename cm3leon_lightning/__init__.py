"""cm3leon_lightning: PyTorch Lightning components for CM3Leon-style retrieval-augmented multimodal models.

The public names (DESIGN section 5) are loaded lazily, so ``import cm3leon_lightning.model`` stays free of Lightning
and of the heavy optional stacks (open_clip, faiss, webdataset)::

    from cm3leon_lightning import CM3Leon, CM3LeonConfig, CM3LeonModule, MultimodalVocab
"""

from __future__ import annotations

from cm3leon_lightning import distributed as _distributed
from cm3leon_lightning._lazy import lazy_exports

_distributed.register()  # a gloo process group left up at exit aborted spawned DDP workers (see the module)

__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CM3LeonConfig": "cm3leon_lightning.config",
    "CM3Leon": "cm3leon_lightning.model",
    "KVCache": "cm3leon_lightning.model",
    "param_groups": "cm3leon_lightning.model",
    "CM3LeonModule": "cm3leon_lightning.modules.cm3leon",
    "MultimodalVocab": "cm3leon_lightning.tokenization.vocab",
    "Segment": "cm3leon_lightning.tokenization.vocab",
    "TextTokenizer": "cm3leon_lightning.tokenization.text",
    "cm3_infill": "cm3leon_lightning.objective.cm3",
    "cm3_restore": "cm3leon_lightning.objective.cm3",
    "CM3LeonCLI": "cm3leon_lightning.cli",
    "VQGAN": "cm3leon_lightning.tokenization.vqgan",
    "VQGANConfig": "cm3leon_lightning.tokenization.vqgan",
    "VQGANModule": "cm3leon_lightning.modules.vqgan",
    "ImageDataModule": "cm3leon_lightning.data.images",
    "CM3LeonDataModule": "cm3leon_lightning.data.datamodule",
    "DataCountsLogger": "cm3leon_lightning.data.datamodule",
    "ShardWriter": "cm3leon_lightning.data.shards",
    "prepare": "cm3leon_lightning.data.prepare",
    "PrepareConfig": "cm3leon_lightning.data.prepare",
    "SFTSource": "cm3leon_lightning.data.sft",
    "generate_image": "cm3leon_lightning.generation.generate",
    "generate_text": "cm3leon_lightning.generation.generate",
    "infill": "cm3leon_lightning.generation.infilling",
    "infill_batch": "cm3leon_lightning.generation.infilling",
    "edit_image": "cm3leon_lightning.generation.generate",
    "rerank": "cm3leon_lightning.generation.rerank",
    "GenerationSettings": "cm3leon_lightning.generation.generate",
    "load_checkpoint": "cm3leon_lightning.generation.cli",
    "export_model": "cm3leon_lightning.export",
    "FIDCallback": "cm3leon_lightning.callbacks.fid",
    "CIDErCallback": "cm3leon_lightning.callbacks.cider",
    "VQACallback": "cm3leon_lightning.callbacks.vqa",
    "SampleLoggerCallback": "cm3leon_lightning.callbacks.samples",
    "CIDErD": "cm3leon_lightning.metrics.cider",
    "VQAAccuracy": "cm3leon_lightning.metrics.vqa",
    "ClipEncoder": "cm3leon_lightning.retrieval.encoder",
    "MemoryBank": "cm3leon_lightning.retrieval.index",
    "ClipModule": "cm3leon_lightning.modules.clip",
    "ImageCaptionDataModule": "cm3leon_lightning.data.pairs",
    "select_neighbors": "cm3leon_lightning.retrieval.select",
    "Manifest": "cm3leon_lightning.data.shards",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
