"""CIDErCallback and VQACallback inside trainer.validate of a tiny model, with default and overridden generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.eval_setup import micro_vqgan, shape_samples, tiny_module, tiny_tokenizer, trainer, val_loader

from cm3leon_lightning.callbacks import CIDErCallback, EvalSample, VQACallback, read_vqa_file
from cm3leon_lightning.metrics.cider import cider_d
from cm3leon_lightning.metrics.vqa import vqa_accuracy


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    return tok, micro_vqgan(), tiny_module(tok)


def coded_samples(n: int) -> list[EvalSample]:
    g = torch.Generator().manual_seed(0)
    caps = ["a red square", "a blue circle", "a green triangle", "a yellow square"]
    return [
        EvalSample(f"k{i}", [caps[i % 4], caps[(i + 1) % 4]], codes=torch.randint(0, 32, (64,), generator=g))
        for i in range(n)
    ]


def test_cider_callback_logs_cider_of_its_captions(parts, tmp_path: Path) -> None:
    tok, vqgan, module = parts
    samples = coded_samples(3)
    cb = CIDErCallback(samples=samples, text_tokenizer=tok, vqgan=vqgan, tokenizer="simple", max_new_tokens=6)
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    captions, refs = cb.metric.captions()
    assert len(captions) == 3 and refs == [s.references for s in samples]
    assert captions == cb.generate(module, torch.stack([s.codes for s in samples]), "", cb.seed)  # greedy: same
    assert out["val/cider"] == pytest.approx(cider_d(captions, refs, "simple")[0], abs=1e-6)


def test_text_callbacks_prompt_in_the_layout_they_are_given(parts) -> None:
    from cm3leon_lightning.generation import generate_text

    tok, vqgan, module = parts
    codes = torch.stack([s.codes for s in coded_samples(3)])
    instruction = "Question: what is it? Answer:"
    for layout in ("infill", "image_first"):
        cb = VQACallback(samples=vqa_samples(), text_tokenizer=tok, vqgan=vqgan, max_new_tokens=6, layout=layout)
        want = generate_text(
            module.model, module.vocab, codes, tok.encode(instruction), max_new_tokens=6, layout=layout
        )
        assert cb.generate(module, codes, instruction, cb.seed) == [tok.decode(i).strip() for i in want]
    with pytest.raises(ValueError, match="layout must be one of"):
        CIDErCallback(samples=coded_samples(1), text_tokenizer=tok, tokenizer="simple", layout="text_first")


def test_cider_callback_with_overridden_generation(parts, tmp_path: Path) -> None:
    class Oracle(CIDErCallback):
        def generate(self, pl_module, codes, instruction, seed):
            by_codes = {tuple(s.codes.tolist()): s.references[0] for s in self.samples}
            return [by_codes[tuple(c.tolist())] for c in codes]

    tok, vqgan, module = parts
    samples = coded_samples(4)
    cb = Oracle(samples=samples, text_tokenizer=tok, tokenizer="simple", batch_size=3)
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    want = cider_d([s.references[0] for s in samples], [s.references for s in samples], "simple")[0]
    assert out["val/cider"] == pytest.approx(want, abs=1e-6) and want > 1.0


def vqa_samples() -> list[EvalSample]:
    others = ["blue", "green", "white", "black", "pink", "gray", "orange", "purple", "brown", "tan"]
    return [
        EvalSample(f"q{k}", [], codes=torch.full((64,), k), question=f"what is {k}?", answers=["red"] * k + others[k:])
        for k in range(4)
    ]  # question k: k of 10 humans said "red"


def test_vqa_callback_overridden_generation_hand_values(parts, tmp_path: Path) -> None:
    class SaysRed(VQACallback):
        def generate(self, pl_module, codes, instruction, seed):
            assert instruction == [f"Q: what is {int(c[0])}? A:" for c in codes]
            return ["The Red."] * len(codes)

    tok, _, module = parts
    cb = SaysRed(samples=vqa_samples(), text_tokenizer=tok, official=False, prompt_template="Q: {question} A:")
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/vqa_acc"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1) / 4)
    cb = SaysRed(samples=vqa_samples(), text_tokenizer=tok, official=True, prompt_template="Q: {question} A:")
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/vqa_acc"] == pytest.approx((0 + 0.3 + 0.6 + 0.9) / 4)


def test_vqa_callback_default_generation_and_file(parts, tmp_path: Path) -> None:
    tok, vqgan, module = parts
    shapes = shape_samples(2)
    from PIL import Image

    Image.fromarray(shapes[0].image.permute(1, 2, 0).numpy()).save(tmp_path / "img0.png")
    entries = [
        {"question": "what color is it?", "image": "img0.png", "answers": ["red"] * 10},
        {"question": "what shape?", "codes": list(range(32)) * 2, "answers": ["square", "box"]},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(entries))
    samples = read_vqa_file(tmp_path / "vqa.json")
    assert samples[0].image.shape == (3, 256, 256) and samples[1].codes.shape == (64,)
    cb = VQACallback(data=str(tmp_path / "vqa.json"), text_tokenizer=tok, vqgan=vqgan, max_new_tokens=4)
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    codes = cb.codes_of(cb.samples, torch.device("cpu"))
    prompts = [f"Question: {s.question} Answer:" for s in cb.samples]
    answers = cb.generate(module, codes, prompts, cb.seed)
    want = sum(vqa_accuracy(a, s.answers) for a, s in zip(answers, cb.samples)) / 2
    assert out["val/vqa_acc"] == pytest.approx(want, abs=1e-6)
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="entry 0 needs"):
        read_vqa_file(tmp_path / "bad.json")


def test_vqa_file_in_sft_json_lines(tmp_path: Path) -> None:
    """The VQA lines of an instruction-tuning file read as VQA samples ('answer' as the one answer); others skip."""
    lines = [
        {"task": "caption", "image": "a.png", "caption": "a red circle"},
        {"task": "vqa", "codes": [1] * 64, "question": "what colour?", "answer": "red"},
        {"codes": [2] * 64, "question": "what shape?", "answers": ["circle", "round"]},
        {"task": "vqa", "codes": [3] * 64, "question": "where?"},
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    samples = read_vqa_file(tmp_path / "sft.jsonl", num_samples=2)
    assert [(s.key, s.question, s.answers) for s in samples] == [
        ("2", "what colour?", ["red"]),
        ("3", "what shape?", ["circle", "round"]),
    ]
    assert torch.equal(samples[0].codes, torch.ones(64, dtype=torch.long))
    with pytest.raises(ValueError, match="line 4 needs 'question', non-empty 'answers'"):
        read_vqa_file(tmp_path / "sft.jsonl")
    (tmp_path / "list.jsonl").write_text('{"codes": [1], "question": "q", "answer": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="list.jsonl: line 2 needs 'question'"):  # not a TypeError
        read_vqa_file(tmp_path / "list.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"codes": [1], "question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        read_vqa_file(tmp_path / "bad.jsonl")
