"""Pure logit rules of paper section 3.1: temperature, top-k, top-p, CFG (eq. 2), CD-K (eq. 3), separate text/image
guidance (section 4.1), modality constraints and device-side sampling."""

import math

import pytest
import torch

from cm3leon_lightning.generation.decoder import SamplingSpec, pick_tokens, process_logits
from cm3leon_lightning.generation.sampling import (
    allowed_ids,
    apply_temperature,
    cdk_logits,
    cfg_logits,
    constrain,
    dual_cfg_logits,
    image_segment_allowed,
    sample,
    sample_noise,
    top_k_filter,
    top_p_filter,
)
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

NEG = float("-inf")


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_temperature_divides_and_rejects_non_positive():
    x = torch.tensor([1.0, -2.0, 4.0])
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([0.5, -1.0, 2.0]))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(x, bad)


def test_top_k_keeps_the_k_largest():
    x = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert kept(top_k_filter(x, 2)[0]) == {1, 3}
    assert torch.equal(top_k_filter(x, 2)[0, [1, 3]], x[0, [1, 3]])  # kept logits unchanged
    assert torch.equal(top_k_filter(x, 9), x)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(x, 0)


def test_top_p_hand_example():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == {1}  # 0.5 alone reaches 0.5
    assert kept(top_p_filter(logits, 0.79)) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.79
    assert kept(top_p_filter(logits, 0.81)) == {1, 3, 2}
    assert kept(top_p_filter(logits, 0.96)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 0.01)) == {1}  # the most likely token always survives
    assert torch.equal(top_p_filter(logits, 0.79)[[1, 3]], logits[[1, 3]])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            top_p_filter(logits, bad)


def test_top_p_one_keeps_every_token_however_unlikely():
    """float32's running sum reaches 1.0 before the last tokens: p = 1 must not drop them (the fused sampling kernel
    skips the filter at 1, so eager and fused steps agree)."""
    logits = torch.tensor([20.0, 0.0, 0.0])  # the last two have probability 2e-9 each
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    wide = torch.randn(200, 1000, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(top_p_filter(wide, 1.0), wide)


def test_top_p_keeps_every_token_tied_with_the_last_one_needed():
    """Probabilities 0.4, 0.3, 0.3 at p = 0.6 need one 0.3: the sort order chose which (the lower id, whatever the
    order of the ids), so equal logits, common in bfloat16, were not sampled equally, and the fused kernel kept
    both. Both 0.3 are kept now; a tie above the boundary changes nothing."""
    for probs, want in (([0.3, 0.4, 0.3], {0, 1, 2}), ([0.3, 0.3, 0.4], {0, 1, 2}), ([0.1, 0.3, 0.3, 0.3], {1, 2, 3})):
        assert kept(top_p_filter(torch.tensor(probs, dtype=torch.float64).log(), 0.6)) == want
    assert kept(top_p_filter(torch.tensor([0.2, 0.4, 0.4]).log(), 0.6)) == {1, 2}
    x = (torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 2).bfloat16().float()
    out = top_p_filter(x, 0.9)
    floor = torch.where(out.isfinite(), x, float("inf")).amin(-1, keepdim=True)  # the least likely kept logit
    assert torch.equal(out.isfinite(), x >= floor)  # nothing at or above it dropped


def test_top_p_a_set_of_mass_exactly_p_takes_no_further_token():
    """0.75 alone reaches p = 0.75, but the softmax of log 0.75, log 0.25 gives 0.7499999999999999 and the second
    token was kept too; in float32, 9, 7, 5, 4, 4 of 32 reach 29/32 and the 2/32 token was kept as well."""
    assert kept(top_p_filter(torch.tensor([0.75, 0.25], dtype=torch.float64).log(), 0.75)) == {0}
    w = torch.tensor([7.0, 1.0, 9.0, 5.0, 4.0, 2.0, 4.0])
    assert kept(top_p_filter((w / 32).log(), 29 / 32)) == {0, 2, 3, 4, 6}
    assert kept(top_p_filter((w / 32).log(), 29 / 32 + 1e-4)) == {0, 2, 3, 4, 5, 6}  # just above: one more needed


@pytest.mark.parametrize("seed", range(5))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    for p in (0.1, 0.5, 0.9, 0.99):
        out = top_p_filter(logits, p)
        probs = logits.softmax(-1)
        for row in range(logits.shape[0]):
            keep = torch.isfinite(out[row])
            order = probs[row].argsort(descending=True)
            n_min = int((probs[row][order].cumsum(0) < p).sum()) + 1  # smallest prefix reaching p
            assert int(keep.sum()) == n_min
            assert probs[row][keep].sum() >= p - 1e-12
            dropped = probs[row][~keep]
            assert dropped.numel() == 0 or probs[row][keep].min() >= dropped.max()  # the top-ranked ones


def test_cfg_alpha_one_is_conditional_bit_for_bit_and_follows_eq_2():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))


def test_dual_guidance_reduces_to_the_full_stream_and_to_cfg():
    g = torch.Generator().manual_seed(1)
    full, img, none = (torch.randn(2, 30, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(dual_cfg_logits(full, img, none, 1.0, 1.0), full)
    # image scale equal to text scale: plain CFG between full and none
    torch.testing.assert_close(dual_cfg_logits(full, img, none, 2.5, 2.5), none + 2.5 * (full - none))
    torch.testing.assert_close(
        dual_cfg_logits(full, img, none, 7.5, 1.5), none + 1.5 * (img - none) + 7.5 * (full - img)
    )


def test_cdk_hand_computed_example():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)  # conditional (p_EXP)
    q = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1], dtype=torch.float64)  # unconditional (p_AMA)
    # k = 2: the 2nd largest p is 0.2; alpha 0.6 -> threshold 0.12 -> V = {0, 1, 2}
    out = cdk_logits(p.log() + 3.0, q.log() - 1.0, k=2, alpha=0.6)  # logits up to a constant
    assert kept(out) == {0, 1, 2}
    torch.testing.assert_close(out[:3], torch.tensor([math.log(0.5 / 0.4), math.log(2.0), math.log(0.5)]).double())
    assert int(out.argmax()) == 1  # the contrastive choice differs from greedy on p (token 0)
    # k = 1 is the original CD: threshold 0.6 * 0.5 = 0.3 keeps only token 0, i.e. greedy
    assert kept(cdk_logits(p.log(), q.log(), k=1, alpha=0.6)) == {0}
    # alpha 0 keeps everything; k larger than V is clipped
    assert kept(cdk_logits(p.log(), q.log(), k=99, alpha=0.0)) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="k"):
        cdk_logits(p.log(), q.log(), k=0, alpha=0.5)
    # alpha = 1 keeps the k largest; above 1 the set could be empty (every token -inf): refused
    assert kept(cdk_logits(p.log(), q.log(), k=2, alpha=1.0)) == {0, 1}
    for alpha in (1.2, 2.0, -0.1):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
            cdk_logits(p.log(), q.log(), k=1, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cdk_keeps_the_tokens_exactly_at_the_threshold(dtype):
    """Equation (3) keeps ``p >= alpha * p_k``. Probabilities 16/71 (the 2nd largest) and 14/71 at alpha = 0.875 are
    equal there, but ``log p`` and ``log p_k + log alpha`` rounded apart and the 14/71 token was dropped; 13/71 stays
    out. Likewise 10/73 against 0.625 * 16/73 with k = 1, whatever constant the logits carry."""
    cases = (([16, 19, 7, 14, 3, 12], 2, 0.875, {0, 1, 3}), ([5, 12, 15, 3, 16, 7, 10], 1, 0.625, {1, 2, 4, 6}))
    for w, k, alpha, want in cases:
        for shift in (0.0, 3.0, -7.5):
            cond = (torch.tensor(w, dtype=dtype) / sum(w)).log() + shift
            assert kept(cdk_logits(cond, torch.zeros_like(cond), k=k, alpha=alpha)) == want, (w, shift)
    below = (torch.tensor([16.0, 19.0, 7.0, 13.0], dtype=dtype) / 55).log()
    assert kept(cdk_logits(below, torch.zeros_like(below), k=2, alpha=0.875)) == {0, 1}


def test_cdk_plausible_set_survives_a_confident_expert_and_never_holds_impossible_tokens():
    """Equation (3) was checked in probabilities, ``p >= alpha * p_k``: with the k-th largest conditional probability
    below float32's smallest number (e^-120 here) both sides were 0, every token was plausible, and an implausible
    one (p = e^-300) that the unconditional stream finds even less likely won. A token of conditional probability 0
    is never plausible, even at ``alpha = 0`` (its score was ``-inf - -inf = NaN``)."""
    cond = torch.tensor([[0.0, -120.0, -300.0, -300.0]])
    uncond = torch.tensor([[0.0, 0.0, -400.0, 0.0]])
    out = cdk_logits(cond, uncond, k=2, alpha=0.5)
    assert kept(out[0]) == {0, 1}
    assert sample(out, None).tolist() == [0]
    assert kept(cdk_logits(cond, uncond, k=2, alpha=1.0)[0]) == {0, 1}  # the k largest, whatever their size
    assert kept(cdk_logits(cond, uncond, k=3, alpha=0.0)[0]) == {0, 1, 2, 3}
    impossible = torch.tensor([[0.0, NEG, 1.0]])
    for k, alpha in ((1, 0.0), (3, 0.5)):  # alpha 0, and a k-th largest probability of 0
        out = cdk_logits(impossible, impossible.clone(), k=k, alpha=alpha)
        assert not out.isnan().any() and kept(out[0]) == {0, 2}, (k, alpha)


VOCAB = MultimodalVocab(n_text=40, n_codes=24, grid_h=2, grid_w=3)  # size 64, padded 128


def test_modality_masks_are_exact_and_never_allow_padding_rows():
    image = allowed_ids(VOCAB, 128, "image")
    text = allowed_ids(VOCAB, 128, "text")
    assert set(torch.nonzero(image).flatten().tolist()) == set(range(40, 64))
    assert set(torch.nonzero(text).flatten().tolist()) == set(range(40)) - {VOCAB.pad_id, VOCAB.mask_id, 4}
    assert not (image | text)[64:].any()
    with pytest.raises(ValueError, match="modality"):
        allowed_ids(VOCAB, 128, "audio")
    with pytest.raises(ValueError, match="vocab_size"):
        allowed_ids(VOCAB, 50, "text")


def test_image_segment_ends_after_exactly_grid_h_times_grid_w_codes():
    allowed = image_segment_allowed(VOCAB, 128, torch.tensor([0, 5, 6]))  # (3, 128)
    assert set(torch.nonzero(allowed[0]).flatten().tolist()) == set(range(40, 64))
    assert torch.equal(allowed[0], allowed[1])
    enders = {VOCAB.eos_id, VOCAB.break_id, *VOCAB.sentinel_ids}
    assert set(torch.nonzero(allowed[2]).flatten().tolist()) == enders
    logits = torch.zeros(3, 128)
    assert set(constrain(logits, allowed)[2].isfinite().nonzero().flatten().tolist()) == enders


def test_sample_is_greedy_without_noise_reproducible_and_never_picks_removed_tokens():
    logits = torch.tensor([[0.0, 2.0, NEG, 1.0], [NEG, NEG, 0.0, NEG]])
    assert sample(logits, None).tolist() == [1, 2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n1, n2 = sample_noise((4000, 4), g1, "cpu"), sample_noise((4000, 4), g2, "cpu")
    assert torch.equal(n1, n2) and n1.min() > 0
    draws = sample(logits[:1].expand(4000, 4), n1)
    assert 2 not in draws.tolist()
    freq = torch.bincount(draws, minlength=4).double() / 4000
    torch.testing.assert_close(freq, logits[0].double().softmax(-1), atol=0.03, rtol=0)
    assert sample(logits[1:].expand(50, 4), n1[:50]).eq(2).all()


def test_process_logits_cfg_one_equals_the_conditional_stream_and_slices_the_range():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 128, generator=g)  # 2 streams x 3 rows
    cond_only = SamplingSpec(method="greedy", streams=1, lo=40, hi=64)
    guided = SamplingSpec(method="greedy", streams=2, cfg=1.0, lo=40, hi=64)
    assert torch.equal(process_logits(logits, guided), process_logits(logits[:3], cond_only))
    assert process_logits(logits, guided).shape == (3, 24)
    spec = SamplingSpec(method="top_p", streams=2, cfg=3.0, temperature=0.7, top_p=0.5, lo=40, hi=64)
    want = top_p_filter((logits[3:, 40:64] + 3.0 * (logits[:3, 40:64] - logits[3:, 40:64])) / 0.7, 0.5)
    got = process_logits(logits, spec)  # shifted by each row's best logit before the division: the same softmax
    assert torch.equal(got.isfinite(), want.isfinite()) and torch.equal(got.amax(-1), torch.zeros(3))
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))
    cdk = SamplingSpec(method="cd_k", streams=2, cdk_k=3, cdk_alpha=0.5, temperature=0, lo=40, hi=64)
    torch.testing.assert_close(process_logits(logits, cdk), cdk_logits(logits[:3, 40:64], logits[3:, 40:64], 3, 0.5))
    # logits of the sampled range only (what the decoder computes with logits_range) give the same result
    for s in (guided, spec, cdk):
        assert torch.equal(process_logits(logits[:, 40:64], s), process_logits(logits, s))


@pytest.mark.parametrize("temperature", [1e-40, 5e-324])
def test_a_tiny_temperature_draws_the_argmax_not_the_first_id(temperature):
    """``logits / T`` overflowed to +-inf below ~1e-38 in float32 (5e-324 rounds to 0): the softmax was NaN and every
    draw returned id ``lo`` (``<pad>`` when decoding text), whatever the logits. Tiny T now means the argmax."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 128, generator=g) * 3
    logits[2] -= 20  # a row whose logits are all negative (-inf after the division, not +inf)
    allowed = torch.ones(24, dtype=torch.bool)
    allowed[[0, 5, 7]] = False
    for constraint in (None, allowed):
        for method, streams in (("temperature", 2), ("top_p", 2), ("top_p", 1), ("cd_k", 2)):
            spec = SamplingSpec(method=method, streams=streams, cfg=2.0, temperature=temperature, top_k=5, lo=40, hi=64)
            greedy = SamplingSpec(method=method, streams=streams, cfg=2.0, temperature=0.0, lo=40, hi=64)
            rows = logits[: 3 * streams]
            want = pick_tokens(rows, greedy, constraint, None)
            assert (want != 40).all()  # the argmax is not the range's first id, which the NaN draw returned
            for draw in range(3):
                noise = sample_noise((3, 24), torch.Generator().manual_seed(draw), "cpu")
                assert torch.equal(pick_tokens(rows, spec, constraint, noise), want), (method, streams, draw)


def test_sampling_spec_rejects_bad_settings():
    for kwargs, match in (
        ({"method": "beam"}, "method"),
        ({"streams": 4}, "streams"),
        ({"method": "cd_k", "streams": 3}, "cd_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_p": 0.0}, "top_p"),
        ({"streams": 2, "cfg": float("nan")}, "cfg and image_cfg must be finite"),  # images came back, no error
        ({"streams": 3, "image_cfg": float("inf")}, "cfg and image_cfg must be finite"),
        ({"method": "cd_k", "streams": 2, "cdk_alpha": 2.0}, r"cdk_alpha in \[0, 1\]"),
        ({"lo": 5, "hi": 5}, "range"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingSpec(**{"lo": 0, "hi": 10, **kwargs})
