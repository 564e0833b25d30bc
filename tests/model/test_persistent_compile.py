"""The persistent decode step's kernel compiles for the GPUs the decode goal names (sm_90) and for Ampere (sm_80),
ahead of time and without a GPU, and its PTX holds the hand-off between programs that the interpreter cannot check
(it runs the programs one after another): tasks claimed with relaxed atomics, waits that poll with volatile loads
and end in one acquire load from one thread broadcast to the program, results published by a CTA barrier then one
release atomic, split hand-offs as the split kernels', L2 prefetches of each task's weights before its wait."""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

from support.aot import H100, compile_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from cm3leon_lightning.model.persistent import WAIT_TIMEOUT_NS  # noqa: E402
from cm3leon_lightning.model.persistent_kernel import decode_step_kernel  # noqa: E402

A100 = GPUTarget("cuda", 80, 32)


def step(dtype: str = "bf16", target=H100, **constants):
    """The kernel at 350m's shapes for one image with CFG (16-row tile, head_dim 64), as PersistentStep launches it
    on an H100 (bulk prefetch, 8 runs per (row, head), 32-slot cache tiles)."""
    flags = dict(R_PAD=16, BLOCK_N=16, BLOCK_K=128, ACT=1, IEEE=dtype == "fp32", DOWN_SPLIT=4, ATTN_SPLITS=8,
                 HEAD_D=64, D_PAD=64, BLOCK_S=32 if dtype == "bf16" else 16, BLOCK_C=256, PREFETCH_L2=2, SPIN=True,
                 SLEEP_NS=0, TIMEOUT_NS=WAIT_TIMEOUT_NS)  # fmt: skip
    flags.update(constants)
    pointers = {n: "*i32" for n in ("tasks_ptr", "sync_ptr", "error_ptr")}
    pointers.update(layers_ptr="*i64", idx_ptr="*i64", slot_ptr="*i64", valid_ptr="*i1", part_ptr="*fp32",
                    attn_part_ptr="*fp32")  # fmt: skip
    for name in ("wte_ptr", "wpe_ptr", "head_ptr", "x_ptr", "q_ptr", "y_ptr", "h_ptr", "logits_ptr"):
        pointers[name] = f"*{dtype}"
    return compile_kernel(decode_step_kernel, flags, pointers, target=target)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_step_compiles_small_enough_for_several_programs_per_sm(dtype):
    kernel = step(dtype)
    assert kernel.asm["cubin"]
    assert kernel.metadata.shared <= 48 * 1024, kernel.metadata.shared  # four programs or more per SM
    ptx = kernel.asm["ptx"]
    # weights and cache stream through pipelined asynchronous copies, inside the task loop's branches
    assert "cp.async.cg.shared.global" in ptx and "cp.async.commit_group" in ptx


def resources(kernel) -> dict[str, int]:
    """Registers per thread, stack and local memory of a compiled kernel (``cuobjdump``, shipped with Triton)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to read the kernel's register count")
    cubin = Path(tempfile.mkdtemp()) / "step.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    out = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


@pytest.mark.parametrize("rows,most", [(16, 128), (32, 168)], ids=["one-image", "eight-candidates"])
def test_registers_leave_room_for_several_programs_per_sm(rows, most):
    """The task bodies are real calls: inlined, the task loop kept values hoisted out of every branch live across
    the loop (250 registers a thread, two programs per SM). One image with CFG (a 16-row tile): at most 128 (four
    programs per SM); eight candidates (32-row tile): at most 168 (three); no spills either way."""
    used = resources(step(R_PAD=rows))
    assert used["REG"] <= most and used["STACK"] == 0 and used["LOCAL"] == 0, used


def test_the_hand_off_between_programs():
    ptx = step().asm["ptx"]
    atomics = sorted(set(re.findall(r"atom\.global\.gpu\.(\w+)\.add", ptx)))
    assert atomics == ["acq_rel", "relaxed", "release"]  # split arrivals, task claims, phase outputs
    assert ptx.count("atom.global.gpu.relaxed.add") == 2  # the first claim and the claim of the next task
    # a task's wait: acquire load by one thread, stored to shared memory, a barrier, the same value for every thread
    acquires = [m.start() for m in re.finditer(r"@%p\d+ ld\.global\.gpu\.acquire\.b32", ptx)]
    assert len(acquires) >= 6  # (before and after polling) in each of the six branches that wait
    for at in acquires:
        after = ptx[at : at + 400]
        assert re.search(r"st\.shared[^\n]*\n(.*\n)*?\s*bar\.sync", after), after
    # the polls: the phase counter before and while sleeping, and the failed-wait count (one gives up, all do)
    assert ptx.count("ld.volatile.global.b32") >= 18
    assert ptx.count("%globaltimer") >= 6  # each wait is bounded in time (a hand-off bug ends the launch, no hang)
    # ... and the program gives up as one (its threads' clocks differ): an OR over the program before each acquire
    assert ptx.count("barrier.red.or.pred") >= 6
    for at in (m.start() for m in re.finditer(r"barrier\.red\.or\.pred", ptx)):
        assert re.search(r"ld\.global\.gpu\.acquire", ptx[at : at + 600]), ptx[at : at + 600]
    # a phase output is counted after a barrier, by one thread, with release semantics
    release = ptx.index("atom.global.gpu.release.add")
    assert "bar.sync" in ptx[ptx.rindex("st.global", 0, release) : release]
    assert re.search(r"@%p\d+ atom\.global\.gpu\.release", ptx)
    # what other programs wrote (activations, the cache slot, partial sums) is read past L1
    assert ptx.count("ld.global.cg") >= 10


def test_tasks_ask_l2_for_their_weights_before_waiting_and_only_on_a_gpu_that_can():
    ptx = step().asm["ptx"]
    first_wait = ptx.index("ld.global.gpu.acquire")
    assert "@p cp.async.bulk.prefetch.L2.global" in ptx[:first_wait]
    line = step(target=A100, PREFETCH_L2=1).asm["ptx"]
    assert "@p prefetch.global.L2" in line and "bulk" not in line
    assert "prefetch" not in step(PREFETCH_L2=0).asm["ptx"]


def test_back_off_only_when_asked_for():
    assert "nanosleep.u32" in step(SLEEP_NS=100).asm["ptx"]
    assert "nanosleep" not in step().asm["ptx"]
