"""Runs test_fused_decode.py, test_persistent_decode.py and tests/generation/test_sampling_kernel.py in one subprocess
under Triton's interpreter, so the fused Triton kernels are checked on a machine without a GPU (the interpreter must
be on before Triton is first imported, which this process has done)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_fused_decode.py runs the kernels natively")
def test_fused_decode_tests_pass_under_the_triton_interpreter():
    here = Path(__file__).with_name("test_fused_decode.py")
    sampling = here.parents[1] / "generation" / "test_sampling_kernel.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    files = [str(here), str(here.with_name("test_persistent_decode.py")), str(sampling)]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=here.parents[2])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\b99 passed, 4 skipped", summary), summary
