"""Evaluation metrics (paper sections 3.2 and 4.2): CIDEr-D, VQA accuracy, and FID helpers around torchmetrics."""

from cm3leon_lightning.metrics.cider import CIDErD, cider_d, simple_ptb_tokenize, tokenize_captions
from cm3leon_lightning.metrics.fid import fid_resize, make_fid
from cm3leon_lightning.metrics.vqa import VQAAccuracy, normalize_answer, vqa_accuracy

__all__ = [
    "CIDErD",
    "VQAAccuracy",
    "cider_d",
    "fid_resize",
    "make_fid",
    "normalize_answer",
    "simple_ptb_tokenize",
    "tokenize_captions",
    "vqa_accuracy",
]
