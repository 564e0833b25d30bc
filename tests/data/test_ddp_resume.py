"""Mid-epoch resume under real two-process DDP (gloo on the CPU): each rank goes on from its own saved position.

Lightning writes rank zero's checkpoint only; before the data position held every rank's, rank 1 resumed from rank
zero's worker cursors and read samples twice (torchtitan-style: resumed run == uninterrupted run, per rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
from support.ddp_scripts import run_ddp_script


def test_each_rank_resumes_mid_epoch_to_its_uninterrupted_batches(tmp_path: Path) -> None:
    assert torch.distributed.is_available()
    result = run_ddp_script("ddp_resume_run.py", tmp_path)
    assert result == {"rank0": True, "rank1": True, "differ": True}
