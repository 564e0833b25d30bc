"""How the fused kernels are launched: the launch options (environment, code, labels), programmatic dependent launch
only when asked for and on sm_90+ CUDA devices, the next weights' prefetch only on CUDA, the linear kernel's tuning
configurations per option, their pruning, and the split kernels' counters."""

import inspect

import pytest
import torch

pytest.importorskip("triton")

from cm3leon_lightning.model import fused, fused_launch  # noqa: E402
from cm3leon_lightning.model.fused_launch import FusedOptions, fused_options, use_fused_options  # noqa: E402

ALL_ON = FusedOptions(pdl=True, splits=True, prefetch_next=True)


@pytest.fixture(autouse=True)
def no_option_in_the_environment(monkeypatch):
    for env in fused_launch.OPTION_ENV.values():
        monkeypatch.delenv(env, raising=False)


def test_options_come_from_the_environment_unless_set_in_code(monkeypatch):
    assert fused_options() == FusedOptions() and FusedOptions().label == "base"  # all off by default
    monkeypatch.setenv("CM3LEON_PDL", "1")
    monkeypatch.setenv("CM3LEON_PREFETCH_NEXT", "1")
    assert fused_options() == FusedOptions(pdl=True, prefetch_next=True)
    monkeypatch.setenv("CM3LEON_PERSISTENT", "1")
    assert fused_options() == FusedOptions(pdl=True, prefetch_next=True, persistent=True)
    monkeypatch.setenv("CM3LEON_PERSISTENT", "0")
    with use_fused_options(FusedOptions(splits=True)) as inner:
        assert fused_options() is inner
        with use_fused_options(ALL_ON):
            assert fused_options() is ALL_ON
        assert fused_options() is inner
    assert fused_options() == FusedOptions(pdl=True, prefetch_next=True)


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("On", True), (" yes ", True), ("0", False),
                                      ("", False), ("false", False), ("OFF", False), ("no", False)])  # fmt: skip
def test_option_variables_read_the_usual_spellings(value, on, monkeypatch):
    """``CM3LEON_PERSISTENT=true`` used to leave the option off without a word (only ``1`` counted), so a benchmark
    timed the plain step under the option's name; the spellings Triton takes for its own switches now count."""
    monkeypatch.setenv("CM3LEON_PERSISTENT", value)
    assert fused_options() == FusedOptions(persistent=on)


@pytest.mark.parametrize("value", ["2", "enable", "1,0"])
def test_an_option_variable_of_another_value_is_refused_naming_it(value, monkeypatch):
    monkeypatch.setenv("CM3LEON_FUSED_SPLITS", value)
    with pytest.raises(ValueError, match=f"CM3LEON_FUSED_SPLITS={value!r}: use 1 \\(on\\) or 0 \\(off\\)"):
        fused_options()
    with use_fused_options(FusedOptions()):  # options set in code do not read the environment
        assert fused_options() == FusedOptions()


def test_the_interpreter_is_recognised_as_triton_recognises_it(monkeypatch):
    """``TRITON_INTERPRET=true`` runs Triton's interpreter as ``1`` does; the fused step used to take it for a GPU
    (refusing a CPU model, and on a GPU machine launching inline PTX and spinning waits in the interpreter)."""
    for value, on in (("1", True), ("true", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert fused.interpreting() is on, value
        assert (fused.fused_available(torch.device("cpu")) is None) is on, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused.interpreting()


def test_option_labels_parse_and_print_back():
    assert FusedOptions.parse("base") == FusedOptions()
    assert FusedOptions.parse("prefetch+splits") == FusedOptions(splits=True, prefetch_next=True)
    assert FusedOptions.parse("pdl + prefetch_next") == FusedOptions(pdl=True, prefetch_next=True)
    assert ALL_ON.label == "pdl+splits+prefetch" and FusedOptions.parse(ALL_ON.label) == ALL_ON
    assert FusedOptions.parse("persistent") == FusedOptions(persistent=True)
    assert FusedOptions(persistent=True, prefetch_next=True).label == "prefetch+persistent"
    with pytest.raises(ValueError, match=r"unknown \['graphs'\] in 'pdl\+graphs'"):
        FusedOptions.parse("pdl+graphs")


def test_pdl_only_when_asked_for_and_on_capable_cuda_devices(monkeypatch):
    monkeypatch.setattr(fused_launch, "_pdl_capable", lambda index: index == 0)  # GPU 0 an H100, GPU 1 an A100
    assert fused.launch_options(torch.device("cuda", 0)) == {}  # off by default (slower in its first measurement)
    monkeypatch.setenv(fused_launch.PDL_ENV, "1")
    assert fused.launch_options(torch.device("cpu")) == {}  # CPU (the interpreter): plain launches
    assert fused.launch_options(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert fused.launch_options(torch.device("cuda", 1)) == {}
    with use_fused_options(FusedOptions()):
        assert fused.launch_options(torch.device("cuda", 0)) == {}
    monkeypatch.setenv(fused_launch.PDL_ENV, "0")
    assert fused.launch_options(torch.device("cuda", 0)) == {}


def test_next_weights_are_prefetched_only_when_asked_for_and_on_cuda():
    """The prefetch is inline PTX: never on a CPU (Triton's interpreter cannot run it), where it is simply not
    compiled in; it changes no result."""
    assert not fused_launch.prefetches_next(torch.device("cuda", 0))
    with use_fused_options(ALL_ON):
        assert fused_launch.prefetches_next(torch.device("cuda", 0))
        assert not fused_launch.prefetches_next(torch.device("cpu"))


def test_linear_kernel_tuning_configurations():
    """Prefetching the first weight tile is tried only with PDL (without it nothing overlaps) and only with 128-wide
    tiles; split-K with 2, 4 and 8 splits only with the splits option; one autotuner per choice, each timed by the
    shortened benchmark and pruned by shape."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    assert all("PREFETCH" not in c.kwargs for c in fk.CONFIGS)
    assert len(fk.CONFIGS) == 12 and {c.kwargs.get("SPLIT_K", 1) for c in fk.CONFIGS} == {1, 2, 4, 8}
    prefetching = [c for c in fk.PDL_CONFIGS if c.kwargs.get("PREFETCH")]
    assert len(fk.PDL_CONFIGS) == len(fk.CONFIGS) + len(prefetching) == 21
    assert {c.kwargs["BLOCK_K"] for c in prefetching} == {128}
    assert fk.configs_for(pdl=False, splits=False) == fk.UNSPLIT_CONFIGS
    assert fk.configs_for(pdl=False, splits=True) == fk.CONFIGS and fk.configs_for(True, True) == fk.PDL_CONFIGS
    unsplit_pdl = fk.configs_for(pdl=True, splits=False)
    assert len(unsplit_pdl) == 9 and {c.kwargs.get("SPLIT_K", 1) for c in unsplit_pdl} == {1}
    # the split-K workspace covers the largest configuration, whatever the width: 8 splits of 32-column blocks of
    # 40 columns need 8 x 64 x 16 floats, more than 8 splits of 16-column blocks (8 x 48 x 16)
    assert fk.workspace_size(40, 16, [c.kwargs for c in fk.PDL_CONFIGS]) == 8 * 64 * 16
    assert fk.workspace_size(1024, 32, [c.kwargs for c in fk.PDL_CONFIGS]) == 8 * 1024 * 32
    assert fk.workspace_size(40, 16, [{"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 3}]) == 3 * 64 * 16
    for pdl in (False, True):
        for with_splits in (False, True):
            kernel = fk.tuned_kernel(pdl, with_splits)
            assert kernel is fk.tuned_kernel(pdl, with_splits)  # built once per choice
            assert kernel.configs == fk.configs_for(pdl, with_splits) and kernel.do_bench is fk.quick_bench
            assert kernel.early_config_prune is fk.prune_configs
            if "cache_results" in inspect.signature(fk.triton.autotune).parameters:  # timings kept on disk
                assert kernel.cache_results or fk.triton.knobs.runtime.interpret


def splits(configs):
    return sorted({c.kwargs.get("SPLIT_K", 1) for c in configs})


def test_split_k_is_tried_only_where_every_split_gets_work_and_the_output_is_narrow():
    from cm3leon_lightning.model import fused_linear_kernel as fk

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
    assert fused.split_counters(cpu, 5000) is first and first.numel() == fused_launch.COUNTERS and not first.any()
    with pytest.raises(ValueError, match="split counters hold 65536, 65537 asked for"):
        fused.split_counters(cpu, fused_launch.COUNTERS + 1)


def test_split_kernels_are_used_only_when_asked_for(monkeypatch):
    """Until a GPU run has checked the split kernels natively, the autotuner and the attention do without them unless
    the splits option is on (CM3LEON_FUSED_SPLITS=1 or in code); asking explicitly works regardless."""
    from cm3leon_lightning.model import fused_linear_kernel as fk

    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132})
    )
    assert fused.attention_splits(32, torch.device("cuda", 0)) == 1
    monkeypatch.setenv(fused_launch.SPLITS_ENV, "1")
    # one image with CFG at 350m: 2 rows x 16 heads -> 8 runs each; 8 candidates: 256 pairs fill the GPU alone
    assert [fused.attention_splits(p, torch.device("cuda", 0)) for p in (32, 64, 256)] == [8, 4, 1]
    assert fused.attention_splits(32, torch.device("cpu")) == 1
    with use_fused_options(FusedOptions()):
        assert fused.attention_splits(32, torch.device("cuda", 0)) == 1
    with use_fused_options(FusedOptions(splits=True)):
        assert fused.attention_splits(32, torch.device("cuda", 0)) == 8
    assert fk.prune_configs(fk.CONFIGS, {"N": 1024, "K": 4096}) == fk.CONFIGS  # pruned by shape only


def test_the_decoder_captures_one_graph_per_set_of_options(monkeypatch):
    """A captured CUDA graph keeps the options it was launched with: the decoder's graph key names them, so that
    changing them (benchmarks/generation.py --fused-options) captures a new graph rather than replaying the old; the
    other graph modes do not depend on them. (The mode is forced here: on a CPU no graph mode resolves.)"""
    from cm3leon_lightning.config import CM3LeonConfig
    from cm3leon_lightning.generation import decoder
    from cm3leon_lightning.model import CM3Leon

    keys = []
    monkeypatch.setattr(decoder, "graphed_step", lambda cache, key, *args: keys.append(key))
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", max_seq_len=64)).eval()
    spec = decoder.SamplingSpec(method="greedy", streams=1, lo=0, hi=64)
    for mode, options in (("fused-graph", FusedOptions()), ("fused-graph", ALL_ON), ("graph", ALL_ON)):
        monkeypatch.setattr(decoder, "resolve_mode", lambda compile, device, model, mode=mode: mode)
        with use_fused_options(options):
            decoder.Decoder(model, spec, [[1, 2, 3]], max_new_tokens=4, seed=0)
    assert [k[0] for k in keys] == ["fused-graph", "fused-graph", "graph"]
    assert [k[-1] for k in keys] == [FusedOptions(), ALL_ON, None]
    # the attention implementation and autocast are captured too: a graph of sdpa was replayed after
    # set_attention("flex") (benchmarks timed sdpa on their flex rows), one without autocast under it
    monkeypatch.setattr(decoder, "resolve_mode", lambda compile, device, model: "graph")
    model.set_attention("flex")
    decoder.Decoder(model, spec, [[1, 2, 3]], max_new_tokens=4, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.Decoder(model, spec, [[1, 2, 3]], max_new_tokens=4, seed=0)
    assert keys[-2][4:6] == (("flex", "flex"), None) and keys[-1][4:6] == (("flex", "flex"), torch.bfloat16)
    assert keys[2][4:6] == (("sdpa", "sdpa"), None)


def test_prefetch_sizes_are_capped_and_bad_layouts_refused(monkeypatch):
    """How much each kernel asks L2 for (at most PREFETCH_MAX_BYTES in all, so the prefetched data stays there),
    computed as on a GPU (forced here), and clear errors for what the kernels could not prefetch."""
    monkeypatch.setattr(fused, "prefetches_next", lambda device, options=None: True)
    monkeypatch.setattr(fused, "prefetch_mode", lambda device, aligned: 2 if aligned else 1)
    x = torch.zeros(2, 1024)
    qkv, head, text_head = (torch.zeros(n, 1024, dtype=torch.bfloat16) for n in (3072, 8192, 56320))
    assert fused._next_weight(x, qkv) == (qkv, 3072 * 1024 * 2 // 128, 2)  # all of it (6 MB), in bulk
    assert fused._next_weight(x, head)[1] == fused.PREFETCH_MAX_BYTES // 128 == 8192 * 1024 * 2 // 128
    assert fused._next_weight(x, text_head)[1] == fused.PREFETCH_MAX_BYTES // 128  # the first 16 MB of 115
    assert fused._next_weight(x, qkv.view(-1)[4 : 4 + 1024 * 1024].view(1024, 1024))[2] == 1  # 8 bytes in: by line
    assert fused._next_weight(x, None) == (x, 0, 0)
    with pytest.raises(ValueError, match=r"the weight to prefetch \(32, 40\) must be contiguous"):
        fused.decode_linear(torch.zeros(2, 32), torch.zeros(40, 32), prefetch=torch.zeros(40, 32).t())
    # the next layer's cache, per (row, head): all 1024 slots of 64 bf16 (128 KB) at 2 rows, the first 256 at 16
    two, sixteen = (torch.zeros(rows, 16, 1024, 64, dtype=torch.bfloat16) for rows in (2, 16))
    assert fused._next_cache(two, (two, two))[2] * 128 >= 1024 * 64 * 2
    assert fused._next_cache(sixteen, (sixteen, sixteen))[2:] == (256 * 64 * 2 // 128, 2)
    assert fused._next_cache(two, None)[2:] == (0, 0)
    with pytest.raises(ValueError, match=r"the cache to prefetch \(2, 16, 1024, 64\) must be laid out as this one"):
        fused._next_cache(two, (two.transpose(1, 2).contiguous().transpose(1, 2), two))


def test_bulk_prefetch_only_on_hopper_and_aligned(monkeypatch):
    """The copy engine's bulk prefetch needs sm_90 and 16-byte aligned addresses; otherwise line by line."""
    monkeypatch.setattr(fused_launch, "_bulk_capable", lambda index: index == 0)  # GPU 0 an H100, GPU 1 an A100
    assert fused_launch.prefetch_mode(torch.device("cuda", 0), aligned=True) == 2
    assert fused_launch.prefetch_mode(torch.device("cuda", 0), aligned=False) == 1
    assert fused_launch.prefetch_mode(torch.device("cuda", 1), aligned=True) == 1
