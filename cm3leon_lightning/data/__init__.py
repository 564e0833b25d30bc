"""Data: the shard format, the streaming pipeline stages and CM3LeonDataModule.

Names are imported lazily, so that the parts without Lightning (``data.cleaning``, ``data.shards``, ``data.stages``)
load without it: ``ClipEncoder`` converts images with ``data.cleaning.to_rgb``.
"""

from __future__ import annotations

from cm3leon_lightning._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
