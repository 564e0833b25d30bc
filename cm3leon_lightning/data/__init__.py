"""Data: the shard format, the streaming pipeline stages and CM3LeonDataModule.

Names are imported lazily, so that the parts without Lightning (``data.cleaning``, ``data.shards``, ``data.stages``)
load without it: ``ClipEncoder`` converts images with ``data.cleaning.to_rgb``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CM3LeonDataModule": "datamodule",
    "DataCountsLogger": "datamodule",
    "Manifest": "shards",
    "Neighbor": "shards",
    "ShardFormatError": "shards",
    "ShardSample": "shards",
    "ShardWriter": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily imported ones (for ``dir()`` and tab completion)."""
    return sorted({*globals(), *__all__})
