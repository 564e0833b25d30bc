"""GPU correctness check of the transformer: KV-cached prefill + CUDA-graph decode equals the full forward (fp32),
and bf16 autocast gives finite logits. Prints the figures; exits non-zero on a mismatch, or when torch.compile skipped
the CUDA graphs (the decode then ran as plain compiled code, and the check would not be of CUDA graphs).

    python benchmarks/gpu_model_check.py
"""

from __future__ import annotations

import sys

import torch
from torch._dynamo.utils import counters

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import CM3Leon


def cudagraph_skips() -> int:
    """How many times torch.compile has skipped CUDA graphs in this process (it logs "skipping cudagraphs ...")."""
    return int(counters["inductor"]["cudagraph_skips"])


def check(device: str) -> int:
    """Run the checks on ``device`` and print their figures; 0 when all pass, else 1."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = CM3LeonConfig.from_preset("tiny", n_layer=4, d_model=256, d_ff=1024, n_head=4)
    model = CM3Leon(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # non-zero output layers, so the check is not trivial
    x = torch.randint(0, cfg.vocab_size, (4, 40), device=device)
    mask = torch.ones_like(x)
    mask[1, :7] = 0  # a left-padded row
    skipped = cudagraph_skips()
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        model.setup_kv_cache(4, 48)
        step = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
        out = [model(x[:, :30], input_pos=torch.arange(30, device=device), attention_mask=mask[:, :30])]
        pos = torch.tensor([30], device=device)
        for t in range(30, 40):
            out.append(step(x[:, t : t + 1], input_pos=pos).clone())
            pos += 1
    skipped = cudagraph_skips() - skipped
    err = (torch.cat(out, 1) - full)[mask.bool()].abs().max().item()
    print(f"cached+cuda-graph decode vs full forward, fp32: max abs err {err:.2e}")
    print(f"CUDA graphs skipped by torch.compile: {skipped}")
    with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16):
        finite = torch.isfinite(model(x)).all().item()
    print(f"bf16 autocast logits finite: {finite}")
    return 0 if err < 1e-4 and finite and not skipped else 1


def main() -> int:
    """The checks on the GPU (nothing to check without one)."""
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    return check("cuda")


if __name__ == "__main__":
    sys.exit(main())
