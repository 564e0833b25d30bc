"""The fused sampling kernel (generation/sampling_kernel.py) against pick_tokens. On a GPU natively; without one under
Triton's interpreter, which tests/model/test_fused_interpreter.py switches on for this file in a subprocess."""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from cm3leon_lightning.generation.decoder import SamplingSpec, pick_tokens  # noqa: E402
from cm3leon_lightning.generation.sampling import sample_noise  # noqa: E402
from cm3leon_lightning.generation.sampling_kernel import MAX_WIDTH, fused_pick_tokens  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 from the start (as test_fused_interpreter.py runs it)",
)

CASES = [
    dict(method="top_p", streams=2, cfg=3.0, top_p=0.9),
    dict(method="top_p", streams=2, cfg=0.3, top_p=0.5, temperature=0.7),  # lerp's other formula
    dict(method="top_p", streams=1, top_p=0.2),
    dict(method="temperature", streams=2, cfg=1.5, temperature=1.3),
    dict(method="greedy", streams=2, cfg=3.0),
    dict(method="top_p", streams=1, temperature=0.0),  # temperature 0: greedy
    dict(method="top_p", streams=2, cfg=3.0, temperature=1e-40),  # x / T overflowed: NaN draws; now the argmax
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("constrained", [False, True])
def test_kernel_picks_the_tokens_of_pick_tokens(case, constrained):
    """6 rows of 300 ids (not a power of two) over 4 noise draws, with and without a constraint."""
    spec = SamplingSpec(lo=40, hi=340, **case)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(spec.streams * 6, 300, generator=gen) * 3).to(DEVICE)
    allowed = (torch.rand(300, generator=gen) < 0.4).to(DEVICE) if constrained else None
    for draw in range(4):
        noise = None if spec.greedy else sample_noise((6, 300), torch.Generator().manual_seed(draw), "cpu").to(DEVICE)
        got = fused_pick_tokens(logits, spec, allowed, noise)
        assert torch.equal(got, pick_tokens(logits, spec, allowed, noise)), draw
        if allowed is not None:
            assert allowed[got - 40].all()


@pytest.mark.parametrize("top_p,nucleus", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.97, {0, 1, 2, 3})])
def test_nucleus_is_the_smallest_set_with_enough_mass(top_p, nucleus):
    """Probabilities 0.5, 0.3, 0.15, 0.05 over one row: near-zero noise on one token makes it win whenever it is in
    the nucleus, so each token's membership is read off the drawn token."""
    logits = torch.tensor([[math.log(v) for v in (0.5, 0.3, 0.15, 0.05)]], device=DEVICE)
    spec = SamplingSpec(method="top_p", streams=1, top_p=top_p, lo=0, hi=4)
    for token in range(4):
        noise = torch.ones(1, 4, device=DEVICE)
        noise[0, token] = 1e-6
        picked = int(fused_pick_tokens(logits, spec, None, noise))
        assert (picked == token) == (token in nucleus), (token, picked)


def test_tied_tokens_at_the_nucleus_boundary_are_all_kept_as_pick_tokens_keeps_them():
    """Probabilities 0.4, 0.3, 0.3 at top_p 0.6: the kernel's nucleus {p_i >= t*} holds both 0.3, pick_tokens' sort
    kept only the lower id, so the two steps drew different tokens."""
    logits = torch.tensor([[math.log(v) for v in (0.4, 0.3, 0.3)]], device=DEVICE)
    spec = SamplingSpec(method="top_p", streams=1, top_p=0.6, lo=0, hi=3)
    for token in range(3):
        noise = torch.ones(1, 3, device=DEVICE)
        noise[0, token] = 1e-6
        assert int(fused_pick_tokens(logits, spec, None, noise)) == token
        assert int(pick_tokens(logits, spec, None, noise)) == token


@pytest.mark.parametrize(
    "weights,top_p,nucleus", [((3, 13), 13 / 16, {1}), ((1, 17, 2, 6, 6), 29 / 32, {1, 3, 4}), ((3, 13), 0.82, {0, 1})]
)
def test_a_nucleus_of_mass_exactly_top_p_takes_no_further_token(weights, top_p, nucleus):
    """13/16 alone reaches top_p = 13/16, but the kernel's float32 sum fell short of it and kept the 3/16 token too
    (and 17, 6, 6 of 32 reach 29/32 without the 2/32 token); pick_tokens keeps the same set."""
    total = sum(weights)
    logits = torch.tensor([[math.log(v / total) for v in weights]], device=DEVICE)
    spec = SamplingSpec(method="top_p", streams=1, top_p=top_p, lo=0, hi=len(weights))
    for token in range(len(weights)):
        noise = torch.ones(1, len(weights), device=DEVICE)
        noise[0, token] = 1e-6
        assert (int(fused_pick_tokens(logits, spec, None, noise)) == token) == (token in nucleus), token
        assert (int(pick_tokens(logits, spec, None, noise)) == token) == (token in nucleus), token


def test_other_rules_fall_back_and_bad_inputs_are_refused():
    logits = torch.zeros(4, 10, device=DEVICE)
    noise = torch.ones(2, 10, device=DEVICE)
    for spec in (
        SamplingSpec(method="cd_k", lo=0, hi=10),
        SamplingSpec(top_k=3, lo=0, hi=10),
        SamplingSpec(streams=3, lo=0, hi=10),
        SamplingSpec(streams=2, lo=0, hi=MAX_WIDTH + 1),
        SamplingSpec(streams=2, lo=0, hi=8),  # logits of a wider range than the spec's
    ):
        assert fused_pick_tokens(logits, spec, None, noise) is None
    spec = SamplingSpec(lo=0, hi=10)
    with pytest.raises(ValueError, match="noise must be"):
        fused_pick_tokens(logits, spec, None, noise[:1])
    with pytest.raises(ValueError, match="allowed"):
        fused_pick_tokens(logits, spec, torch.ones(9, dtype=torch.bool, device=DEVICE), noise)
