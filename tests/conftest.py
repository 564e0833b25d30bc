"""Shared pytest set-up: keeps tests on CPU, quiet and reproducible. (This file also puts tests/ on sys.path,
so ``support`` is importable.)"""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster than two fighting over 2 cores (and pytest-xdist runs 2 processes).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_once_per_process_warnings() -> None:
    """The "tokenizer cannot be checked" warning is given once per process and source: each test starts afresh, so one
    that expects it does not depend on which tests its pytest-xdist worker ran before (a CI run failed that way)."""
    from cm3leon_lightning.tokenization import vocab

    vocab._WARNED.clear()


# The longest test files (minutes of one core between them), collected first: pytest-xdist hands out whole files in
# collection order (`make test` passes --no-loadscope-reorder: xdist's own reordering, by number of tests, put the
# single 200 s Triton-interpreter test last), so a long file that came up last would leave one worker alone.
LONGEST_FIRST = (
    "model/test_fused_interpreter.py",
    "test_benchmarks.py",
    "test_demo.py",
    "test_export_memory_benchmark.py",
    "serve/test_serve_http.py",
    "generation/test_predict.py",
)


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Move the files of :data:`LONGEST_FIRST` to the front, in that order; the rest keep theirs."""
    root = os.path.dirname(os.path.abspath(__file__))

    def rank(item) -> int:  # noqa: ANN001
        rel = os.path.relpath(str(item.path), root).replace(os.sep, "/")
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each rank is unchanged
