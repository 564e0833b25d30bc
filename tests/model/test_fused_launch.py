"""How the fused kernels are launched: programmatic dependent launch only on sm_90+ CUDA devices, switchable off."""

import pytest
import torch

pytest.importorskip("triton")

from cm3leon_lightning.model import fused  # noqa: E402


def test_pdl_only_when_asked_for_and_on_capable_cuda_devices(monkeypatch):
    monkeypatch.setattr(fused, "_pdl_capable", lambda index: index == 0)  # GPU 0 an H100, GPU 1 an A100
    monkeypatch.delenv(fused.PDL_ENV, raising=False)
    assert fused.launch_options(torch.device("cuda", 0)) == {}  # off by default (slower in its first measurement)
    monkeypatch.setenv(fused.PDL_ENV, "1")
    assert fused.launch_options(torch.device("cpu")) == {}  # CPU (the interpreter): plain launches
    assert fused.launch_options(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert fused.launch_options(torch.device("cuda", 1)) == {}
    monkeypatch.setenv(fused.PDL_ENV, "0")
    assert fused.launch_options(torch.device("cuda", 0)) == {}


def test_linear_kernel_tuning_configurations():
    """Prefetching the first weight tile is tried only with PDL (without it nothing overlaps) and only with 128-wide
    tiles; every configuration is timed by the shortened benchmark."""
    from cm3leon_lightning.model import fused_kernels as fk

    assert all("PREFETCH" not in c.kwargs for c in fk.CONFIGS)
    prefetching = [c for c in fk.PDL_CONFIGS if c.kwargs.get("PREFETCH")]
    assert len(fk.PDL_CONFIGS) == len(fk.CONFIGS) + len(prefetching) == 9
    assert {c.kwargs["BLOCK_K"] for c in prefetching} == {128}
    for kernel, configs in (
        (fk.tuned_decode_linear_kernel, fk.CONFIGS),
        (fk.tuned_pdl_decode_linear_kernel, fk.PDL_CONFIGS),
    ):
        assert kernel.configs == configs and kernel.do_bench is fk.quick_bench
