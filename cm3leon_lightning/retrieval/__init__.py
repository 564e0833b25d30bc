"""Retrieval augmentation (paper section 2.1): CLIP document encoder, faiss memory bank, selection rules.

Names are imported lazily so that ``retrieval.select`` (numpy only) can be used without loading torch or faiss.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLIP_CONFIGS": "encoder",
    "ClipEncoder": "encoder",
    "ClipWeightsUnavailableError": "encoder",
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily imported ones (for ``dir()`` and tab completion)."""
    return sorted({*globals(), *__all__})
