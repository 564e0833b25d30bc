"""Run a real two-process DDP script (``tests/support/ddp_*_run.py``) in a subprocess and read its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SUPPORT = Path(__file__).resolve().parent


def run_ddp_script(name: str, out: Path, timeout: int = 400) -> Any:
    """Run ``tests/support/<name>`` with ``out`` as its argument and working directory (one thread per process) and
    return the JSON of its last line of output; a non-zero exit fails with the end of its output (a hang: timeout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SUPPORT / name), str(out)], cwd=out, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
