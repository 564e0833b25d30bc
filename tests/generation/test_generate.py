"""Decode loops: batched CFG equals separate forwards, KV-cached generation equals a no-cache reference token for
token (prompts of different lengths), seeds, modality constraints, infilling, and a tiny trained model that maps
captions to images and back."""

import os

import pytest
import torch
import torch.nn.functional as F

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation import Decoder, SamplingSpec, edit_image, generate_image, generate_text, infill
from cm3leon_lightning.generation.decoder import left_pad
from cm3leon_lightning.generation.generate import caption_prompt, image_prompt, unconditional_image_prompt
from cm3leon_lightning.model import ATTENTION_IMPLS, CM3Leon
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, Segment

VOCAB = MultimodalVocab(n_text=40, n_codes=24, grid_h=2, grid_w=3)  # text 0..39, images 40..63, padded 128
PROMPTS = [[20, 21, 22, 23, 24], [30], [25, 26]]  # different lengths -> left padding


def random_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> CM3Leon:
    """Every weight random (the paper's init zeroes the output layers, which would hide cache bugs)."""
    torch.manual_seed(seed)
    cfg = CM3LeonConfig.from_preset("tiny", vocab_size=VOCAB.padded_size, max_seq_len=64, **overrides)
    model = CM3Leon(cfg).eval().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# ------------------------------------------------------------------------------------------ no-cache references
def reference_image(model, vocab, prompt, cfg, uncond=None):
    """No cache, conditional and unconditional streams as two separate forwards, greedy, host sync every token."""
    cond, out = image_prompt(vocab, prompt), []
    uncond = list(uncond) if uncond is not None else unconditional_image_prompt(vocab)
    lo, hi = vocab.n_text, vocab.size
    for _ in range(vocab.image_tokens):
        lc = model(torch.tensor([cond]))[0, -1, lo:hi]
        lu = model(torch.tensor([uncond]))[0, -1, lo:hi]
        tok = int((lu + cfg * (lc - lu)).argmax()) + lo
        cond.append(tok)
        uncond.append(tok)
        out.append(tok - lo)
    return out


def reference_text(model, vocab, prompt, max_new):
    seq, out = list(prompt), []
    banned = {vocab.pad_id, vocab.mask_id, vocab.infill_id}
    for _ in range(max_new):
        logits = model(torch.tensor([seq]))[0, -1, : vocab.n_text].clone()
        logits[list(banned)] = float("-inf")
        tok = int(logits.argmax())
        if tok in (vocab.eos_id, vocab.break_id, *vocab.sentinel_ids):
            break
        seq.append(tok)
        out.append(tok)
    return out


# ------------------------------------------------------------------------------------------ equivalences
def test_batched_cfg_logits_equal_separate_forwards():
    model = random_model(dtype=torch.float32)
    cond = [image_prompt(VOCAB, p) for p in PROMPTS]
    rows = cond + [unconditional_image_prompt(VOCAB)] * len(PROMPTS)
    ids, mask = left_pad(rows, VOCAB.pad_id, torch.device("cpu"))
    model.setup_kv_cache(len(rows), ids.shape[1])
    with torch.no_grad():
        batched = model(ids, input_pos=torch.arange(ids.shape[1]), attention_mask=mask, last_only=True)[:, -1]
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cached_greedy_images_equal_the_no_cache_reference(cfg, attention):
    model = random_model()
    model.set_attention(attention)  # the reference's full forwards use SDPA either way
    got = generate_image(model, VOCAB, PROMPTS, num_samples=2, method="greedy", cfg=cfg, compile=False)
    assert got.codes.shape == (3, 2, VOCAB.image_tokens) and got.images is None
    with torch.no_grad():
        for p, prompt in enumerate(PROMPTS):
            want = reference_image(model, VOCAB, prompt, cfg)
            assert got.codes[p, 0].tolist() == want and got.codes[p, 1].tolist() == want


def test_kv_cached_greedy_text_equals_the_no_cache_reference():
    model = random_model(seed=1)
    images = [[0, 1, 2, 3, 4, 5], [23, 22, 21, 20, 19, 18]]
    instructions = [[30, 31, 32], [33]]
    got = generate_text(model, VOCAB, images, instructions, max_new_tokens=12, compile=False, check_every=3)
    with torch.no_grad():
        for img, instr, answer in zip(images, instructions, got):
            assert answer == reference_text(model, VOCAB, caption_prompt(VOCAB, img, instr), 12)
    assert any(len(a) > 0 for a in got)


def test_image_first_layout_continues_the_text_after_the_image():
    image, instruction = [0, 1, 2, 3, 4, 5], [30, 31]
    prompt = caption_prompt(VOCAB, image, instruction, layout="image_first")
    assert prompt == [VOCAB.eos_id, *(VOCAB.n_text + c for c in image), VOCAB.break_id, 30, 31]
    model = random_model(seed=2)
    images = [image, [23, 22, 21, 20, 19, 18]]
    got = generate_text(model, VOCAB, images, [instruction, []], max_new_tokens=10, compile=False, layout="image_first")
    with torch.no_grad():
        for img, instr, answer in zip(images, [instruction, []], got):
            assert answer == reference_text(model, VOCAB, caption_prompt(VOCAB, img, instr, "image_first"), 10)
    assert got != generate_text(model, VOCAB, images, [instruction, []], max_new_tokens=10, compile=False)
    with pytest.raises(ValueError, match="layout must be one of"):
        caption_prompt(VOCAB, image, layout="text_first")


def test_same_seed_same_samples_and_seeds_matter():
    model = random_model(seed=2, dtype=torch.float32)
    kwargs = dict(num_samples=4, method="top_p", cfg=3.0, temperature=1.5, top_p=0.95, compile=False)
    a = generate_image(model, VOCAB, PROMPTS, seed=7, **kwargs).codes
    b = generate_image(model, VOCAB, PROMPTS, seed=7, **kwargs).codes
    c = generate_image(model, VOCAB, PROMPTS, seed=8, **kwargs).codes
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.flatten(0, 1).tolist()}) > 1  # candidates differ from each other


def test_a_tiny_temperature_decodes_greedily():
    """Below ~1e-38 the float32 division by the temperature overflowed: every image code was 0 and every answer
    token ``<pad>``, which the text constraint forbids."""
    model = random_model(seed=2, dtype=torch.float32)
    images = [[0, 1, 2, 3, 4, 5], [23, 22, 21, 20, 19, 18]]
    greedy = generate_text(model, VOCAB, images, max_new_tokens=6, compile=False)
    tiny = generate_text(model, VOCAB, images, max_new_tokens=6, method="top_p", temperature=1e-40, seed=0,
                         compile=False)  # fmt: skip
    assert tiny == greedy and VOCAB.pad_id not in sum(tiny, [])
    for method in ("temperature", "top_p", "cd_k"):
        want = generate_image(model, VOCAB, PROMPTS, num_samples=2, method=method, temperature=0, compile=False).codes
        got = generate_image(model, VOCAB, PROMPTS, num_samples=2, method=method, temperature=1e-40, seed=0,
                             compile=False).codes  # fmt: skip
        assert torch.equal(got, want) and want.any(), method


@pytest.mark.parametrize("method", ["temperature", "top_p", "cd_k"])
def test_image_segments_hold_only_image_codes_of_the_right_count(method):
    model = random_model(seed=3, dtype=torch.float32)
    with torch.no_grad():  # make text ids win the unconstrained argmax, so the constraint has work to do
        model.wte.weight[: VOCAB.n_text] *= 4
        model.wte.weight[VOCAB.size :] *= 4
        ids, mask = left_pad([image_prompt(VOCAB, p) for p in PROMPTS], 0, torch.device("cpu"))
        assert not VOCAB.is_image_id(model(ids, attention_mask=mask)[:, -1].argmax(-1)).any()
    got = generate_image(model, VOCAB, PROMPTS, num_samples=3, method=method, temperature=2.0, seed=0, compile=False)
    assert got.codes.shape == (3, 3, 6)
    assert got.codes.min() >= 0 and got.codes.max() < VOCAB.n_codes
    answers = generate_text(model, VOCAB, got.codes[:, 0], max_new_tokens=6, method="top_p", seed=0, compile=False)
    banned = {VOCAB.pad_id, VOCAB.mask_id, VOCAB.infill_id}
    assert all(0 <= t < VOCAB.n_text and t not in banned for a in answers for t in a)


def test_retrieved_documents_change_the_prompt_and_editing_at_scales_1_samples_the_full_stream():
    model = random_model(seed=4)
    doc = [Segment.text([27, 28]), Segment.image(range(6))]
    assert image_prompt(VOCAB, [30], [doc]) == VOCAB.document_to_ids(doc) + [1, 30, 2]
    plain = generate_image(model, VOCAB, [[30]], method="greedy", cfg=1.0, compile=False).codes
    with_doc = generate_image(model, VOCAB, [[30]], retrieved=[[doc]], method="greedy", cfg=1.0, compile=False).codes
    assert not torch.equal(plain, with_doc)
    edited = edit_image(model, VOCAB, [list(range(6))], [[31, 32]], [20], text_cfg=1.0, image_cfg=1.0, method="greedy")
    assert model.kv_cache.batch_size == 1  # both scales 1: the full stream alone (it ran all three streams)
    full = [1, 20, 2, *range(40, 46), 2, 31, 32, 2]
    with torch.no_grad():  # both scales 1: the full stream alone, greedily, with no cache
        seq, want = list(full), []
        for _ in range(6):
            want.append(int(model(torch.tensor([seq]))[0, -1, 40:64].argmax()))
            seq.append(want[-1] + 40)
    assert edited.codes[0, 0].tolist() == want
    sampled = edit_image(model, VOCAB, [list(range(6))], [[31, 32]], [20], text_cfg=1.0, image_cfg=1.0, num_samples=2,
                         seed=5, compile=False)  # fmt: skip
    dec = Decoder(model, SamplingSpec(streams=1, lo=40, hi=64), [full] * 2, 6, seed=5, compile=False)
    assert torch.equal(sampled.codes[0], dec.run(dec.prefill(), 6) - 40)  # conditional sampling, draw for draw


def test_unconditional_streams_mask_the_condition_with_cm3_sentinels():
    """The CFG stream is ``<eos> <mask:0> <break>`` (what CM3 masking of a whole caption trains); editing masks the
    instruction as ``<mask:0>`` (image-only stream) and image + instruction as ``<mask:0>``, ``<mask:1>`` (none)."""
    assert unconditional_image_prompt(VOCAB) == [VOCAB.eos_id, VOCAB.sentinel_id(0), VOCAB.break_id]
    model = random_model(seed=2)
    # a custom unconditional stream (e.g. a model trained with caption dropout to <mask>) is used as given
    custom = [VOCAB.eos_id, VOCAB.mask_id, VOCAB.break_id]
    got = generate_image(model, VOCAB, [[30]], method="greedy", cfg=3.0, unconditional=custom, compile=False)
    assert got.codes[0, 0].tolist() == reference_image(model, VOCAB, [30], 3.0, uncond=custom)
    with pytest.raises(ValueError, match="unconditional"):
        generate_image(model, VOCAB, [[30]], unconditional=[VOCAB.eos_id, 500])
    # editing: dual guidance over the three streams, each a separate no-cache forward
    text_cfg, image_cfg = 2.0, 1.5
    edited = edit_image(model, VOCAB, [list(range(6))], [[31, 32]], [20], text_cfg=text_cfg, image_cfg=image_cfg,
                        method="greedy")  # fmt: skip
    head, image = [1, 20, 2], list(range(40, 46))
    s0, s1 = VOCAB.sentinel_id(0), VOCAB.sentinel_id(1)
    streams = [head + image + [2, 31, 32, 2], head + image + [2, s0, 2], head + [s0, 2, s1, 2]]
    want = []
    with torch.no_grad():
        for _ in range(6):
            full, img_only, none = (model(torch.tensor([st]))[0, -1, 40:64] for st in streams)
            tok = int((none + image_cfg * (img_only - none) + text_cfg * (full - img_only)).argmax())
            want.append(tok)
            streams = [st + [tok + 40] for st in streams]
    assert edited.codes[0, 0].tolist() == want


def test_infill_completes_image_spans_exactly_and_matches_captioning():
    model = random_model(seed=5)
    # image segment with 3 visible codes: the span gets exactly 3 codes
    body = [VOCAB.eos_id, 20, VOCAB.sentinel_id(0), 22, VOCAB.break_id, 40, 41, VOCAB.sentinel_id(1), 45]
    res = infill(model, VOCAB, body, compile=False)
    assert len(res.spans[1]) == 3 and all(VOCAB.is_image_id(t) for t in res.spans[1])
    assert all(0 <= t < VOCAB.n_text for t in res.spans[0])
    assert res.ids == [1, 20, *res.spans[0], 22, 2, 40, 41, *res.spans[1], 45]
    # span 1 was decoded after "<mask:1>" following span 0: check it against a no-cache greedy reference
    seq = body + [VOCAB.infill_id, VOCAB.sentinel_id(0), *res.spans[0], VOCAB.sentinel_id(1)]
    with torch.no_grad():
        for tok in res.spans[1]:
            assert int(model(torch.tensor([seq]))[0, -1, 40:64].argmax()) + 40 == tok
            seq.append(tok)
    # the captioning prompt is an infilling prompt: both paths agree
    image = [3, 1, 4, 1, 5, 9]
    masked = [VOCAB.eos_id, VOCAB.sentinel_id(0), VOCAB.break_id, *VOCAB.codes_to_ids(image).tolist()]
    caption = generate_text(model, VOCAB, [image], max_new_tokens=8, compile=False)[0]
    assert infill(model, VOCAB, masked, max_span_tokens=8, compile=False).spans[0] == caption
    # a whole masked image segment needs span_kinds
    whole = [VOCAB.eos_id, 20, VOCAB.break_id, VOCAB.sentinel_id(0)]
    assert len(infill(model, VOCAB, whole, span_kinds=["image"], compile=False).spans[0]) == 6


def test_clear_errors():
    model = random_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_image(model, VOCAB, [[20] * 60], compile=False)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        generate_image(model, MultimodalVocab(n_text=300, n_codes=24, grid_h=2, grid_w=3), [[20]])
    with pytest.raises(ValueError, match="method"):
        generate_image(model, VOCAB, [[20]], method="beam")
    with pytest.raises(ValueError, match="outside the allowed range"):
        generate_image(model, VOCAB, [[70]])
    with pytest.raises(ValueError, match="grid_h"):
        generate_text(model, VOCAB, [[1, 2, 3]])
    with pytest.raises(ValueError, match="sentinel"):
        infill(model, VOCAB, [1, 20, 21])
    with pytest.raises(ValueError, match="retrieved"):
        generate_image(model, VOCAB, [[20], [21]], retrieved=[[]])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        edit_image(model, VOCAB, [[1] * 6], [[20]], [21], num_samples=0)
    with pytest.raises(ValueError, match="at least one source image"):
        edit_image(model, VOCAB, [], [], [21])
    # both were 'every prompt must hold at least one token', a decoder detail
    with pytest.raises(ValueError, match="generate_text needs at least one image"):
        generate_text(model, VOCAB, torch.zeros(0, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional must hold at least one token"):
        generate_image(model, VOCAB, [[20]], unconditional=[])
    # image codes in an instruction or task prefix (a tokenizer larger than n_text) went into the prompt's text
    with pytest.raises(ValueError, match=r"instruction: id 50 is not a text id; text ids lie in \[0, 40\)"):
        generate_text(model, VOCAB, [[1] * 6], [20, 50])
    with pytest.raises(ValueError, match="instruction: id 63 is not a text id"):
        edit_image(model, VOCAB, [[1] * 6], [[63]], [21])
    with pytest.raises(ValueError, match="task_prefix: id 40 is not a text id"):
        edit_image(model, VOCAB, [[1] * 6], [[20]], [40])
    with pytest.raises(ValueError, match="edit_image: method must be"):  # named streams=2, which no caller passes
        edit_image(model, VOCAB, [[1] * 6], [[20]], [21], method="cd_k")


def test_errors_name_the_prompt_or_image_of_a_batch_and_the_decoder_argument():
    """A bad caption or image among many was reported without saying which ("text id 50 outside the allowed range
    [0, 40)", "an image has 5 codes"); a decoder for 0 new tokens failed with an IndexError."""
    model = random_model()
    with pytest.raises(ValueError, match=r"^prompts\[1\]: id 50 is not a text id"):
        generate_image(model, VOCAB, [[20], [21, 50]], compile=False)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: a text segment may not contain <eos> or <break>"):
        generate_image(model, VOCAB, [[20], [21, VOCAB.break_id]], compile=False)
    bad_doc = [Segment.text([27]), Segment.image(range(5))]
    with pytest.raises(ValueError, match=r"^prompts\[1\] / retrieved\[1\]: image segment"):
        generate_image(model, VOCAB, [[20], [21]], retrieved=[[], [bad_doc]], compile=False)
    with pytest.raises(ValueError, match=r"^images\[1\] has 5 codes; expected grid_h\*grid_w = 6"):
        generate_text(model, VOCAB, [[1] * 6, [1] * 5], compile=False)
    with pytest.raises(ValueError, match=r"^images\[0\]: image code 24 outside the allowed range \[0, 24\)"):
        generate_text(model, VOCAB, [[1] * 5 + [24]], compile=False)
    with pytest.raises(ValueError, match=r"^source\[1\] has 7 codes"):
        edit_image(model, VOCAB, [[1] * 6, [1] * 7], [[20], [21]], [22], compile=False)
    spec = SamplingSpec(method="greedy", streams=1, hi=VOCAB.size)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        Decoder(model, spec, [[1, 20]], 0, compile=False)
    dec = Decoder(model, spec, [[1, 20]], 4, compile=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        dec.run(dec.prefill(), 0)


def test_an_instruction_given_as_an_array_is_one_instruction():
    import numpy as np

    model, image = random_model(), [3, 1, 4, 1, 5, 9]
    want = generate_text(model, VOCAB, [image, image], [30, 31], max_new_tokens=4, compile=False)
    for instruction in (np.array([30, 31]), torch.tensor([30, 31])):
        assert generate_text(model, VOCAB, [image, image], instruction, max_new_tokens=4, compile=False) == want


CUDA = torch.cuda.is_available()
COMPILED_MODES = ["reduce-overhead", "graph", "inductor-graph"] if CUDA else ["inductor"]


TUNED_CASES = [("max-autotune", "sdpa"), ("reduce-overhead", "flex"), ("graph", "flex"), ("fused-graph", "sdpa"),
               ("fused-graph", "flex")]  # fmt: skip
TUNED_CASES = TUNED_CASES if CUDA else [("inductor", "flex")]


@pytest.mark.skipif(
    os.environ.get("CM3LEON_TEST_COMPILE") != "1" and not CUDA,
    reason="torch.compile of the step takes about a minute on 2 CPU cores; set CM3LEON_TEST_COMPILE=1",
)
@pytest.mark.parametrize("mode,attention", TUNED_CASES)
def test_autotuned_and_flex_decoding_equal_eager_sdpa(mode, attention):
    model = random_model(seed=7, dtype=torch.float32).to("cuda" if CUDA else "cpu")
    kwargs = dict(num_samples=2, method="top_p", cfg=3.0, seed=4)
    eager = generate_image(model, VOCAB, PROMPTS, compile=False, **kwargs).codes
    model.set_attention(attention)
    got = generate_image(model, VOCAB, PROMPTS, compile=mode, **kwargs).codes
    assert torch.equal(got, eager)


@pytest.mark.skipif(
    os.environ.get("CM3LEON_TEST_COMPILE") != "1" and not CUDA,
    reason="torch.compile of the step takes about a minute on 2 CPU cores; set CM3LEON_TEST_COMPILE=1",
)
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_compiled_and_graphed_steps_equal_eager(mode):
    device = "cuda" if CUDA else "cpu"
    model = random_model(seed=6, dtype=torch.float32).to(device)
    kwargs = dict(num_samples=2, method="top_p", cfg=3.0, seed=3)
    first = generate_image(model, VOCAB, PROMPTS, compile=mode, **kwargs).codes
    again = generate_image(model, VOCAB, PROMPTS, compile=mode, **kwargs).codes  # replays the captured step
    eager = generate_image(model, VOCAB, PROMPTS, compile=False, **kwargs).codes
    assert torch.equal(first, eager) and torch.equal(again, eager)
    text = dict(max_new_tokens=6, method="greedy")
    assert generate_text(model, VOCAB, eager[:, 0], compile=mode, **text) == generate_text(
        model, VOCAB, eager[:, 0], compile=False, **text
    )
    # infilling switches the text/image constraint between spans: each constraint gets its own graph
    body = [VOCAB.eos_id, 20, VOCAB.sentinel_id(0), 22, VOCAB.break_id, 40, 41, VOCAB.sentinel_id(1), 45]
    assert infill(model, VOCAB, body, compile=mode).ids == infill(model, VOCAB, body, compile=False).ids


# ------------------------------------------------------------------------------------------ a trained tiny model
TV = MultimodalVocab(n_text=32, n_codes=16, grid_h=2, grid_w=4)  # 13 special ids, text 13..31, images 32..47
CAPTIONS = [[13, 14, 15], [16, 17], [18, 19, 20, 21], [22, 14]]
IMAGES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 8, 9, 9, 10, 10, 11, 11], [15, 14, 13, 12, 3, 2, 1, 0], [5] * 4 + [7] * 4]


def training_rows() -> list[list[int]]:
    """Per pair: text-to-image ``<eos> caption <break> image <eos>``, the caption-infill form cm3_infill gives
    when it masks the whole caption (its ``<eos> <mask:0> <break> image`` prefix is CFG's unconditional stream),
    and the image-infill form (the whole image masked)."""
    rows = []
    for cap, img in zip(CAPTIONS, IMAGES):
        ids = TV.codes_to_ids(img).tolist()
        rows.append(TV.example_to_ids([], [Segment.text(cap), Segment.image(img)]))
        rows.append([TV.eos_id, TV.sentinel_id(0), TV.break_id, *ids, TV.infill_id, TV.sentinel_id(0), *cap, TV.eos_id])
        rows.append([TV.eos_id, *cap, TV.break_id, TV.sentinel_id(0), TV.infill_id, TV.sentinel_id(0), *ids, TV.eos_id])
    return rows


@pytest.fixture(scope="module")
def trained() -> CM3Leon:
    torch.manual_seed(0)
    cfg = CM3LeonConfig.from_preset("tiny", vocab_size=TV.padded_size, max_seq_len=32, d_model=32, d_ff=128)
    model = CM3Leon(cfg)
    rows = training_rows()
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [TV.pad_id] * (width - len(r)) for r in rows])  # right-padded
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread avoids oversubscription on a shared machine (~3 s)
    try:
        for _ in range(250):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), ignore_index=TV.pad_id)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_trained_model_draws_each_caption_s_image_greedily(trained, cfg):
    got = generate_image(trained, TV, CAPTIONS, num_samples=2, method="greedy", cfg=cfg, compile=False)
    assert got.codes.tolist() == [[img, img] for img in IMAGES]


def test_trained_model_captions_each_image_back(trained):
    assert generate_text(trained, TV, IMAGES, max_new_tokens=8, compile=False) == CAPTIONS


def test_cache_made_in_inference_mode_is_not_reused_outside_it() -> None:
    """A cache allocated under torch.inference_mode (as inside trainer.validate) is replaced, not updated in place."""
    vocab = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=2)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", vocab_size=vocab.padded_size)).eval()
    with torch.inference_mode():
        first = generate_image(model, vocab, [[10, 11]], method="greedy", cfg=1.0, compile=False).codes
    assert model.kv_cache.layer(0)[0].is_inference()
    with torch.no_grad():
        second = generate_image(model, vocab, [[10, 11]], method="greedy", cfg=1.0, compile=False).codes
    assert not model.kv_cache.layer(0)[0].is_inference()
    assert torch.equal(first, second)
