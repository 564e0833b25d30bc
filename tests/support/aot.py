"""Ahead-of-time compilation of Triton kernels for a GPU this machine does not have (the fused decode kernels'
compile tests): what the JIT would build at the model's shapes, with its PTX and metadata to inspect."""

import triton
from triton.backends.compiler import GPUTarget

H100 = GPUTarget("cuda", 90, 32)
INTS = (
    "T",
    "P",
    "F",
    "NH",
    "H",
    "R",
    "N",
    "K",
    "C",
    "D",
    "stride_cb",
    "stride_ch",
    "stride_cs",
    "stride_vb",
    "stride_ib",
    "W",
    "lo",
    "next_lines",
)
FLOATS = ("eps", "scale", "cfg", "temperature", "top_p")
ALIGNED = ("N", "K", "C", "D", "F", "NH", "stride_cb", "stride_ch", "stride_cs", "stride_vb", "W")


def compile_kernel(fn, constants: dict, pointers: dict, warps: int = 4, stages: int = 3, target=H100):
    """Compile ``fn`` for sm_90 as the JIT would at the model's shapes: ``constants`` are its constexprs,
    ``pointers`` the element type of each pointer argument, every width and stride a multiple of 16 and every buffer
    16-byte aligned."""
    names = fn.arg_names
    signature = {
        n: "constexpr" if n in constants else pointers[n] if n in pointers else "fp32" if n in FLOATS else "i32"
        for n in names
    }
    unknown = [n for n in names if n not in constants and n not in pointers and n not in INTS and n not in FLOATS]
    assert not unknown, f"{fn.__name__}: say how to compile {unknown}"
    src = triton.compiler.ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in ALIGNED},
    )
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
