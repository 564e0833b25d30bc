"""The fused decode kernels compile to machine code for the GPUs the decode goal names (H100/H200: sm_90), ahead of
time and without a GPU: every flag combination of the linear kernel the fused step launches, in bfloat16 and float32,
and every autotuning configuration; the attention kernel at the presets' head widths; the input and sampling kernels;
each with programmatic dependent launch. The interpreter (test_fused_decode.py, test_sampling_kernel.py) checks what
the kernels compute; this checks that Triton's GPU compiler accepts them (types, dot precisions, shared memory),
streams weights and cache with pipelined asynchronous copies, and waits for the previous kernel before touching
memory, which the interpreter cannot tell."""

import re

import pytest

triton = pytest.importorskip("triton")

from support.aot import H100, compile_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from cm3leon_lightning.generation.sampling_kernel import pick_kernel  # noqa: E402
from cm3leon_lightning.model.fused_kernels import (  # noqa: E402
    attention_block_s,
    decode_attention_kernel,
    decode_embed_kernel,
)
from cm3leon_lightning.model.fused_linear_kernel import CONFIGS, PDL_CONFIGS, decode_linear_kernel  # noqa: E402

# What fused_decode_forward launches per block and for the head: QKV (LayerNorm + cache write), out-projection
# (residual), up-projection (LayerNorm + GELU or ReLU), down-projection (residual), LM head (LayerNorm).
LAUNCHES = [
    dict(NORM=True, ACT=0, RESIDUAL=False, CACHE=True),
    dict(NORM=False, ACT=0, RESIDUAL=True, CACHE=False),
    dict(NORM=True, ACT=1, RESIDUAL=False, CACHE=False),
    dict(NORM=True, ACT=2, RESIDUAL=False, CACHE=False),
    dict(NORM=True, ACT=0, RESIDUAL=False, CACHE=False),
]


def linear(
    dtype: str, flags: dict, block_n: int = 32, block_k: int = 128, warps: int = 4, stages: int = 3, target=H100
):
    constants = {"R_PAD": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "IEEE": dtype == "fp32", "PDL": False,
                 "PREFETCH": False, "SPLIT_K": 1, "PREFETCH_NEXT": 0, **flags}  # fmt: skip
    pointers = {n: f"*{dtype}" for n in ("x_ptr", "w_ptr", "out_ptr", "res_ptr", "k_ptr", "v_ptr", "next_ptr")}
    pointers.update(slot_ptr="*i64", part_ptr="*fp32", count_ptr="*i32")
    return compile_kernel(decode_linear_kernel, constants, pointers, warps, stages, target)


def attention(dtype: str, head_dim: int = 64, pdl: bool = False, splits: int = 1, target=H100, prefetch: int = 0):
    d_pad = triton.next_power_of_2(head_dim)
    block_s = attention_block_s(d_pad, 4 if dtype == "fp32" else 2)
    constants = dict(HEAD_D=head_dim, D_PAD=d_pad, BLOCK_S=block_s, IEEE=dtype == "fp32", PDL=pdl, SPLITS=splits,
                     PREFETCH_NEXT=prefetch)  # fmt: skip
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "valid_ptr": "*i1", "slot_ptr": "*i64", "part_ptr": "*fp32", "count_ptr": "*i32",
                "nk_ptr": f"*{dtype}", "nv_ptr": f"*{dtype}"}  # fmt: skip
    return compile_kernel(decode_attention_kernel, constants, pointers, target=target)


def embed(dtype: str, pdl: bool = False, target=H100):
    pointers = {"idx_ptr": "*i64", "wte_ptr": f"*{dtype}", "wpe_ptr": f"*{dtype}", "valid_ptr": "*i1",
                "slot_ptr": "*i64", "x_ptr": f"*{dtype}"}  # fmt: skip
    return compile_kernel(decode_embed_kernel, dict(BLOCK_S=256, BLOCK_C=256, PDL=pdl), pointers, target=target)


def pick(sampled: bool, pdl: bool = False, target=H100):
    constants = dict(W_PAD=8192, STREAMS=2 if sampled else 1, ALLOWED=sampled, GREEDY=not sampled, TOP_P=sampled,
                     PDL=pdl)  # fmt: skip
    pointers = {"logits_ptr": "*bf16", "allowed_ptr": "*i1", "noise_ptr": "*fp32", "out_ptr": "*i64"}
    return compile_kernel(
        pick_kernel, constants, pointers, warps=16, target=target
    )  # what fused_pick_tokens launches at 8192


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("flags", LAUNCHES, ids=["qkv", "out", "up-gelu", "up-relu", "head"])
def test_every_launch_compiles_for_sm90(dtype, flags):
    kernel = linear(dtype, flags)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 228 * 1024
    # the weight tiles stream through asynchronous 16-byte copies, pipelined over the K loop (what makes the kernel
    # bandwidth-bound rather than load-instruction-bound)
    assert "cp.async.cg.shared.global" in kernel.asm["ptx"] and "cp.async.commit_group" in kernel.asm["ptx"]


def test_every_autotuning_configuration_compiles_for_sm90():
    for config in CONFIGS + PDL_CONFIGS:
        tiles = (config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"])
        flags = {**LAUNCHES[0], "PDL": "PREFETCH" in config.kwargs, "PREFETCH": config.kwargs.get("PREFETCH", False),
                 "SPLIT_K": config.kwargs.get("SPLIT_K", 1)}  # fmt: skip
        kernel = linear("bf16", flags, *tiles, config.num_warps, config.num_stages)
        assert kernel.asm["cubin"] and "cp.async.commit_group" in kernel.asm["ptx"], config


def test_every_kernel_compiles_for_ampere():
    """fused-graph is the default on NVIDIA GPUs of compute capability 8.0 and up: the A100's sm_80 (no wgmma, no
    grid dependency control) compiles every kernel too, with pipelined asynchronous copies."""
    a100 = GPUTarget("cuda", 80, 32)
    for flags in LAUNCHES:
        assert "cp.async.cg.shared.global" in linear("bf16", flags, target=a100).asm["ptx"], flags
    assert "cp.async" in attention("bf16", target=a100).asm["ptx"]
    assert embed("bf16", target=a100).asm["cubin"] and pick(True, target=a100).asm["cubin"]


def test_the_largest_tiles_fit_in_shared_memory_at_the_largest_row_tile():
    """Up to MAX_ROW_TILE rows every configuration fits an H100's 227 KB of shared memory per program (more rows
    go to cuBLAS); the largest are the 256-wide K tiles, whose x tile grows with the rows."""
    from cm3leon_lightning.model.fused import MAX_ROW_TILE

    for config in [c for c in CONFIGS if c.kwargs["BLOCK_K"] == 256]:
        flags = {**LAUNCHES[0], "R_PAD": MAX_ROW_TILE}
        kernel = linear("bf16", flags, config.kwargs["BLOCK_N"], 256, config.num_warps, config.num_stages)
        assert kernel.metadata.shared <= 227 * 1024, (config, kernel.metadata.shared)


@pytest.mark.parametrize("flags", LAUNCHES, ids=["qkv", "out", "up-gelu", "up-relu", "head"])
def test_every_load_of_x_and_w_is_a_pipelined_copy_without_split_k(flags):
    """The LayerNorm's statistics are gathered in the main loop (one pass), so the only plain global loads left
    are the cache slot (QKV) and the residual (epilogue); with split-K the statistics loop comes first."""
    plain = re.findall(r"ld\.global[.\w]*", linear("bf16", flags, block_n=16).asm["ptx"])
    assert plain == ["ld.global.b64"] * flags["CACHE"] + ["ld.global.b32"] * flags["RESIDUAL"], plain
    split = re.findall(r"ld\.global\.v4[.\w]*", linear("bf16", {**flags, "SPLIT_K": 2}, block_n=16).asm["ptx"])
    assert bool(split) == flags["NORM"], split


@pytest.mark.parametrize("flags", LAUNCHES, ids=["qkv", "out", "up-gelu", "up-relu", "head"])
def test_split_k_publishes_partials_before_counting_and_reads_them_from_l2(flags):
    """Split-K's hand-off between programs: every thread's partial sums are stored, then a CTA barrier, then one
    acquire-release atomic on the block's counter (the release covers the whole CTA's stores through the barrier);
    the last program reads the partials past L1 (``.cg``: another SM wrote them) and resets the counter. Without
    split-K none of it is compiled in."""
    ptx = linear("bf16", {**flags, "SPLIT_K": 4}, block_n=16).asm["ptx"]
    atomic = re.search(r"atom\.(\S*)\.add\.\S*32", ptx)
    assert atomic and "acq_rel" in atomic.group(1) and "gpu" in atomic.group(1), atomic
    before, after = ptx[: atomic.start()], ptx[atomic.end() :]
    assert "bar.sync" in before[before.rindex("st.global") :]  # barrier between the last partial store and the atomic
    assert "ld.global.cg" in after
    assert not re.search(r"atom\.", linear("bf16", flags, block_n=16).asm["ptx"])


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])  # 350m, 760m (padded to 128), 7b
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_attention_compiles_for_sm90_with_pipelined_cache_loads(dtype, head_dim, splits):
    kernel = attention(dtype, head_dim, splits=splits)
    # at most ~100 KB of shared memory, so two programs share an SM and 16 rows x 16 heads run in one wave
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 100 * 1024, kernel.metadata.shared
    # keys and values stream through asynchronous copies issued tiles ahead of the loop (the query is row 0 of a
    # 16-row tl.dot so that Triton pipelines these loads; loads feeding reductions are not pipelined)
    ptx = kernel.asm["ptx"]
    assert "cp.async.cg.shared.global" in ptx and "cp.async.commit_group" in ptx
    # split over the cache: the runs' hand-off as in the linear kernel's split-K (barrier, acquire-release atomic,
    # the runs read past L1); one run: no atomics at all
    atomic = re.search(r"atom\.(\S*)\.add\.\S*32", ptx)
    assert bool(atomic) == (splits > 1)
    if atomic:
        assert "acq_rel" in atomic.group(1) and "gpu" in atomic.group(1)
        assert "bar.sync" in ptx[ptx.rindex("st.global", 0, atomic.start()) : atomic.start()]
        assert "ld.global.cg" in ptx[atomic.end() :]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_decode_embed_compiles_for_sm90(dtype):
    kernel = embed(dtype)
    assert kernel.asm["cubin"]
    assert "st.global.b8" in kernel.asm["ptx"]  # the bool slot is stored as one byte, as torch.bool holds it


@pytest.mark.parametrize("sampled", [True, False], ids=["top_p-cfg-constrained", "greedy"])
def test_sampling_kernel_compiles_for_sm90_at_the_image_code_width(sampled):
    kernel = pick(sampled)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 228 * 1024


def test_programmatic_dependent_launch_waits_before_any_memory_access():
    """With PDL every kernel waits for the previous grid before its first load or store (what makes launching it
    early safe), and only then lets the next one launch (one kernel ahead, not the whole step); without, no grid
    dependency control at all."""
    kernels = {f"linear {i}": linear("bf16", {**flags, "PDL": True}) for i, flags in enumerate(LAUNCHES)}
    kernels.update(attention=attention("bf16", pdl=True), embed=embed("bf16", pdl=True), pick=pick(True, pdl=True))
    for name, kernel in kernels.items():
        ptx = kernel.asm["ptx"]
        head, body = ptx.split("griddepcontrol.wait", 1)
        assert "griddepcontrol.launch_dependents" in body and "griddepcontrol" not in head, name
        assert not any(op in head for op in ("ld.global", "st.global", "cp.async")), name
        assert "ld.global" in body or "cp.async" in body, name
    for kernel in (linear("bf16", LAUNCHES[0]), attention("bf16"), embed("bf16"), pick(True)):
        assert "griddepcontrol" not in kernel.asm["ptx"]
    # PREFETCH: the first weight tile is loaded before the wait (weights never depend on the previous kernel); still
    # nothing is written, and the x, residual and cache accesses come after
    for flags in LAUNCHES:
        head, body = linear("bf16", {**flags, "PDL": True, "PREFETCH": True}).asm["ptx"].split("griddepcontrol.wait", 1)
        assert "ld.global" in head and "st.global" not in head and "cp.async" not in head, flags
        assert "st.global" in body and "cp.async" in body, flags


@pytest.mark.parametrize("split", [1, 4])
def test_the_next_weights_are_asked_into_l2_first_and_only_when_asked_for(split):
    """PREFETCH_NEXT: every program's first memory instructions ask L2 for its share of the next kernel's weights,
    before its own loads and, with PDL, before the wait for the previous kernel (weights depend on nothing); then the
    kernel is as without. Line by line (1; sm_80 too): a loop of 256 lines, two per thread, predicated on the share's
    end. In bulk (2; sm_90): one copy-engine prefetch per 32 KB, from thread 0 only."""
    for mode, target in ((1, H100), (1, GPUTarget("cuda", 80, 32)), (2, H100)):
        flags = {**LAUNCHES[0], "SPLIT_K": split, "PREFETCH_NEXT": mode}
        ptx = linear("bf16", flags, block_n=16, target=target).asm["ptx"]
        op = "@p prefetch.global.L2" if mode == 1 else "@p cp.async.bulk.prefetch.L2.global"
        assert ptx.count(op) == (2 if mode == 1 else 1) and ptx.count("prefetch") == ptx.count(op), (mode, target)
        first = ptx.index(op)
        assert not any(op in ptx[:first] for op in ("ld.global", "st.global", "cp.async.cg")), (mode, target)
        assert "cp.async.cg.shared.global" in ptx[first:]
        if mode == 2:
            assert "%tid.x" in ptx[ptx.rindex("{", 0, first) : first]  # one thread asks
        head, body = linear("bf16", {**flags, "PDL": True}, target=H100).asm["ptx"].split("griddepcontrol.wait", 1)
        assert op in head and "prefetch" not in body
    assert "prefetch" not in linear("bf16", LAUNCHES[0]).asm["ptx"]


@pytest.mark.parametrize("splits", [1, 8])
@pytest.mark.parametrize("mode", [1, 2])
def test_the_attention_asks_for_the_next_layers_cache_after_the_wait(splits, mode):
    """PREFETCH_NEXT in the attention: two prefetch loops (keys, values of the next layer for this row and head),
    after PDL's wait (they read the step's slot) and before the first cache copy; none without the flag."""
    ptx = attention("bf16", pdl=True, splits=splits, prefetch=mode).asm["ptx"]
    op = "@p prefetch.global.L2" if mode == 1 else "@p cp.async.bulk.prefetch.L2.global"
    head, body = ptx.split("griddepcontrol.wait", 1)
    assert "prefetch" not in head and body.count(op) == (4 if mode == 1 else 2)
    assert body.index(op) < body.index("cp.async.cg")
    assert "prefetch" not in attention("bf16", splits=splits).asm["ptx"]
