"""The fused decode kernels compile to machine code for the GPUs the decode goal names (H100/H200: sm_90), ahead of
time and without a GPU: every flag combination the fused step launches, in bfloat16 and float32, and every autotuning
configuration. The interpreter (test_fused_decode.py) checks what the kernels compute; this checks that Triton's
GPU compiler accepts them (types, dot precisions, shared memory) and streams the weights with pipelined 16-byte
asynchronous copies, which the interpreter cannot tell."""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from cm3leon_lightning.model.fused_kernels import (  # noqa: E402
    ATTENTION_BLOCK_S,
    CONFIGS,
    decode_attention_kernel,
    decode_embed_kernel,
    decode_linear_kernel,
)

# What fused_decode_forward launches per block and for the head: QKV (LayerNorm + cache write), out-projection
# (residual), up-projection (LayerNorm + GELU or ReLU), down-projection (residual), LM head (LayerNorm).
LAUNCHES = [
    dict(NORM=True, ACT=0, RESIDUAL=False, CACHE=True),
    dict(NORM=False, ACT=0, RESIDUAL=True, CACHE=False),
    dict(NORM=True, ACT=1, RESIDUAL=False, CACHE=False),
    dict(NORM=True, ACT=2, RESIDUAL=False, CACHE=False),
    dict(NORM=True, ACT=0, RESIDUAL=False, CACHE=False),
]
H100 = GPUTarget("cuda", 90, 32)
INTS = ("R", "N", "K", "C", "D", "stride_cb", "stride_ch", "stride_cs")


def compile_for(target, dtype: str, flags: dict, block_n: int = 32, block_k: int = 128, warps: int = 4, stages=3):
    names = decode_linear_kernel.arg_names
    signature = {}
    for n in names:
        if n.endswith("_ptr"):
            signature[n] = "*i64" if n == "slot_ptr" else f"*{dtype}"
        else:
            signature[n] = "fp32" if n == "eps" else "i32" if n in INTS else "constexpr"
    constants = dict(R_PAD=16, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=dtype == "fp32", **flags)
    # What the JIT assumes at the model's shapes (every width and stride a multiple of 16, 16-byte aligned buffers)
    aligned = [n for n in names if n.endswith("_ptr") or (n in INTS and n != "R")]
    src = triton.compiler.ASTSource(
        fn=decode_linear_kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("flags", LAUNCHES, ids=["qkv", "out", "up-gelu", "up-relu", "head"])
def test_every_launch_compiles_for_sm90(dtype, flags):
    kernel = compile_for(H100, dtype, flags)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 228 * 1024
    # the weight tiles stream through asynchronous 16-byte copies, pipelined over the K loop (what makes the kernel
    # bandwidth-bound rather than load-instruction-bound)
    assert "cp.async.cg.shared.global" in kernel.asm["ptx"] and "cp.async.commit_group" in kernel.asm["ptx"]


def test_every_autotuning_configuration_compiles_for_sm90():
    for config in CONFIGS:
        tiles = (config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"])
        kernel = compile_for(H100, "bf16", LAUNCHES[0], *tiles, config.num_warps, config.num_stages)
        assert kernel.asm["cubin"], config


ATTENTION_INTS = ("C", "stride_cb", "stride_ch", "stride_cs", "stride_vb")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])  # 350m, 760m (padded to 128), 7b
def test_decode_attention_compiles_for_sm90_with_pipelined_cache_loads(dtype, head_dim):
    names = decode_attention_kernel.arg_names
    pointers = {"slot_ptr": "*i64", "valid_ptr": "*i1"}
    signature = {
        n: pointers.get(n, f"*{dtype}") if n.endswith("_ptr") else "fp32" if n == "scale" else "i32"
        for n in names
        if n not in ("HEAD_D", "D_PAD", "BLOCK_S", "IEEE")
    }
    constants = dict(HEAD_D=head_dim, D_PAD=triton.next_power_of_2(head_dim), BLOCK_S=ATTENTION_BLOCK_S,
                     IEEE=dtype == "fp32")  # fmt: skip
    signature.update({n: "constexpr" for n in constants})
    signature = {n: signature[n] for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ATTENTION_INTS]
    src = triton.compiler.ASTSource(
        fn=decode_attention_kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    kernel = triton.compile(src, target=H100, options={"num_warps": 4, "num_stages": 3})
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 228 * 1024
    # keys and values stream through asynchronous copies issued tiles ahead of the loop (the query is row 0 of a
    # 16-row tl.dot so that Triton pipelines these loads; loads feeding reductions are not pipelined)
    assert "cp.async.cg.shared.global" in kernel.asm["ptx"] and "cp.async.commit_group" in kernel.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_decode_embed_compiles_for_sm90(dtype):
    names = decode_embed_kernel.arg_names
    pointers = {"slot_ptr": "*i64", "valid_ptr": "*i1", "idx_ptr": "*i64"}
    constants = dict(BLOCK_S=256, BLOCK_C=256)
    signature = {
        n: "constexpr" if n in constants else pointers.get(n, f"*{dtype}") if n.endswith("_ptr") else "i32"
        for n in names
    }
    src = triton.compiler.ASTSource(
        fn=decode_embed_kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n == "C"},
    )
    kernel = triton.compile(src, target=H100, options={"num_warps": 4, "num_stages": 3})
    assert kernel.asm["cubin"]
    assert "st.global.b8" in kernel.asm["ptx"]  # the bool slot is stored as one byte, as torch.bool holds it


@pytest.mark.parametrize("sampled", [True, False], ids=["top_p-cfg-constrained", "greedy"])
def test_sampling_kernel_compiles_for_sm90_at_the_image_code_width(sampled):
    from cm3leon_lightning.generation.sampling_kernel import pick_kernel

    names = pick_kernel.arg_names
    constants = dict(W_PAD=8192, STREAMS=2 if sampled else 1, ALLOWED=sampled, GREEDY=not sampled, TOP_P=sampled)
    pointers = {"logits_ptr": "*bf16", "allowed_ptr": "*i1", "noise_ptr": "*fp32", "out_ptr": "*i64"}
    floats = ("cfg", "temperature", "top_p")
    signature = {
        n: "constexpr" if n in constants else pointers[n] if n in pointers else "fp32" if n in floats else "i32"
        for n in names
    }
    src = triton.compiler.ASTSource(
        fn=pick_kernel,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, "W")},
    )
    kernel = triton.compile(src, target=H100, options={"num_warps": 16})  # what fused_pick_tokens launches at 8192
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 228 * 1024
