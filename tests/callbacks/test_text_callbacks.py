"""CIDErCallback and VQACallback inside trainer.validate of a tiny model, with default and overridden generation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from support.eval_setup import micro_vqgan, shape_samples, tiny_module, tiny_tokenizer, trainer, val_loader

from cm3leon_lightning.callbacks import CIDErCallback, EvalSample, SampleLoggerCallback, VQACallback, read_vqa_file
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
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
        read_vqa_file(tmp_path / "bad.jsonl")
    # a question holding U+2028 (valid unescaped in JSON) was split in two lines by str.splitlines()
    (tmp_path / "sep.jsonl").write_text(json.dumps({"codes": [1], "question": "q\u2028r", "answer": "a"},
                                                   ensure_ascii=False) + "\n", encoding="utf-8")  # fmt: skip
    assert [s.question for s in read_vqa_file(tmp_path / "sep.jsonl")] == ["q\u2028r"]


def test_vqa_file_errors_name_the_file_and_entry(tmp_path: Path) -> None:
    """Bad JSON, an undecodable image and bad codes name the file (and entry); they were bare library errors."""
    (tmp_path / "broken.json").write_text('[{"question": "q",}]')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON: Expecting property name"):
        read_vqa_file(tmp_path / "broken.json")  # was a JSONDecodeError naming no file
    (tmp_path / "img.jpg").write_bytes(b"not an image")
    ok = {"question": "q", "codes": [1, 2], "answers": ["a"]}
    (tmp_path / "vqa.json").write_text(json.dumps([ok, {"question": "q", "image": "img.jpg", "answers": ["a"]}]))
    with pytest.raises(ValueError, match=r"vqa.json: entry 1: cannot read image .*img.jpg \(cannot identify"):
        read_vqa_file(tmp_path / "vqa.json")  # was PIL's "cannot identify image file <_io.BytesIO ...>"
    (tmp_path / "vqa.json").write_text(json.dumps([ok, {**ok, "codes": [[1, 2], [3]]}]))
    with pytest.raises(ValueError, match=r"vqa.json: entry 1: 'codes' must be a list of integers"):
        read_vqa_file(tmp_path / "vqa.json")
    (tmp_path / "vqa.json").write_text(json.dumps([{"question": "q", "image": "gone.jpg", "answers": ["a"]}]))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        read_vqa_file(tmp_path / "vqa.json")


class AnswersRight(VQACallback):
    """Answers every question with its first human answer; counts generate calls."""

    calls = 0

    def generate(self, pl_module, codes, instruction, seed):
        type(self).calls += 1
        by_prompt = {self.prompt_template.format(question=s.question): s.answers[0] for s in self.samples}
        return [by_prompt[i] for i in instruction]


@pytest.mark.parametrize("official", [True, False])
def test_vqa_callback_scores_one_answer_lines_by_exact_match(parts, tmp_path: Path, official: bool) -> None:
    tok, _, module = parts
    lines = [
        {"task": "vqa", "codes": [1] * 64, "question": "what colour?", "answer": "red"},
        {"task": "vqa", "codes": [2] * 64, "question": "what shape?", "answer": "circle"},
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cb = AnswersRight(data=str(tmp_path / "sft.jsonl"), text_tokenizer=tok, official=official)
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert out["val/vqa_acc"] == 1.0  # was 1/3 (official=False) or an error after generating (official=True)


def test_vqa_callback_checks_answers_before_generating(parts, tmp_path: Path) -> None:
    tok, _, module = parts
    AnswersRight.calls = 0
    bad = [*vqa_samples(), EvalSample("q9", [], codes=torch.zeros(64, dtype=torch.long), question="q", answers="red")]
    cb = AnswersRight(samples=bad, text_tokenizer=tok)
    with pytest.raises(ValueError, match="sample 'q9' needs a question and a non-empty list of answer strings"):
        trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    assert AnswersRight.calls == 0


@pytest.mark.parametrize("template", ['Q: {question} as JSON {"a": 1}', "Q: {question} {0}", "Q: {question} {"])
def test_bad_prompt_template_is_refused_at_construction(parts, template: str) -> None:
    tok, _, _ = parts
    with pytest.raises(ValueError, match="prompt_template .* does not format with a question"):
        VQACallback(samples=vqa_samples(), text_tokenizer=tok, prompt_template=template)
    cb = VQACallback(samples=vqa_samples(), text_tokenizer=tok, prompt_template='{question} as JSON {{"a": 1}}')
    assert cb.prompt_template.format(question="q") == 'q as JSON {"a": 1}'


def test_two_callbacks_of_one_class_run_and_restore_their_own_state(parts, tmp_path: Path) -> None:
    tok, _, module = parts

    def pair() -> list[VQACallback]:
        return [
            AnswersRight(samples=vqa_samples(), text_tokenizer=tok, log_name="val/vqav2_acc"),
            AnswersRight(samples=vqa_samples()[1:], text_tokenizer=tok, log_name="val/vizwiz_acc"),
        ]

    first = pair()
    t = trainer(tmp_path, first)
    out = t.validate(module, val_loader(module.vocab), verbose=False)[0]
    # The first human answer of question k is said by max(k, 1) humans (official: 0.3, 0.3, 0.6, 0.9).
    assert out["val/vqav2_acc"] == pytest.approx((0.3 + 0.3 + 0.6 + 0.9) / 4)
    assert out["val/vizwiz_acc"] == pytest.approx((0.3 + 0.6 + 0.9) / 3)
    first[0]._val_epochs, first[1]._val_epochs = 5, 8
    t.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert states == {
        "AnswersRight{'log_name': 'val/vqav2_acc'}": {"val_epochs": 5},
        "AnswersRight{'log_name': 'val/vizwiz_acc'}": {"val_epochs": 8},
    }
    second = pair()
    trainer(tmp_path, second).validate(module, val_loader(module.vocab), ckpt_path=tmp_path / "two.ckpt", verbose=False)
    assert [cb._val_epochs for cb in second] == [6, 9]  # restored, plus this validation epoch
    loggers = [SampleLoggerCallback(tag=tag, text_tokenizer=tok) for tag in ("samples", "samples_ema")]
    assert [cb.state_key for cb in loggers] == [
        "SampleLoggerCallback{'tag': 'samples'}",
        "SampleLoggerCallback{'tag': 'samples_ema'}",
    ]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # Lightning looks up state_key only
def test_checkpoint_from_before_state_keys_still_restores(parts, tmp_path: Path) -> None:
    tok, _, module = parts
    t = trainer(tmp_path, [AnswersRight(samples=vqa_samples(), text_tokenizer=tok)])
    t.validate(module, val_loader(module.vocab), verbose=False)
    t.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    ckpt["callbacks"] = {"AnswersRight": {"val_epochs": 4}}  # the key the class name alone gave
    torch.save(ckpt, tmp_path / "old.ckpt")
    cb = AnswersRight(samples=vqa_samples(), text_tokenizer=tok)
    trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), ckpt_path=tmp_path / "old.ckpt", verbose=False)
    assert cb._val_epochs == 5


@pytest.mark.parametrize("kind", ["cider", "vqa"])
def test_text_callbacks_update_on_a_rank_without_samples_and_use_the_module_device(parts, kind: str) -> None:
    from types import SimpleNamespace

    tok, _, module = parts
    if kind == "cider":
        cb = CIDErCallback(samples=coded_samples(1), text_tokenizer=tok, tokenizer="simple")
    else:
        cb = VQACallback(samples=vqa_samples()[:1], text_tokenizer=tok)
    moved, to = [], cb.metric.to
    cb.metric.to = lambda device: moved.append(device) or to(device)
    rank1_of_2 = SimpleNamespace(global_rank=1, world_size=2)  # samples[1::2] is empty
    with pytest.raises(RuntimeError, match="before any update"):  # one process: nobody has samples to score
        cb.evaluate(rank1_of_2, module)
    assert cb.metric.update_count == 1  # updated with nothing, so its states sync like the other ranks'
    assert moved == [module.device]


def test_the_manifests_tokenizer_is_found_beside_it_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cm3leon prepare`` records ``text_tokenizer.path`` relative to the manifest (``tokenizer.json`` beside it);
    the callbacks' default (``text_tokenizer: null`` in configs/callbacks/*.yaml) read it from the working directory
    and failed at the first validation. A tokenizer there that is not the recorded one is refused."""
    from types import SimpleNamespace

    from support.eval_setup import write_eval_data

    from cm3leon_lightning.data.datamodule import CM3LeonDataModule
    from cm3leon_lightning.tokenization.text import TextTokenizer

    paths = write_eval_data(tmp_path / "data")
    val = Path(paths["val"])
    manifest = json.loads((val / "manifest.json").read_text())
    manifest["text_tokenizer"]["path"] = "tokenizer.json"  # as cm3leon prepare writes it
    (val / "manifest.json").write_text(json.dumps(manifest))
    (val / "tokenizer.json").write_bytes(Path(paths["tokenizer"]).read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = CM3LeonDataModule(val_data="../data/val", seq_len=128)
    assert data.manifest.text_tokenizer_path() == str(Path("..") / "data" / "val" / "tokenizer.json")
    tok = CIDErCallback(num_samples=2).load_text_tokenizer(SimpleNamespace(datamodule=data))
    assert tok.sha256 == manifest["text_tokenizer"]["sha256"]
    other = TextTokenizer.train(["a different corpus entirely"] * 10, vocab_size=300)
    other.save(val / "other")
    (val / "tokenizer.json").write_bytes((val / "other" / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match=r"tokenizer at \.\./data/val/tokenizer\.json .* is not the one"):
        SampleLoggerCallback(prompts=["x"]).load_text_tokenizer(SimpleNamespace(datamodule=data))


@pytest.mark.parametrize(
    "answers, hint",
    [
        ("red", r"got 'red'$"),  # was read as the answers 'r', 'e', 'd'
        ([{"answer": "red", "answer_id": 1}], r"got \[\{'answer': 'red', 'answer_id': 1\}\] \(use each record's"),
        (["red", ["blue"]], r"got \['red', \['blue'\]\]$"),
    ],
)
def test_vqa_file_refuses_answers_that_are_not_strings(tmp_path: Path, answers, hint: str) -> None:
    (tmp_path / "vqa.json").write_text(json.dumps([{"question": "q", "codes": [1], "answers": ["red", 2, 2.5]}]))
    assert read_vqa_file(tmp_path / "vqa.json")[0].answers == ["red", "2", "2.5"]  # numbers read as text
    (tmp_path / "vqa.json").write_text(json.dumps([{"question": "q", "codes": [1], "answers": ["red"]}] * 2))
    entries = json.loads((tmp_path / "vqa.json").read_text())
    entries[1]["answers"] = answers
    (tmp_path / "vqa.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"vqa.json: entry 1: 'answers' must be a list of answer strings, " + hint):
        read_vqa_file(tmp_path / "vqa.json")
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"question": "q", "codes": [1], "answers": answers}) + "\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl: line 1: 'answers' must be a list of answer strings"):
        read_vqa_file(tmp_path / "vqa.jsonl")


def test_empty_evaluation_sets_are_refused_before_generating(parts, tmp_path: Path) -> None:
    tok, _, module = parts
    AnswersRight.calls = 0
    (tmp_path / "sft.jsonl").write_text(json.dumps({"task": "caption", "codes": [1] * 64, "caption": "a cat"}) + "\n")
    cb = AnswersRight(data=str(tmp_path / "sft.jsonl"), text_tokenizer=tok)
    with pytest.raises(ValueError, match=r"sft.jsonl holds no VQA questions"):  # was 'compute() before update()'
        trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    with pytest.raises(ValueError, match=r"VQACallback: the evaluation set is empty \(samples=\[\]\)"):
        trainer(tmp_path, [AnswersRight(samples=[], text_tokenizer=tok)]).validate(
            module, val_loader(module.vocab), verbose=False
        )
    assert AnswersRight.calls == 0


class CaptionsCounted(CIDErCallback):
    """Captions every image 'a cat'; counts generate calls."""

    calls = 0

    def generate(self, pl_module, codes, instruction, seed):
        type(self).calls += 1
        return ["a cat"] * len(codes)


@pytest.mark.parametrize("references", ["a red square", [], ["a cat", None]])
def test_cider_callback_checks_references_before_generating(parts, tmp_path: Path, references) -> None:
    tok, _, module = parts
    CaptionsCounted.calls = 0
    bad = [*coded_samples(2), EvalSample("k9", references, codes=torch.zeros(64, dtype=torch.long))]
    cb = CaptionsCounted(samples=bad, text_tokenizer=tok, tokenizer="simple")
    with pytest.raises(ValueError, match=r"sample 'k9' needs a non-empty list of reference captions, got "):
        trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    assert CaptionsCounted.calls == 0


@pytest.mark.parametrize("kind", ["cider", "vqa"])
def test_text_callback_batches_and_seeds_do_not_depend_on_the_device_count(parts, kind: str) -> None:
    """Ranks take whole batches of the one-device run, seeded by their first item's index: every batch used the same
    seed (sampled captions repeated their random draws) and the batches changed with the number of devices."""
    from types import SimpleNamespace

    tok, _, module = parts
    base = CIDErCallback if kind == "cider" else VQACallback

    class Recording(base):
        def generate(self, pl_module, codes, instruction, seed):
            self.calls.append((codes[:, 0].tolist(), seed))
            return ["red"] * len(codes)

    def calls(rank: int, world_size: int) -> list:
        samples = coded_samples(7) if kind == "cider" else vqa_samples() + vqa_samples()[:3]
        extra = {"tokenizer": "simple"} if kind == "cider" else {}
        cb = Recording(samples=samples, text_tokenizer=tok, batch_size=3, seed=5, **extra)
        cb.calls = []
        cb.evaluate(SimpleNamespace(global_rank=rank, world_size=world_size), module)
        return cb.calls

    single = calls(0, 1)
    assert [seed for _, seed in single] == [5, 8, 11]
    assert sorted(calls(0, 2) + calls(1, 2), key=lambda c: c[1]) == single


def test_cider_and_sample_logger_refuse_shard_lists_naming_val_data(parts, tmp_path: Path) -> None:
    """The data module takes shard lists; CIDEr and the sample logger took the list's first entry, a .tar, and failed
    to read it as a manifest (or read one of several). They now say what to give, as FIDCallback does."""
    from types import SimpleNamespace

    from support.eval_setup import write_eval_data

    tok, _, module = parts
    val = write_eval_data(tmp_path / "data", n_train=2, n_val=4)["val"]
    shards = sorted(str(p) for p in Path(val).glob("*.tar"))
    stub = SimpleNamespace(datamodule=SimpleNamespace(hparams={"val_data": shards}))
    for cb in (
        CIDErCallback(text_tokenizer=tok, tokenizer="simple"),
        SampleLoggerCallback(prompts=["x"], text_tokenizer=tok, num_caption_images=2),
    ):
        with pytest.raises(ValueError, match=r"the data module's val_data .* give data=<prepared dataset directory"):
            cb.setup(stub, module, "validate")
    cb = CIDErCallback(text_tokenizer=tok, tokenizer="simple", num_samples=2)
    cb.setup(SimpleNamespace(datamodule=SimpleNamespace(hparams={"val_data": [val]})), module, "validate")
    assert len(cb.samples) == 2


def test_cider_callback_warns_when_every_image_has_one_reference(parts) -> None:
    """Validation shards of the default `--coco-mode first` hold one caption per image: the CIDEr-D of one
    reference is far from COCO's five-reference figure, and passed without a word."""
    import warnings

    tok, _, module = parts
    single = [EvalSample(s.key, s.references[:1], codes=s.codes) for s in coded_samples(3)]
    cb = CaptionsCounted(samples=single, text_tokenizer=tok, tokenizer="simple")
    with pytest.warns(UserWarning, match=r"each of the 3 evaluation images has one reference caption, so val/cider"):
        cb.setup(None, module, "validate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CaptionsCounted(samples=coded_samples(3), text_tokenizer=tok, tokenizer="simple").setup(None, module, "fit")


def spy_instructions(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the ``instruction`` of every ``generate_text`` call the callbacks make (returned list)."""
    import cm3leon_lightning.generation as generation

    seen, real = [], generation.generate_text

    def spy(model, vocab, codes, instruction=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(instruction)
        return real(model, vocab, codes, instruction, **kwargs)

    monkeypatch.setattr(generation, "generate_text", spy)
    return seen


def test_instructions_and_questions_are_tokenized_as_the_training_captions(parts, tmp_path: Path, monkeypatch) -> None:
    """An instruction or a VQA question with a newline, a tab or a doubled space (VQA files hold them) was tokenized
    as given, though ``cm3leon prepare`` cleans the rendered SFT template ("Question: {question} Answer: ...") of
    them; now the prompt's ids are those of the cleaned text. Blank instructions and questions are refused naming
    the argument, the sample or the file entry; a null question was asked as "Question: None Answer:"."""
    tok, vqgan, module = parts
    seen = spy_instructions(monkeypatch)
    codes = torch.stack([s.codes for s in coded_samples(2)])
    cb = CIDErCallback(samples=coded_samples(2), text_tokenizer=tok, tokenizer="simple", max_new_tokens=2,
                       instruction="what color\tis it?\n")  # fmt: skip
    assert cb.instruction == "what color is it?"
    cb.generate(module, codes, "what  color is it? ", cb.seed)
    cb.generate(module, codes, ["Question: what is 1?\n Answer: ", "Question:  what is 2? Answer:"], cb.seed)
    questions = [tok.encode("Question: what is 1? Answer:"), tok.encode("Question: what is 2? Answer:")]
    assert seen == [tok.encode("what color is it?"), questions]
    assert tok.encode("what  color is it? ") != seen[0]

    seen.clear()
    samples = vqa_samples()[:2]
    samples[1] = dataclasses.replace(samples[1], question="what\tis 1?\r\n")
    vqa = VQACallback(samples=samples, text_tokenizer=tok, max_new_tokens=2)
    trainer(tmp_path, [vqa]).validate(module, val_loader(module.vocab), verbose=False)
    assert seen == [[tok.encode("Question: what is 0? Answer:"), tok.encode("Question: what is 1? Answer:")]]

    with pytest.raises(ValueError, match=r"^CIDErCallback: instruction: the instruction holds no text \(only white"):
        CIDErCallback(samples=coded_samples(1), text_tokenizer=tok, tokenizer="simple", instruction=" \n")
    samples[1] = dataclasses.replace(samples[1], question="\t\x00")
    with pytest.raises(ValueError, match=r"^VQACallback: sample 'q1': the question holds no text"):
        VQACallback(samples=samples, text_tokenizer=tok).setup(None, module, "validate")
    ok = {"codes": [1] * 64, "answers": ["a"]}
    for question, message in ((None, r"entry 1: 'question' must be a string, got None"),
                              (" \n", r"entry 1: 'question' holds no text")):  # fmt: skip
        (tmp_path / "vqa.json").write_text(json.dumps([{**ok, "question": "q"}, {**ok, "question": question}]))
        with pytest.raises(ValueError, match=rf"vqa.json: {message}"):
            read_vqa_file(tmp_path / "vqa.json")


def test_an_empty_instruction_among_several_is_plain_captioning(parts, monkeypatch) -> None:
    """Found in review: ``generate`` with one instruction per image refused an empty one ("instruction[0]: the
    instruction holds no text"), though an empty one is plain captioning, as it was before prompts were cleaned."""
    tok, _, module = parts
    seen = spy_instructions(monkeypatch)
    cb = CIDErCallback(samples=coded_samples(2), text_tokenizer=tok, tokenizer="simple", max_new_tokens=2)
    answers = cb.generate(module, torch.stack([s.codes for s in coded_samples(2)]), ["", "what\tis it? "], cb.seed)
    assert seen == [[[], tok.encode("what is it?")]] and len(answers) == 2
    with pytest.raises(ValueError, match=r"^instruction\[1\]: the instruction holds no text"):
        cb.generate(module, torch.stack([s.codes for s in coded_samples(2)]), ["", " \n"], cb.seed)


def test_vqa_images_without_codes_need_a_vqgan_at_setup_and_may_differ_in_size(parts, tmp_path: Path) -> None:
    """Questions about images without codes and no VQGAN failed at the first validation end, after the training
    steps before it; in-memory images of two sizes failed there too (``torch.stack``). Now setup names the sample, and
    images are brought to the VQGAN's size."""
    tok, vqgan, module = parts
    shapes = shape_samples(1) + shape_samples(1, size=32, seed=1)
    qs = [EvalSample(f"q{i}", [], s.image, None, "what color is it?", ["red"]) for i, s in enumerate(shapes)]
    with pytest.raises(ValueError, match=r"^VQACallback: give vqgan \(a VQGAN .*\) to encode the image of sample 'q0'"):
        VQACallback(samples=qs, text_tokenizer=tok).setup(None, module, "fit")
    blank = [dataclasses.replace(qs[0], image=None)]
    with pytest.raises(ValueError, match=r"^VQACallback: sample 'q0' has neither codes nor an image"):
        VQACallback(samples=blank, text_tokenizer=tok, vqgan=vqgan).setup(None, module, "fit")
    cb = VQACallback(samples=qs, text_tokenizer=tok, vqgan=vqgan, max_new_tokens=2)
    out = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert [tuple(s.image.shape) for s in cb.samples] == [(3, 16, 16), (3, 16, 16)] and 0 <= out["val/vqa_acc"] <= 1
    # CIDErCallback had the same two failures at the first validation end
    caps = [EvalSample(f"c{i}", ["a red shape"], s.image, None) for i, s in enumerate(shapes)]
    with pytest.raises(
        ValueError, match=r"^CIDErCallback: give vqgan \(a VQGAN .*\) to encode the image of sample 'c0'"
    ):
        CIDErCallback(samples=caps, text_tokenizer=tok, tokenizer="simple").setup(None, module, "fit")
    with pytest.raises(ValueError, match=r"^CIDErCallback: sample 'c0' has neither codes nor an image"):
        CIDErCallback(samples=[dataclasses.replace(caps[0], image=None)], text_tokenizer=tok, tokenizer="simple",
                      vqgan=vqgan).setup(None, module, "fit")  # fmt: skip
    cider = CIDErCallback(samples=caps, text_tokenizer=tok, tokenizer="simple", vqgan=vqgan, max_new_tokens=2)
    out = trainer(tmp_path, [cider]).validate(module, val_loader(module.vocab), verbose=False)[0]
    assert [tuple(s.image.shape) for s in cider.samples] == [(3, 16, 16), (3, 16, 16)] and out["val/cider"] >= 0


def test_a_fit_that_does_not_validate_is_warned_about_before_training(parts, tmp_path: Path) -> None:
    """Found in review: a fit without validation data (``cm3leon fit`` with no ``val_data``) or with
    ``limit_val_batches=0`` never reaches a validation end, so the callbacks logged nothing, without a word."""
    import warnings

    import lightning as L
    from support.eval_setup import write_eval_data

    from cm3leon_lightning.data.datamodule import CM3LeonDataModule

    tok, _, module = parts
    train = write_eval_data(tmp_path / "data", n_train=4, n_val=2)["train"]

    def fit_warnings(limit_val_batches: int | None = None, **data) -> list[str]:
        run = L.Trainer(accelerator="cpu", max_steps=1, logger=False, limit_val_batches=limit_val_batches,
                        callbacks=[AnswersRight(samples=vqa_samples(), text_tokenizer=tok)], num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))  # fmt: skip
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run.fit(module, **data)
        return [str(w.message) for w in seen if "evaluates at the end of validation epochs" in str(w.message)]

    start = "AnswersRight evaluates at the end of validation epochs, but this fit does not validate"
    no_data = f"{start} (it has no validation data): it will log nothing. Give the data module a val_data"
    train_only = CM3LeonDataModule(train_data=train, seq_len=128, num_workers=0)
    assert [m[: len(no_data)] for m in fit_warnings(datamodule=train_only)] == [no_data]
    assert [m[: len(no_data)] for m in fit_warnings(train_dataloaders=val_loader(module.vocab))] == [no_data]
    loaders = {"train_dataloaders": val_loader(module.vocab), "val_dataloaders": val_loader(module.vocab)}
    assert [m.split(":")[0] for m in fit_warnings(0, **loaders)] == [f"{start} (limit_val_batches is 0)"]
    assert fit_warnings(**loaders) == []  # it validates: no warning


def test_caption_arguments_the_vqa_and_sample_callbacks_ignore_are_refused(parts) -> None:
    """Found in review: ``VQACallback(instruction=...)`` (listed by ``cm3leon fit --help`` through ``**kwargs``) and
    ``SampleLoggerCallback(log_name=..., group_by_image=...)`` were accepted and ignored; ``tokenizer`` failed with
    "CIDErCallback.__init__() got multiple values". They are refused naming them, and gone from the CLI."""
    from jsonargparse import ArgumentParser

    tok, _, _ = parts
    with pytest.raises(ValueError, match=r"^VQACallback: instruction is not used \(the prompt is prompt_template;"):
        VQACallback(samples=vqa_samples(), text_tokenizer=tok, instruction="Answer in one word.")
    with pytest.raises(ValueError, match=r"^VQACallback: group_by_image, tokenizer are not used \("):
        VQACallback(samples=vqa_samples(), text_tokenizer=tok, group_by_image=True, tokenizer="ptb")
    with pytest.raises(ValueError, match=r"^SampleLoggerCallback: log_name is not used \(.* logged under tag\)"):
        SampleLoggerCallback(prompts=["x"], text_tokenizer=tok, log_name="val/samples")
    cb = SampleLoggerCallback(prompts=["x"], text_tokenizer=tok, instruction="Describe it.", max_new_tokens=3)
    assert (cb.instruction, cb.decoding["max_new_tokens"]) == ("Describe it.", 3)  # used for the captions
    for cls, gone in ((VQACallback, {"instruction", "group_by_image", "tokenizer"}),
                      (SampleLoggerCallback, {"group_by_image", "log_name", "tokenizer"})):  # fmt: skip
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "cb")
        options = {a.dest.removeprefix("cb.") for a in parser._actions if a.dest.startswith("cb.")}
        assert not gone & options and {"temperature", "top_p", "max_new_tokens"} <= options, cls


def test_vqa_callback_official_references_reproduce_the_script(parts, tmp_path: Path) -> None:
    """The callback could not score as ``vqaEval.py`` does (human answers only punctuation-normalised): its metric
    always normalised them fully."""
    tok, _, module = parts

    class SaysTwo(VQACallback):
        def generate(self, pl_module, codes, instruction, seed):
            return ["Two"] * len(codes)

    humans = ["2"] * 3 + ["two"] * 3 + ["blue", "green", "white", "black"]
    samples = [EvalSample("q", [], codes=torch.zeros(64, dtype=torch.long), question="how many?", answers=humans)]
    got = []
    for official_references in (False, True):
        cb = SaysTwo(samples=samples, text_tokenizer=tok, official_references=official_references)
        got.append(trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]["val/vqa_acc"])
    assert got == [pytest.approx(1.0), pytest.approx(0.9)]  # official: "two" is not "2" -> 3 matches of 10
