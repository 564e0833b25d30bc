"""VQACallback: answer questions about images with ``generate_text`` and log VQA accuracy (paper section 4.2).

Data in "VQA format": a JSON file holding a list of ``{"question": str, "image": path, "answers": [str, ...]}``
(image paths relative to the file; ``"codes": [int, ...]`` may replace ``"image"``), or in-memory samples. A
``.jsonl`` file is read line by line in the same format, where ``"answer": str`` may replace ``"answers"`` and lines
of another ``"task"`` are skipped: the held-out VQA lines of ``cm3leon prepare --source sft`` input evaluate as they
are. The prompt follows the paper's SFT template (table 5): ``"Question: {question} Answer:"`` as the instruction
before the answer span, tokenized as ``cm3leon prepare`` cleaned the rendered SFT templates (a newline, tab or doubled
space in a question reads as one space); a question that is null, blank or not text is refused, as SFT input refuses
it. Accuracy is :func:`~cm3leon_lightning.metrics.vqa.vqa_accuracy` (official normalisation and leave-one-out
averaging by default), summed across ranks. Questions with fewer human answers than that consensus
needs (4 official, 3 simple; e.g. the one ``"answer"`` of a ``.jsonl`` line) count by exact match of the normalised
answers: 1 when the answer equals one of them, else 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from cm3leon_lightning.callbacks.base import EvalSample, refuse_arguments
from cm3leon_lightning.callbacks.cider import CIDErCallback
from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.files import jsonl_values
from cm3leon_lightning.metrics.fid import fid_resize
from cm3leon_lightning.metrics.vqa import VQAAccuracy


def read_vqa_file(path: str | os.PathLike[str], num_samples: int | None = None) -> list[EvalSample]:
    """Read a VQA-format JSON file (see the module docstring).

    Raises:
        ValueError: the file is not valid JSON or not a list, an entry lacks ``question`` (or it is null, blank or
            not text), ``answers`` or an image / codes, its image cannot be decoded or its codes are not integers
            (the message names the file, the entry and the image), or its answers are not a list of strings
            (numbers are read as text; VQA v2's ``{"answer": ...}`` records and a lone string are refused rather
            than scored as their text or letters).
        FileNotFoundError: an entry's image file does not exist (the error names it).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        entries, where = _vqa_lines(path), "line"
    else:
        try:
            loaded, where = json.loads(path.read_text()), "entry"
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: a VQA file holds a JSON list of {{question, image, answers}} entries")
        entries = list(enumerate(loaded))
    out = []
    for i, e in entries[:num_samples]:
        if not isinstance(e, dict) or "question" not in e or not e.get("answers") or not ("image" in e or "codes" in e):
            raise ValueError(f"{path}: {where} {i} needs 'question', non-empty 'answers' and 'image' (or 'codes')")
        if not _is_answer(e["question"]):  # null was asked as "Question: None Answer:"
            raise ValueError(f"{path}: {where} {i}: 'question' must be a string, got {e['question']!r:.60}")
        model_text(str(e["question"]), f"{path}: {where} {i}", "'question'")  # blank: no question to ask
        answers = e["answers"]
        if not isinstance(answers, list) or not all(_is_answer(a) for a in answers):
            records = isinstance(answers, list) and isinstance(answers[0], dict)  # VQA v2 annotations
            hint = " (use each record's 'answer')" if records else ""
            raise ValueError(f"{path}: {where} {i}: 'answers' must be a list of answer strings, got {answers!r}{hint}")
        codes, image = None, None
        if "codes" in e:
            try:
                codes = torch.as_tensor(e["codes"]).long()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{path}: {where} {i}: 'codes' must be a list of integers ({err})") from err
        else:
            image_path = path.parent / str(e["image"])
            data = image_path.read_bytes()  # FileNotFoundError names the missing file
            try:
                image = fid_resize(data, 256)  # re-sized to the VQGAN's later
            except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError, truncated data
                raise ValueError(f"{path}: {where} {i}: cannot read image {image_path} ({err})") from err
        out.append(EvalSample(str(e.get("key", i)), [], image, codes, str(e["question"]), [str(a) for a in answers]))
    return out


def _is_answer(a: object) -> bool:
    """A human answer as a file may hold it: a string or a number (not a bool, list or record)."""
    return isinstance(a, (str, int, float)) and not isinstance(a, bool)


def _vqa_lines(path: Path) -> list[tuple[int, object]]:
    """``(line number, entry)`` of a JSON-lines VQA file: lines of another ``task`` dropped, ``answer`` as the one
    answer, the line number as the default key."""
    out: list[tuple[int, object]] = []
    for n, e in jsonl_values(path):
        if isinstance(e, dict):
            if e.get("task", "vqa") != "vqa":
                continue
            e = {**e, "answers": e.get("answers") or ([e["answer"]] if "answer" in e else None), "key": e.get("key", n)}
        out.append((n, e))
    return out


class VQACallback(CIDErCallback):
    """Answer fixed questions about images and log ``val/vqa_acc``.

    Args:
        data: a VQA-format JSON file (see the module docstring).
        samples: in-memory samples with ``question``, ``answers`` and ``codes`` (or ``image``), instead of ``data``.
        num_samples: questions used, the first ones.
        prompt_template: the instruction; ``{question}`` is replaced by the question.
        max_new_tokens: the most tokens per answer.
        method: ``greedy``, ``temperature`` or ``top_p``.
        official: official leave-one-out averaging (else ``min(matches / 3, 1)``); questions with too few human
            answers for it count by exact match (see the module docstring).
        official_references: normalise the human answers exactly as the official script does (punctuation only,
            and only when they disagree) instead of as the answers; with ``official`` it reproduces ``vqaEval.py``.
        log_name: the logged key.
        layout: the prompt layout, ``infill`` or ``image_first`` (see :class:`CIDErCallback`).
        **kwargs: ``temperature``, ``top_p`` and the :class:`GenerationCallback` arguments (``text_tokenizer``,
            ``vqgan``, ``batch_size``, ``seed``...). :class:`CIDErCallback`'s ``instruction``, ``group_by_image`` and
            ``tokenizer`` are refused (ValueError naming them) rather than ignored.
    """

    def __init__(
        self,
        data: str | None = None,
        samples: Sequence[EvalSample] | None = None,
        num_samples: int = 1000,
        prompt_template: str = "Question: {question} Answer:",
        max_new_tokens: int = 8,
        method: str = "greedy",
        official: bool = True,
        official_references: bool = False,
        log_name: str = "val/vqa_acc",
        layout: str = "infill",
        **kwargs,
    ) -> None:
        refuse_arguments(
            "VQACallback",
            kwargs,
            ("instruction", "group_by_image", "tokenizer"),
            "the prompt is prompt_template; questions are not grouped and answers not CIDEr-tokenized",
        )
        super().__init__(
            data, samples, num_samples, group_by_image=False, instruction="", max_new_tokens=max_new_tokens,
            method=method, tokenizer="simple", log_name=log_name, layout=layout, **kwargs,
        )  # fmt: skip
        self.prompt_template = check_prompt_template(prompt_template)
        self.metric = VQAAccuracy(official=official, official_references=official_references)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the questions once and check each has a question, answers, and codes or an image with ``vqgan``
        (before any training or generation); images to encode are brought to the VQGAN's size (any size works)."""
        self.load_resources(trainer)  # a missing tokenizer or VQGAN fails now, not at the first validation
        if self.samples is None:
            if self.data is None:
                raise ValueError("VQACallback: give data (a VQA-format JSON file) or samples")
            self.samples = read_vqa_file(self.data, self.num_samples)
            if not self.samples:
                raise ValueError(
                    f"VQACallback: {self.data} holds no VQA questions (of a .jsonl: no line of task 'vqa')"
                )
        if not self.samples:
            raise ValueError("VQACallback: the evaluation set is empty (samples=[])")
        for s in self.samples:
            answers_ok = isinstance(s.answers, (list, tuple)) and all(isinstance(a, str) for a in s.answers)
            if not isinstance(s.question, str) or not answers_ok or not s.answers:
                raise ValueError(
                    f"VQACallback: sample {s.key!r} needs a question and a non-empty list of answer strings, "
                    f"got question={s.question!r}, answers={s.answers!r}"
                )
            model_text(s.question, f"VQACallback: sample {s.key!r}", "the question")  # blank: as SFT input refuses it
        self.check_images("VQACallback")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Answer this rank's questions, update the metric, and return the accuracy over all ranks."""
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()
        share = self.rank_batches(trainer)  # a one-device run's answers on any number of devices
        if not share:  # a rank without questions still updates, so every rank's metric syncs alike
            self.metric.update([], [])
        for seed, chunk in share:
            prompts = [self.prompt_template.format(question=s.question) for s in chunk]
            answers = self.generate(pl_module, self.codes_of(chunk, pl_module.device), prompts, seed)
            self.metric.update(answers, [s.answers for s in chunk])
        return float(self.metric.compute())


def check_prompt_template(template: str) -> str:
    """``template`` if it formats with a question (raises ValueError naming ``prompt_template`` otherwise)."""
    if "{question}" not in template:
        raise ValueError(f"prompt_template must contain '{{question}}', got {template!r}")
    try:
        template.format(question="what is it?")
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ValueError(
            f"prompt_template {template!r} does not format with a question ({type(err).__name__}: {err}); "
            "write literal braces as '{{' and '}}'"
        ) from err
    return template
