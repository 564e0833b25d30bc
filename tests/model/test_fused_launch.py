"""How the fused kernels are launched: programmatic dependent launch only when asked for, on sm_90+ CUDA devices;
the linear kernel's tuning configurations, their pruning, and the split kernels' counters."""

import inspect

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
    tiles; split-K with 2, 4 and 8 splits; every configuration is timed by the shortened benchmark and pruned by
    shape."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    assert all("PREFETCH" not in c.kwargs for c in fk.CONFIGS)
    assert len(fk.CONFIGS) == 12 and {c.kwargs.get("SPLIT_K", 1) for c in fk.CONFIGS} == {1, 2, 4, 8}
    prefetching = [c for c in fk.PDL_CONFIGS if c.kwargs.get("PREFETCH")]
    assert len(fk.PDL_CONFIGS) == len(fk.CONFIGS) + len(prefetching) == 21
    assert {c.kwargs["BLOCK_K"] for c in prefetching} == {128}
    # the split-K workspace covers the largest configuration, whatever the width: 8 splits of 32-column blocks of
    # 40 columns need 8 x 64 x 16 floats, more than 8 splits of 16-column blocks (8 x 48 x 16)
    assert fk.workspace_size(40, 16, [c.kwargs for c in fk.PDL_CONFIGS]) == 8 * 64 * 16
    assert fk.workspace_size(1024, 32, [c.kwargs for c in fk.PDL_CONFIGS]) == 8 * 1024 * 32
    assert fk.workspace_size(40, 16, [{"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 3}]) == 3 * 64 * 16
    for kernel, configs in (
        (fk.tuned_decode_linear_kernel, fk.CONFIGS),
        (fk.tuned_pdl_decode_linear_kernel, fk.PDL_CONFIGS),
    ):
        assert kernel.configs == configs and kernel.do_bench is fk.quick_bench
        assert kernel.early_config_prune is fk.prune_configs
        if "cache_results" in inspect.signature(fk.triton.autotune).parameters:  # timings kept on disk
            assert kernel.cache_results or fk.triton.knobs.runtime.interpret


def splits(configs):
    return sorted({c.kwargs.get("SPLIT_K", 1) for c in configs})


def test_split_k_is_tried_only_where_every_split_gets_work_and_the_output_is_narrow(monkeypatch):
    from cm3leon_lightning.model import fused_linear_kernel as fk

    monkeypatch.setenv(fk.SPLITS_ENV, "1")

    # 350m: out-projection and down-projection (N = 1024), QKV, up-projection, the image-code head
    for n, k in ((1024, 1024), (1024, 4096), (3072, 1024), (4096, 1024), (8192, 1024)):
        assert fk.prune_configs(fk.CONFIGS, {"N": n, "K": k}) == fk.CONFIGS
    # K = 640 (five 128-wide tiles): 2 splits of 384 both work; 4 splits of 256 and 8 of 128 would leave some empty
    assert splits(fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 640})) == [1, 2]
    assert splits(fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 128})) == [1]  # one tile: nothing to split
    # the LM head over the text vocabulary: programs enough without, and the counters cover 1024 blocks
    assert fk.split_allowed(16384) and not fk.split_allowed(16385)
    assert splits(fk.prune_configs(fk.CONFIGS, {"N": 56000, "K": 1024})) == [1]
    assert len(fk.prune_configs(fk.CONFIGS, {"N": 56000, "K": 1024})) == len(fk.UNSPLIT_CONFIGS)


def test_fixed_split_tiles_for_a_wide_output_are_refused(monkeypatch):
    """Split-K tiles forced on an output wider than the counters cover: a clear error, not a silent overflow."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    monkeypatch.setattr(fused, "FIXED_TILES", {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2})
    wide = 16 * fk.SPLIT_MAX_BLOCKS + 16
    with pytest.raises(ValueError, match="split-K tiles .* for 16400 output columns"):
        fused.decode_linear(torch.zeros(2, 32), torch.zeros(wide, 32))


def test_split_counters_are_allocated_once_per_device_and_bounded():
    """Captured CUDA graphs keep the counters' address: the buffer is never replaced; asking for more than it holds
    is a clear error."""
    cpu = torch.device("cpu")
    first = fused.split_counters(cpu)
    assert fused.split_counters(cpu, 5000) is first and first.numel() == fused.COUNTERS and not first.any()
    with pytest.raises(ValueError, match="split counters hold 65536, 65537 asked for"):
        fused.split_counters(cpu, fused.COUNTERS + 1)


def test_split_kernels_are_defaults_only_when_asked_for(monkeypatch):
    """Until a GPU run has checked the split kernels natively, the autotuner and the attention do without them unless
    CM3LEON_FUSED_SPLITS=1; asking explicitly works regardless."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    monkeypatch.delenv(fk.SPLITS_ENV, raising=False)
    assert fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 4096}) == fk.UNSPLIT_CONFIGS
    assert fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 4096}, with_splits=True) == fk.CONFIGS
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132})
    )
    assert fused.attention_splits(32, torch.device("cuda", 0)) == 1
    monkeypatch.setenv(fk.SPLITS_ENV, "1")
    assert fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 4096}) == fk.CONFIGS
    # one image with CFG at 350m: 2 rows x 16 heads -> 8 runs each; 8 candidates: 256 pairs fill the GPU alone
    assert [fused.attention_splits(p, torch.device("cuda", 0)) for p in (32, 64, 256)] == [8, 4, 1]
    assert fused.attention_splits(32, torch.device("cpu")) == 1
