"""VQA accuracy (paper section 4.2, table 2: VQA2, VizWiz, OKVQA) with the official answer normalisation.

The accuracy of one answer against the human answers (usually 10) is ``min(#humans who gave that answer / 3, 1)``.
The official evaluation script (``vqaEval.py`` of the VQA API) averages that over the 10 subsets of 9 human answers
that leave one out, which :func:`vqa_accuracy` does by default (``official=True``): with 10 answers of which ``k``
match, the score is 0, 0.3, 0.6, 0.9, 1.0 for ``k`` = 0, 1, 2, 3, >= 4. ``official=False`` gives the simple form
``min(k / 3, 1)``: 0, 1/3, 2/3, 1.

Questions with too few human answers for that consensus (fewer than 4 with ``official=True``, as leaving one
out must leave 3, fewer than 3 with ``official=False``), such as the one-answer VQA lines of instruction-tuning
data, are scored by exact match instead: 1 when the normalised prediction equals one of the normalised human answers,
else 0 (:data:`MIN_CONSENSUS_ANSWERS`). Otherwise even a perfect answer could not reach 1.

Answers are normalised as in ``vqaEval.py``: new lines and tabs become spaces, punctuation is removed or replaced by
a space (``processPunctuation``, including its period rule), then lower-casing, number words -> digits
(``"two"`` -> ``"2"``), articles dropped and contractions restored (``"dont"`` -> ``"don't"``;
``processDigitArticle``). The official script normalises the human answers with ``processPunctuation`` only (the VQA
annotations were normalised at collection); here human answers get the full normalisation by default, so data in
"VQA format" from elsewhere (mixed case, "two" vs "2") is compared fairly. ``official_references=True`` reproduces
the script exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

# The tables below are those of the official VQA evaluation script (vqaEval.py).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a lookahead, not a lookbehind)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The fewest human answers scored by consensus, per form (official leave-one-out, simple); fewer: exact match.
MIN_CONSENSUS_ANSWERS = {True: 4, False: 3}


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip periods not before a digit."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE as the *count* argument (32): at most 32 periods are stripped.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Full answer normalisation: whitespace, :func:`process_punctuation`, then :func:`process_digit_article`."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(
    prediction: str, answers: Sequence[str], official: bool = True, official_references: bool = False
) -> float:
    """VQA accuracy of one predicted answer against the human answers (see the module docstring).

    Args:
        prediction: the model's answer.
        answers: the human answers (VQA v2: 10).
        official: average ``min(matches / 3, 1)`` over the leave-one-out subsets (the official script); False gives
            ``min(matches / 3, 1)`` over all answers.
        official_references: normalise the human answers as the official script does (``processPunctuation``
            only, and only when they disagree) instead of with :func:`normalize_answer`.

    With fewer human answers than :data:`MIN_CONSENSUS_ANSWERS` (e.g. one gold answer), the score is the exact
    match 0 or 1 of the normalised answers.

    Raises:
        ValueError: ``answers`` is a string or empty.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of human answers, got {answers!r}")
    pred = normalize_answer(prediction)
    if official_references:
        # As vqaEval.py: the raw human answers (not stripped), processPunctuation only when they disagree.
        refs = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    else:
        refs = [normalize_answer(a) for a in answers]
    matches = sum(r == pred for r in refs)
    if len(refs) < MIN_CONSENSUS_ANSWERS[bool(official)]:
        return float(matches > 0)
    if not official:
        return min(1.0, matches / 3)
    # Leaving out a matching answer leaves matches-1 matches, leaving out another leaves matches.
    scores = [min(1.0, (matches - (r == pred)) / 3) for r in refs]
    return sum(scores) / len(scores)


# Device types without float64 tensors (Apple's MPS): float sums are kept in float32 there.
NO_FLOAT64_DEVICES = frozenset({"mps"})


def float_state_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of a float sum state on ``device``: float32 on Apple MPS, which has no float64, else float64."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64


class VQAAccuracy(Metric):
    """torchmetrics Metric: mean VQA accuracy over questions (see :func:`vqa_accuracy`; questions with few human
    answers count by exact match); sums sync across ranks. The sum of scores is float64, float32 while the metric is
    on Apple MPS (:func:`float_state_dtype`), so ``metric.to("mps")`` works.

    Args:
        official: leave-one-out averaging of the official script (default) or the simple ``min(k / 3, 1)``.
        official_references: normalise human answers exactly as the official script does.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, official: bool = True, official_references: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.official = official
        self.official_references = official_references
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> VQAAccuracy:
        """Move as torchmetrics does, with ``total`` in :func:`float_state_dtype` of the new device: float32 before a
        move to MPS, float64 again after a move from it (other moves and ``set_dtype`` are torchmetrics' own)."""
        target = float_state_dtype(fn(torch.zeros(1, device=self.device)).device)
        leaving_mps = float_state_dtype(self.total.device) != target
        if self.total.dtype == torch.float64 and target != torch.float64:
            self._cast_total(target)
        out = super()._apply(fn, *args, **kwargs)
        if leaving_mps and target == torch.float64:
            self._cast_total(target)
        return out

    def _cast_total(self, dtype: torch.dtype) -> None:
        """``total`` and its reset default in ``dtype``, on their device."""
        self.total = self.total.to(dtype)
        self._defaults["total"] = self._defaults["total"].to(dtype)

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        """Add predicted answers and, per question, the list of human answers (checked before anything is added)."""
        if isinstance(predictions, str):
            raise ValueError("predictions must be a list of answers, got one string")
        if len(predictions) != len(answers):
            raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
        scores = [
            vqa_accuracy(pred, refs, self.official, self.official_references)
            for pred, refs in zip(predictions, answers)
        ]
        self.total += sum(scores)
        self.count += len(scores)

    def compute(self) -> Tensor:
        """Mean accuracy in ``[0, 1]`` (0-dim float tensor)."""
        if int(self.count) == 0:
            raise RuntimeError("VQAAccuracy.compute() called before any update()")
        return (self.total / self.count).float()
