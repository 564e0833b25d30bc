"""Retrieval augmentation (paper section 2.1): CLIP document encoder, faiss memory bank, selection rules.

Names are imported lazily so that ``retrieval.select`` (numpy only) can be used without loading torch or faiss.
"""

from __future__ import annotations

from cm3leon_lightning._lazy import lazy_exports

_EXPORTS = {
    "CLIP_CONFIGS": "clip_loading",
    "ClipEncoder": "encoder",
    "ClipWeightsUnavailableError": "clip_loading",
    "MemoryBank": "index",
    "SearchResult": "index",
    "Neighbor": "select",
    "SelectionConfig": "select",
    "select_neighbors": "select",
    "query_dropout": "select",
    "drop_caption_tokens": "select",
    "query_rng": "select",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
