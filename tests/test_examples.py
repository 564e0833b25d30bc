"""The examples that need no finished demo run (those that do are in test_demo.py) run as a user runs them."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_compose_callbacks_example(tmp_path: Path) -> None:
    """examples/compose_callbacks.py: a fit with FID, CIDEr, VQA and sample-logging callbacks wired by hand; every
    callback logs its number and the sample logger writes both grids."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the example works in a fresh temporary directory
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "compose_callbacks.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.startswith("val/"))
    values = {key: float(value) for key, value in lines.items()}
    assert sorted(values) == ["val/cider", "val/fid", "val/loss", "val/vqa_acc"]
    assert all(math.isfinite(v) for v in values.values())
    assert 0 < values["val/loss"] < math.log(512) + 1 and values["val/fid"] > 0
    assert 0 <= values["val/cider"] <= 10 and 0 <= values["val/vqa_acc"] <= 1
    grids = next(line for line in done.stdout.splitlines() if line.startswith("sample grids:")).split()[2:]
    assert grids == ["samples_image_to_text-step0000008.png", "samples_text_to_image-step0000008.png"]
    run_dir = Path(done.stdout.strip().splitlines()[-1].split(maxsplit=2)[-1])
    assert run_dir.is_relative_to(tmp_path) and all((run_dir / "samples" / g).stat().st_size > 0 for g in grids)
    with open(run_dir / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("val/fid")]
    assert len(logged) == 1 and math.isclose(float(logged[0]["val/fid"]), values["val/fid"], rel_tol=1e-3)
