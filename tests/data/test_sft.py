"""Instruction-tuning data: the paper's templates filled exactly, the 3 / 0.3 balancing, the seeded mixture plan,
and the JSON-lines source with its errors (all without models; the prepare run is in test_prepare.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cm3leon_lightning.data.sft import (
    EDIT_PREFIX,
    TEMPLATES,
    SFTSource,
    balanced_counts,
    eligible_templates,
    every_rendering,
    mixture_plan,
    render_text,
    template_segments,
)
from cm3leon_lightning.data.sources import make_source
from cm3leon_lightning.generation.tasks import IMAGE_TASKS, TASK_GUIDANCE, task_prefix

VQA = {"question": "What colour is the circle?", "answer": "red"}


def test_vqa_templates_are_filled_exactly_and_all_drawn() -> None:
    expected = [
        "Question: What colour is the circle? Answer: red.",
        "Question: What colour is the circle?\nred",
        "Question: What colour is the circle? The answer is red.",
    ]
    drawn = Counter()
    for seed in range(60):
        text, index = render_text("vqa", VQA, np.random.default_rng(seed))
        assert text == expected[index]
        drawn[index] += 1
    assert sorted(drawn) == [0, 1, 2] and min(drawn.values()) >= 10
    first = [render_text("vqa", VQA, np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1]  # the same generator state draws the same template


def test_scienceqa_needs_explanation_for_the_step_by_step_template() -> None:
    fields = {"question": "Which is a mammal?", "context": "Look.", "choices": ["cat", "fish"], "answer": "cat"}
    assert eligible_templates("scienceqa", fields) == [0]
    text, _ = render_text("scienceqa", fields, np.random.default_rng(0))
    assert text == "Question: Which is a mammal?\nContext: Look.\nOptions: (A) cat (B) fish\nAnswer: cat."
    fields["explanation"] = "Cats have fur."
    assert eligible_templates("scienceqa", fields) == [0, 1]
    texts = {render_text("scienceqa", fields, np.random.default_rng(s))[0] for s in range(20)}
    assert any(t.endswith("Let's think step-by-step: Cats have fur. So the answer is cat.") for t in texts)
    fields["explanation"] = None  # null counts as absent
    assert eligible_templates("scienceqa", fields) == [0]


def test_detection_objects_and_single_templates() -> None:
    fields = {"caption": "two shapes", "objects": [["circle", "<10,20,30,40>"], ["square", "<0,0,5,5>"]]}
    text, index = render_text("detection", fields, np.random.default_rng(0))
    assert index == 0
    assert (
        text
        == "Generate high quality image of two shapes with segmentations circle at <10,20,30,40>, square at <0,0,5,5>"
    )
    assert render_text("ocr", {"ocr": "OPEN"}, np.random.default_rng(0)) == ('draw "OPEN"', 0)
    assert render_text("text", {"text": "as given"}, np.random.default_rng(3)) == ("as given", 0)
    with pytest.raises(ValueError, match="name, location"):
        render_text("detection", {"caption": "x", "objects": ["circle"]}, np.random.default_rng(0))


def test_task_errors_name_the_task_and_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'vqa2'; choose from caption, "):
        eligible_templates("vqa2", VQA)
    with pytest.raises(ValueError, match=r"task 'edit' needs field\(s\) \['image', 'instruction', 'target'\]"):
        eligible_templates("edit", {})
    with pytest.raises(ValueError, match=r"task 'vqa' needs field\(s\) \['answer'\]"):
        eligible_templates("vqa", {"question": "q"})
    assert set(TEMPLATES) >= {"caption", "long_caption", "narrative", "vqa", "scienceqa", "ocr", "detection", "text"}


def test_balanced_counts_follow_the_thresholds() -> None:
    # share = 1110 / 3 = 370: a is cut to 370 (>= 0.3 x 1000), b and c are capped at 3x
    assert balanced_counts({"a": 1000, "b": 100, "c": 10}) == {"a": 370, "b": 300, "c": 30}
    # share = 100030 / 4 = 25007.5 is a quarter of "big", which is kept at 30% at least
    assert balanced_counts({"big": 100_000, "a": 10, "b": 10, "c": 10}) == {"big": 30_000, "a": 30, "b": 30, "c": 30}
    # within the thresholds every dataset reaches the equal share
    assert balanced_counts({"a": 120, "b": 80}) == {"a": 100, "b": 100}
    assert balanced_counts({"a": 1000, "b": 10}, up=1, down=1) == {"a": 1000, "b": 10}
    assert balanced_counts({"a": 5, "empty": 0}) == {"a": 5, "empty": 0}
    with pytest.raises(ValueError, match="0 < down <= 1 <= up"):
        balanced_counts({"a": 1}, up=0.5)


def test_mixture_plan_repeats_and_subsets_exactly() -> None:
    sizes = {"down": 10, "up": 4}
    counts = {"down": 6, "up": 10}
    plan = mixture_plan(sizes, counts, seed=1)
    assert len(plan) == 16 and len(set(plan)) == 16
    per_example = Counter((d, i) for d, i, _ in plan)
    assert sum(1 for (d, _), n in per_example.items() if d == "down" and n == 1) == 6  # a subset, once each
    up = sorted(n for (d, _), n in per_example.items() if d == "up")
    assert up == [2, 2, 3, 3]  # every example twice, two of them a third time
    assert sorted(c for d, _, c in plan if d == "up") == [0] * 4 + [1] * 4 + [2] * 2
    assert mixture_plan(sizes, counts, seed=1) == plan
    assert mixture_plan(sizes, counts, seed=2) != plan
    assert [d for d, _, _ in plan] != sorted(d for d, _, _ in plan)  # shuffled across datasets


def _write_lines(path: Path, entries: list[object]) -> Path:
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n")
    return path


def test_source_renders_balances_and_groups_copies(tmp_path: Path) -> None:
    vqa = [{"task": "vqa", "image": f"img/{i}.png", **VQA} for i in range(6)]
    caps = [{"task": "caption", "dataset": "coco", "image": "img/c.png", "caption": "a red circle"}]
    _write_lines(tmp_path / "mix.jsonl", [*vqa, "", *caps])  # a blank line is skipped
    src = SFTSource(tmp_path / "mix.jsonl", seed=0)
    # share = 7 / 2 = 3.5: vqa 6 -> 4 (0.58x), coco 1 -> 3 (capped at 3x)
    assert src.counts == {"vqa": 4, "coco": 3} and len(src) == 7
    pairs = list(src)
    assert len({p.key for p in pairs}) == 7
    coco = [p for p in pairs if p.meta["dataset"] == "coco"]
    assert sorted(p.key for p in coco) == ["sft-mix-8-0", "sft-mix-8-1", "sft-mix-8-2"]  # line 8 (after the blank)
    assert {p.split_key for p in coco} == {"sft-mix-8"} and all(p.image == tmp_path / "img/c.png" for p in coco)
    assert {p.caption for p in coco} <= {"a red circle", "Describe the given picture. a red circle"}
    for p in pairs:
        if p.meta["dataset"] == "vqa":
            assert p.caption == TEMPLATES["vqa"][p.meta["template"]].format(**VQA)
    assert [p.key for p in src.iter_range(2, 5)] == [p.key for p in pairs[2:5]]
    assert src.describe()["datasets"] == {"coco": {"examples": 1, "drawn": 3}, "vqa": {"examples": 6, "drawn": 4}}
    again = make_source("sft", tmp_path / "mix.jsonl", seed=0, sft_balance=(1.0, 1.0))
    assert len(again) == 7 and again.counts == {"vqa": 6, "coco": 1}


def test_source_reads_a_folder_of_files(tmp_path: Path) -> None:
    _write_lines(tmp_path / "a.jsonl", [{"task": "ocr", "image": "x.png", "ocr": "STOP"}])
    _write_lines(tmp_path / "b.jsonl", [{"task": "text", "image": "y.png", "text": "hello"}])
    src = SFTSource(tmp_path, up=1, down=1)
    assert sorted(p.key for p in src) == ["sft-a-1-0", "sft-b-1-0"]
    assert sorted(p.caption for p in src) == ['draw "STOP"', "hello"]
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl files"):
        SFTSource(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="SFT input not found"):
        SFTSource(tmp_path / "missing.jsonl")


def test_files_whose_keys_would_collide_are_refused(tmp_path: Path) -> None:
    """Keys come from the sanitised file stem: "coco.v2.jsonl" and "coco_v2.jsonl" gave the same keys
    (sft-coco_v2-1-0), and prepare kept one file's examples, dropping the other's as duplicate keys."""
    _write_lines(tmp_path / "coco.v2.jsonl", [{"task": "ocr", "image": "x.png", "ocr": "STOP"}])
    _write_lines(tmp_path / "coco_v2.jsonl", [{"task": "text", "image": "y.png", "text": "hello"}])
    message = r"coco.v2.jsonl and coco_v2.jsonl give the same example keys \(sft-coco_v2-<line>\)"
    with pytest.raises(ValueError, match=message):
        SFTSource(tmp_path)


def test_null_dataset_defaults_to_the_task_and_the_seed_is_checked(tmp_path: Path) -> None:
    """A JSON null "dataset" (e.g. a missing value in an exported table) made a dataset named "None", balanced as
    one dataset across tasks; a negative seed failed in numpy with "expected non-negative integer"."""
    path = _write_lines(
        tmp_path / "mix.jsonl",
        [{"task": "vqa", "dataset": None, "image": "x.png", **VQA}, {"task": "ocr", "image": "y.png", "ocr": "GO"}],
    )
    assert SFTSource(path, up=1, down=1).counts == {"vqa": 1, "ocr": 1}
    for seed in (-1, 1.5, True):  # 1.5 and True were taken as seed 1
        with pytest.raises(ValueError, match=rf"seed must be an integer >= 0 \(it seeds the SFT mixture's .*: "
                           rf"--sft-seed\), got {seed!r}"):  # fmt: skip
            SFTSource(path, seed=seed)


def test_bad_thresholds_name_the_flags_before_any_file_is_read(tmp_path: Path) -> None:
    """``--sft-up 0.5`` failed in balanced_counts after every file was read, naming neither flag."""
    missing = tmp_path / "missing.jsonl"  # not read: the thresholds are refused first
    for up, down in ((0.5, 0.3), (3.0, 0.0), (3.0, 1.5), (float("nan"), 0.3)):
        with pytest.raises(ValueError, match=r"0 < down \(--sft-down\) <= 1 <= up \(--sft-up\), got up="):
            SFTSource(missing, up=up, down=down)


def test_choices_and_objects_items_render_as_given() -> None:
    fields = {"question": "q", "context": "c", "answer": "a", "choices": ["cat", 2, 0.5]}
    options = "Question: q\nContext: c\nOptions: (A) cat (B) 2 (C) 0.5\nAnswer: a."
    assert every_rendering("scienceqa", fields) == [options]
    objects = {"caption": "c", "objects": [["circle", "<1,2,3,4>"], [7, 3]]}
    assert every_rendering("detection", objects) == [
        "Generate high quality image of c with segmentations circle at <1,2,3,4>, 7 at 3"
    ]


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad.jsonl:2: not valid JSON"),
        ("[1, 2]", r"bad.jsonl:2: each line must be a JSON object"),
        ('{"task": "vqa", "question": "q", "answer": "a"}', r"bad.jsonl:2: needs string fields 'task' and 'image'"),
        (
            '{"task": "vqa", "image": "i.png", "question": "q"}',
            r"bad.jsonl:2: task 'vqa' needs field\(s\) \['answer'\]",
        ),
        (
            '{"task": "edit", "image": "i.png"}',
            r"bad.jsonl:2: task 'edit' needs field\(s\) \['instruction', 'target'\]",
        ),
        (
            '{"task": "edit", "image": "i.png", "instruction": "x", "target": 3}',
            r"bad.jsonl:2: image field\(s\) \['target'\]",
        ),
        ('{"task": "text", "image": "i.png", "text": "t", "dataset": "..."}', r"bad.jsonl:2: key '...' has no usable"),
        # an empty answer trained "Question: q Answer: ." without a word
        (
            '{"task": "vqa", "image": "i.png", "question": "q", "answer": " "}',
            r"bad.jsonl:2: task 'vqa' needs field\(s\) \['answer'\] \(missing, null or empty\)",
        ),
        ('{"task": "text", "image": " ", "text": "t"}', r"bad.jsonl:2: needs string fields 'task' and 'image'"),
        # a list of answers (VQA2 has ten) trained on its Python repr, "Answer: ['red', 'red']."
        (
            '{"task": "vqa", "image": "i.png", "question": "q", "answer": ["red", "red"]}',
            r"bad.jsonl:2: field 'answer' must be a string or a number, got list \['red', 'red'\]",
        ),
        ('{"task": "vqa", "image": "i.png", "question": "q", "answer": true}', r"bad.jsonl:2: field 'answer' .* bool"),
        # items of choices / objects were rendered with Python's repr: "Options: (A) cat (B) None", "(A) True",
        # "circle at [10, 20, 30, 40]"; JSON's NaN trained "Answer: nan."; a 27th choice was lettered "([)"
        (
            '{"task": "scienceqa", "image": "i.png", "question": "q", "context": "c", "answer": "a", '
            '"choices": ["cat", null]}',
            r"bad.jsonl:2: field 'choices\[1\]' must be a string or a number, got NoneType None",
        ),
        (
            '{"task": "scienceqa", "image": "i.png", "question": "q", "context": "c", "answer": "a", '
            '"choices": [true, false]}',
            r"bad.jsonl:2: field 'choices\[0\]' must be a string or a number, got bool True",
        ),
        (
            '{"task": "scienceqa", "image": "i.png", "question": "q", "context": "c", "answer": "a", '
            f'"choices": {json.dumps(["x"] * 27)}}}',
            r"bad.jsonl:2: field 'choices' has 27 options; at most 26 can be lettered \(A\)..\(Z\)",
        ),
        (
            '{"task": "detection", "image": "i.png", "caption": "c", "objects": [["circle", [10, 20, 30, 40]]]}',
            r"bad.jsonl:2: field 'objects\[0\]\[1\]' must be a string or a number, got list \[10, 20, 30, 40\]",
        ),
        (
            '{"task": "vqa", "image": "i.png", "question": "q", "answer": NaN}',
            r"bad.jsonl:2: field 'answer' must be a string or a finite number, got nan",
        ),
        # rendering errors came from cm3leon prepare's encode stage, without the file and line
        (
            '{"task": "detection", "image": "i.png", "caption": "c", "objects": ["circle"]}',
            r"bad.jsonl:2: 'objects' holds \[name, location\] pairs, got 'circle'",
        ),
    ],
)
def test_bad_lines_name_the_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [{"task": "text", "image": "ok.png", "text": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        SFTSource(path)


def test_bytes_that_are_not_utf8_name_the_file_and_line_and_a_bom_is_dropped(tmp_path: Path) -> None:
    """A latin-1 line raised a bare UnicodeDecodeError naming no file; a BOM made line 1 invalid JSON."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"task": "text", "image": "x.png", "text": "ok"}\n{"task": "text", "image": "x.png", '
                     b'"text": "caf\xe9"}\n')  # fmt: skip
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 \(byte 47 of the line: invalid continuation"):
        SFTSource(path)
    path.write_bytes(b'\xef\xbb\xbf{"task": "text", "image": "x.png", "text": "caf\xc3\xa9"}\r\n\r\n')
    assert [(p.key, p.caption) for p in SFTSource(path)] == [("sft-latin-1-0", "caf\u00e9")]


def test_empty_fields_count_as_absent() -> None:
    """An empty ScienceQA explanation (common in its exports) drew the step-by-step template, training
    "Let's think step-by-step:  So the answer is cat."; empty lists rendered as nothing."""
    fields = {"question": "Which?", "context": "Look.", "choices": ["cat", "fish"], "answer": "cat", "explanation": ""}
    assert eligible_templates("scienceqa", fields) == [0]
    assert eligible_templates("scienceqa", {**fields, "explanation": " \n"}) == [0]
    with pytest.raises(ValueError, match=r"needs field\(s\) \['choices'\] \(missing, null or empty\)"):
        eligible_templates("scienceqa", {**fields, "choices": []})
    with pytest.raises(ValueError, match=r"needs field\(s\) \['objects'\]"):
        eligible_templates("detection", {"caption": "c", "objects": []})
    assert every_rendering("vqa", {"question": "How many?", "answer": 0})[0] == "Question: How many? Answer: 0."


def test_every_rendering_lists_each_eligible_template_in_order() -> None:
    assert every_rendering("vqa", VQA) == [
        "Question: What colour is the circle? Answer: red.",
        "Question: What colour is the circle?\nred",
        "Question: What colour is the circle? The answer is red.",
    ]
    for seed in range(5):  # render_text draws one of them, and says which
        text, index = render_text("vqa", VQA, np.random.default_rng(seed))
        assert every_rendering("vqa", VQA)[index] == text


def test_documents_with_several_images_are_split_into_segments(tmp_path: Path) -> None:
    fields = {"image": "a.png", "instruction": "make it blue", "target": "b.png"}
    (template,) = TEMPLATES["edit"]
    assert template_segments(template, fields, tmp_path) == [
        ("text", EDIT_PREFIX),  # what edit_image puts first at generation time
        ("image", tmp_path / "a.png"),
        ("text", "make it blue"),
        ("image", tmp_path / "b.png"),
    ]
    edge = template_segments(
        TEMPLATES["edge_to_image"][0], {"condition": "e.png", "caption": "a cat", "image": "c.png"}
    )
    assert edge == [("text", "Make high quality image from canny edge features"), ("image", Path("e.png")),
                    ("text", "a cat"), ("image", Path("c.png"))]  # fmt: skip
    # a single-image template is its text, then the example's image
    assert template_segments("{caption}", {"caption": "x", "image": "c.png"}) == [
        ("text", "x"),
        ("image", Path("c.png")),
    ]
    assert every_rendering("edit", fields) == ["Edit first image following the instruction make it blue"]
    for task in IMAGE_TASKS:  # decoding's prefix is what the template trains on
        assert TEMPLATES[task][0].startswith(task_prefix(task) + " <break> ")
    assert task_prefix("scribble_to_image") == "Make high quality image from children's scribbles"
    assert [TASK_GUIDANCE[t] for t in ("edit", "depth_to_image")] == [(7.5, 1.5), (3.0, 3.0)]
    with pytest.raises(ValueError, match="task must be one of"):
        task_prefix("vqa")

    _write_lines(tmp_path / "edit.jsonl", [{"task": "edit", **fields}, {"task": "vqa", "image": "c.png", **VQA}])
    pairs = {p.meta["task"]: p for p in SFTSource(tmp_path / "edit.jsonl", up=1, down=1)}
    edit = pairs["edit"]
    assert edit.meta["segments"] == [["text", "Edit first image following the instruction"],
                                     ["image", str(tmp_path / "a.png")], ["text", "make it blue"],
                                     ["image", str(tmp_path / "b.png")]]  # fmt: skip
    assert edit.image == tmp_path / "b.png"  # the output image stands for the document in retrieval and evaluation
    assert edit.caption == "Edit first image following the instruction make it blue"
    assert "segments" not in pairs["vqa"].meta and pairs["vqa"].image == tmp_path / "c.png"
