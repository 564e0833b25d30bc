"""Training objectives that rewrite token sequences (pure numpy, no Lightning)."""

from cm3leon_lightning.objective.cm3 import cm3_infill, cm3_restore, find_segments

__all__ = ["cm3_infill", "cm3_restore", "find_segments"]
