"""Shared pytest set-up: keeps tests on CPU, quiet and reproducible. (This file also puts tests/ on sys.path,
so ``support`` is importable.)"""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster than two fighting over 2 cores (and pytest-xdist runs 2 processes).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
