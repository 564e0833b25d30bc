"""Evaluation and logging callbacks (paper sections 3.2 and 4.2): FID, CIDEr-D, VQA accuracy, sample grids; and a
``ModelCheckpoint`` that saves the steps a fit ends with (``LastStepCheckpoint``)."""

from cm3leon_lightning.callbacks.base import EvalSample, GenerationCallback, read_shard_samples
from cm3leon_lightning.callbacks.checkpoint import LastStepCheckpoint
from cm3leon_lightning.callbacks.cider import CIDErCallback
from cm3leon_lightning.callbacks.fid import FIDCallback
from cm3leon_lightning.callbacks.samples import SampleLoggerCallback, render_grid
from cm3leon_lightning.callbacks.threads import ThreadsWhenFree
from cm3leon_lightning.callbacks.vqa import VQACallback, read_vqa_file

__all__ = [
    "CIDErCallback",
    "EvalSample",
    "FIDCallback",
    "GenerationCallback",
    "LastStepCheckpoint",
    "SampleLoggerCallback",
    "ThreadsWhenFree",
    "VQACallback",
    "read_shard_samples",
    "read_vqa_file",
    "render_grid",
]
