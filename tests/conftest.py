"""Shared pytest set-up: keeps tests on CPU, quiet and reproducible. (This file also puts tests/ on sys.path,
so ``support`` is importable.)"""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
