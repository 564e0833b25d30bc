"""VQA accuracy: hand-computed cases for the simple and the official (leave-one-out) forms, exact match for
questions with few answers, and normalisation."""

from __future__ import annotations

import pytest
import torch

from cm3leon_lightning.metrics.vqa import VQAAccuracy, normalize_answer, vqa_accuracy

OTHER = ["blue", "green", "white", "black", "pink", "gray", "orange", "purple", "brown", "tan"]


def answers(k: int, match: str = "2") -> list[str]:
    """10 human answers of which ``k`` are ``match``."""
    return [match] * k + OTHER[: 10 - k]


@pytest.mark.parametrize(
    "k, simple, official", [(0, 0.0, 0.0), (1, 1 / 3, 0.3), (2, 2 / 3, 0.6), (3, 1.0, 0.9), (4, 1.0, 1.0)]
)
def test_hand_computed_accuracies(k: int, simple: float, official: float) -> None:
    # Official: leaving out one of the k matches leaves k-1, leaving out another answer leaves k; e.g. k=2:
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("2", answers(k), official=False) == pytest.approx(simple)
    assert vqa_accuracy("2", answers(k), official=True) == pytest.approx(official)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two", "2"),
        ("The Dog!", "dog"),
        ("a red, white car.", "red white car"),
        ("dont", "don't"),
        ("  an   apple\t", "apple"),
        ("yes.", "yes"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("black-and-white", "black and white"),
        ("none", "0"),
    ],
)
def test_normalisation(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_normalisation_makes_answers_match() -> None:
    humans = ["two", "2", "Two dogs", "2", "3", "3", "3", "3", "3", "3"]  # "two", "2", "2" match after normalising
    assert vqa_accuracy("The two.", humans, official=False) == pytest.approx(1.0)
    assert vqa_accuracy("The two.", humans, official=True) == pytest.approx(0.9)
    # The official script leaves human answers' case and number words alone: only "2", "2" match.
    assert vqa_accuracy("The two.", humans, official=False, official_references=True) == pytest.approx(2 / 3)


def test_metric_mean_and_errors() -> None:
    metric = VQAAccuracy(official=False)
    metric.update(["2", "blue"], [answers(1), answers(0)])  # 1/3 and, "blue" being in OTHER once, 1/3
    metric.update(["nothing"], [answers(3)])  # 0
    assert metric.compute().item() == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        metric.update(["a", "b"], [answers(1)])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("a", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("a", "a")


@pytest.mark.parametrize("official", [True, False])
def test_few_human_answers_score_by_exact_match(official: bool) -> None:
    # One or two gold answers (instruction-tuning VQA lines): a right answer scores 1, not 1/3 or an error.
    assert vqa_accuracy("The Red.", ["red"], official=official) == 1.0
    assert vqa_accuracy("blue", ["red"], official=official) == 0.0
    assert vqa_accuracy("two", ["circle", "2"], official=official) == 1.0
    assert vqa_accuracy("Red", ["red"], official=official, official_references=True) == 1.0
    # Three answers: exact match for the official form (leaving one out leaves 2), consensus for the simple one.
    assert vqa_accuracy("red", ["red", "blue", "green"], official=official) == pytest.approx(1.0 if official else 1 / 3)
    # Four answers: the consensus of both forms; official: leaving out the match leaves 0, another leaves 1/3.
    assert vqa_accuracy("red", ["red", "a", "b", "c"], official=official) == pytest.approx(0.25 if official else 1 / 3)
    assert vqa_accuracy("red", ["red"] * 4, official=official) == 1.0


def test_metric_update_checks_every_question_before_adding() -> None:
    metric = VQAAccuracy()
    metric.update(["red", "x"], [["red"], ["red", "blue"]])
    assert metric.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-empty list"):
        metric.update(["red", "red"], [["red"], []])
    assert (metric.total.item(), metric.count.item()) == (1.0, 2)  # nothing of the refused batch was added


def _vqa_eval(pred: str, answers: list[str]) -> float:
    """GT-Vision-Lab/VQA vqaEval.py ``evaluate`` for one question, transcribed (its tables imported)."""
    import re

    from cm3leon_lightning.metrics.vqa import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION

    period_strip, comma_strip = re.compile(r"(?!<=\d)(\.)(?!\d)"), re.compile(r"(\d)(\,)(\d)")

    def punct(in_text: str) -> str:
        out = in_text
        for p in PUNCTUATION:
            if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return period_strip.sub("", out, re.UNICODE)

    def digit_article(in_text: str) -> str:
        out = [dict(NUMBER_WORDS).setdefault(w, w) for w in in_text.lower().split()]
        out = [w for w in out if w not in ARTICLES]
        return " ".join(CONTRACTIONS.get(w, w) for w in out)

    res = digit_article(punct(pred.replace("\n", " ").replace("\t", " ").strip()))
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
    if len(set(answers)) > 1:
        for d in gts:
            d["answer"] = punct(d["answer"])
    acc = [min(1, len([o for o in gts if o != d and o["answer"] == res]) / 3) for d in gts]
    return sum(acc) / len(acc)


@pytest.mark.parametrize(
    "pred, humans",
    [
        ("Two", ["2"] * 3 + ["two"] * 3 + OTHER[:4]),
        ("yes", ["Yes"] * 10),  # all alike: the script leaves them as they are (no match)
        ("yes", ["yes"] * 10),
        ("red", ["red "] * 3 + ["red"] + OTHER[:6]),  # human answers are not stripped by the script
        ("red", ["red!"] * 4 + ["blue"] * 6),
        ("black and white", ["black-and-white", "black and white", "black & white", "b/w"] + OTHER[:6]),
        ("1,000", ["1000", "1,000", "1000", "1 000"] + OTHER[:6]),
        ("dont know", ["don't know"] * 5 + ["dont know"] * 5),
        ("3.5 inches", ["3.5 inches"] * 2 + ["3.5"] * 2),
    ],
)
def test_official_references_reproduce_vqa_eval(pred: str, humans: list[str]) -> None:
    assert vqa_accuracy(pred, humans, official=True, official_references=True) == pytest.approx(
        _vqa_eval(pred, humans), abs=1e-12
    )


def test_the_score_sum_is_float32_only_on_apple_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``total`` was float64 on every device, and the callback moves the metric to the module's: ``.to("mps")``
    failed on a Mac ("MPS framework doesn't support float64"). "meta" stands in for MPS (no MPS here)."""
    from cm3leon_lightning.metrics import vqa

    assert vqa.float_state_dtype("mps") == torch.float32
    assert vqa.float_state_dtype(torch.device("cpu")) == vqa.float_state_dtype("cuda:0") == torch.float64
    metric = VQAAccuracy().to("cpu")
    metric.update(["2"], [["two"] * 3 + ["one"] * 7])
    assert metric.total.dtype == torch.float64 and float(metric.total) == pytest.approx(0.9, abs=1e-15)
    monkeypatch.setattr(vqa, "NO_FLOAT64_DEVICES", frozenset({"mps", "meta"}))
    moved = metric.to("meta")
    assert moved.total.device.type == "meta" and moved.total.dtype == torch.float32
    moved.reset()  # back to the default, in the dtype of the device
    assert moved.total.dtype == torch.float32 and moved.count.dtype == torch.long
    monkeypatch.setattr(vqa, "NO_FLOAT64_DEVICES", frozenset({"cpu"}))  # now the CPU stands in for MPS
    metric = VQAAccuracy().to("cpu")
    metric.update(["2"], [["two"] * 3 + ["one"] * 7])
    assert metric.total.dtype == torch.float32 and float(metric.total) == pytest.approx(0.9, abs=1e-6)
    assert metric.to("meta").total.dtype == torch.float64  # float64 again once off it
