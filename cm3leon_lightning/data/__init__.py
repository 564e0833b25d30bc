"""Data: the shard format, the streaming pipeline stages and CM3LeonDataModule."""

from cm3leon_lightning.data.datamodule import CM3LeonDataModule, DataCountsLogger
from cm3leon_lightning.data.shards import Manifest, Neighbor, ShardFormatError, ShardSample, ShardWriter

__all__ = [
    "CM3LeonDataModule",
    "DataCountsLogger",
    "Manifest",
    "Neighbor",
    "ShardFormatError",
    "ShardSample",
    "ShardWriter",
]
