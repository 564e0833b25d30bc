"""The examples that need no finished demo run (those that do are in test_demo.py) run as a user runs them; every
example refuses bad arguments and an unfinished run in one line, before it writes anything."""

from __future__ import annotations

import ast
import csv
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import cm3leon_lightning

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


def test_examples_import_the_public_names_from_the_package() -> None:
    """The README imports from ``cm3leon_lightning``; so do the examples, for every name it exports."""
    for script in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cm3leon_lightning."):
                public = [a.name for a in node.names if a.name in cm3leon_lightning.__all__]
                assert not public, f"{script.name}: import {public} from cm3leon_lightning, not {node.module}"


BAD_ARGUMENTS = [
    ("demo_decoding_sweep.py", ["--top-p", "0.6", "0"], "argument --top-p: expected a number in (0, 1], got '0'"),
    ("demo_decoding_sweep.py", ["--top-p", "nan"], "argument --top-p: expected a number in (0, 1], got 'nan'"),
    ("demo_decoding_sweep.py", ["--cfg", "nan"], "argument --cfg: expected a finite number, got 'nan'"),
    ("demo_decoding_sweep.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("serve_shapes.py", ["--requests", "0"], "argument --requests: expected an integer >= 1, got '0'"),
    ("serve_shapes.py", ["--max-batch-size", "0"], "argument --max-batch-size: expected an integer >= 1, got '0'"),
    ("serve_shapes.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    ("sft_shapes.py", ["--pairs", "0"], "argument --pairs: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--eval", "0"], "argument --eval: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    ("sft_shapes.py", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    ("sft_shapes.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    ("sft_shapes.py", ["--image-first", "1.5"], "argument --image-first: expected a number in [0, 1], got 1.5"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_ARGUMENTS)
def test_examples_refuse_bad_arguments_before_any_work(
    script: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checked before the run is read (here it does not exist) and before anything is written: the numbers would
    otherwise fail, or be used, after minutes of export, fitting or decoding."""
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    out = ["--out", str(tmp_path / "out")] if script != "demo_decoding_sweep.py" else []
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), *out, *args])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["demo_decoding_sweep.py", "serve_shapes.py", "sft_shapes.py"])
def test_examples_name_an_unfinished_run_in_one_line(
    script: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    out = ["--out", str(tmp_path / "out")] if script != "demo_decoding_sweep.py" else []
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), *out])
    marker = tmp_path / "run" / "tokenizer" / "stage.json"
    expected = f": error: run: {marker} not found: run `make demo` (or `cm3leon demo --out {tmp_path / 'run'}`) first"
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(expected)
    assert sorted(tmp_path.iterdir()) == []
