"""How the fused kernels are launched: programmatic dependent launch only on sm_90+ CUDA devices, switchable off."""

import pytest
import torch

pytest.importorskip("triton")

from cm3leon_lightning.model import fused  # noqa: E402


def test_pdl_only_on_capable_cuda_devices_and_off_with_the_environment(monkeypatch):
    monkeypatch.delenv(fused.PDL_ENV, raising=False)
    assert fused.launch_options(torch.device("cpu")) == {}  # CPU (the interpreter): plain launches
    monkeypatch.setattr(fused, "_pdl_capable", lambda index: index == 0)  # GPU 0 an H100, GPU 1 an A100
    assert fused.launch_options(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert fused.launch_options(torch.device("cuda", 1)) == {}
    monkeypatch.setenv(fused.PDL_ENV, "0")
    assert fused.launch_options(torch.device("cuda", 0)) == {}
