"""Mid-epoch resume under real two-process DDP (gloo on the CPU): each rank goes on from its own saved position.

Lightning writes rank zero's checkpoint only; before the data position held every rank's, rank 1 resumed from rank
zero's worker cursors and read samples twice (torchtitan-style: resumed run == uninterrupted run, per rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "ddp_resume_run.py"


def test_each_rank_resumes_mid_epoch_to_its_uninterrupted_batches(tmp_path: Path) -> None:
    assert torch.distributed.is_available()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rank0": True, "rank1": True, "differ": True}
