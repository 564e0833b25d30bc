"""The decodes behind ``cm3leon serve``: a group of checked jobs of one kind becomes one call of the generation
functions, and its result the JSON answers (:class:`JobRunner`, a mixin of
:class:`~cm3leon_lightning.serve.api.CM3LeonAPI`). This module imports no LitServe.
"""

import random
from typing import Any

import torch

from cm3leon_lightning.generation.generate import edit_image, generate_image, generate_text
from cm3leon_lightning.generation.infilling import infill_batch, infill_positions, plan_spans
from cm3leon_lightning.generation.tasks import task_prefix
from cm3leon_lightning.serve.jobs import EditJob, ImageJob, InfillJob, TextJob
from cm3leon_lightning.serve.requests import encode_png_base64


class JobRunner:
    """Runs groups of jobs (``_run_images``, ``_run_texts``, ``_run_edits``, ``_run_infill``) on the loaded model.

    The class using it sets ``model``, ``vocab``, ``tokenizer``, ``vqgan`` (or None), ``clip`` (or None),
    ``compile``, ``_rng`` (seeds for jobs without one) and ``_serve_device`` in its setup.
    """

    model: Any
    vocab: Any
    tokenizer: Any
    vqgan: Any
    clip: Any
    compile: bool | str | None
    _rng: random.Random
    _serve_device: torch.device

    def _seed(self, seed: int | None) -> int:
        return seed if seed is not None else self._rng.getrandbits(62)

    def _run_images(self, group: list[ImageJob]) -> list[dict[str, Any]]:
        from cm3leon_lightning.generation.rerank import rerank

        counts = [j.settings.num_samples for j in group]
        # One row per candidate (prompt repeated, num_samples=1): the same rows generate_image(num_samples=N) decodes,
        # so requests for different numbers of candidates share the decode.
        prompts = [j.ids for j, n in zip(group, counts) for _ in range(n)]
        docs = [j.retrieved for j, n in zip(group, counts) for _ in range(n)]
        kwargs = {**group[0].settings.image_kwargs(), "num_samples": 1}
        flat = generate_image(
            self.model,
            self.vocab,
            prompts,
            retrieved=docs if any(docs) else None,
            seed=self._seed(group[0].seed),
            **kwargs,
        ).codes[:, 0]  # (sum of N, h*w)
        answers = []
        for job, codes in zip(group, torch.split(flat, counts)):  # codes: (N, h*w)
            images = self._decode(codes)
            order, scores = list(range(len(codes))), None
            if job.rerank and images is not None:
                r = rerank(self.clip, [job.prompt], images[None], keep=len(codes))
                order, scores = r.order[0].tolist(), r.scores[0].tolist()
            keep = order[: job.keep or len(order)]
            answer: dict[str, Any] = {"seed": job.seed}
            if job.retrieved_keys:
                answer["retrieved"] = job.retrieved_keys
            if images is not None:
                answer["images"] = [encode_png_base64(images[c]) for c in keep]
            if job.return_codes or images is None:
                answer["codes"] = codes[keep].tolist()
            if scores is not None:
                answer["clip_scores"] = scores[: len(keep)]
            answers.append(answer)
        return answers

    def _decode(self, codes: torch.Tensor) -> torch.Tensor | None:
        """One request's ``(N, h*w)`` codes -> ``(N, C, H, W)`` images (None without a VQGAN). Decoded per request:
        its pixels must not depend on the batch's size (the convolutions round differently)."""
        if self.vqgan is None:
            return None
        with torch.no_grad():
            return self.vqgan.decode(codes.to(self._serve_device))

    def _run_edits(self, group: list[EditJob]) -> list[dict[str, Any]]:
        s, counts = group[0].settings, [j.settings.num_samples for j in group]
        flat = edit_image(
            self.model,
            self.vocab,
            torch.stack([j.codes for j, n in zip(group, counts) for _ in range(n)]),
            [j.instruction for j, n in zip(group, counts) for _ in range(n)],
            self.tokenizer.encode(task_prefix(s.task)),
            text_cfg=s.text_cfg,
            image_cfg=s.image_cfg,
            num_samples=1,
            method=s.method,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=self._seed(group[0].seed),
            compile=self.compile,
        ).codes[:, 0]  # (sum of N, h*w), one row per candidate as in _run_images
        return [
            self._with_images({"seed": j.seed}, c, j.return_codes) for j, c in zip(group, torch.split(flat, counts))
        ]

    def _with_images(self, answer: dict[str, Any], codes: torch.Tensor, return_codes: bool) -> dict[str, Any]:
        """``answer`` with the images of ``codes`` ``(N, h*w)`` as base64 PNGs, and the codes when asked for or when
        this server has no VQGAN to draw them."""
        images = self._decode(codes)
        if images is not None:
            answer["images"] = [encode_png_base64(im) for im in images]
        if return_codes or images is None:
            answer["codes"] = codes.tolist()
        return answer

    def _run_infill(self, group: list[InfillJob]) -> list[dict[str, Any]]:
        return [answer for part in self._infill_batches(group) for answer in self._run_infill_batch(part)]

    def _infill_batches(self, group: list[InfillJob]) -> list[list[InfillJob]]:
        """``group`` cut into consecutive runs that fit the context in one ``infill_batch``: a batch left-pads every
        document to the longest and decodes each image span for as many codes as its longest, so two requests that
        fit alone (a long caption missing one grid row, a short one missing the whole image) may not fit together."""
        batches: list[list[InfillJob]] = []
        longest, spans = 0, []
        for job in group:
            body = job.ids[:-1] if job.ids and job.ids[-1] == self.vocab.eos_id else job.ids  # as infill_batch reads it
            plan = plan_spans(self.vocab, body, job.kinds)
            if batches:  # the group's jobs have spans of the same modalities in the same order (job_key)
                merged = [(kind, max(n, m)) for (kind, n), (_, m) in zip(spans, plan)]
                need = infill_positions(merged, max(longest, len(body)), job.max_span_tokens)
                if need <= self.model.config.max_seq_len:
                    batches[-1].append(job)
                    longest, spans = max(longest, len(body)), merged
                    continue
            batches.append([job])
            longest, spans = len(body), plan
        return batches

    def _run_infill_batch(self, group: list[InfillJob]) -> list[dict[str, Any]]:
        j = group[0]
        docs = [(job.ids, job.kinds) for job in group for _ in range(job.num_samples)]  # one row per filling
        results = infill_batch(
            self.model, self.vocab, [d for d, _ in docs], span_kinds=[k for _, k in docs],
            max_span_tokens=j.max_span_tokens, method=j.method, temperature=j.temperature, top_p=j.top_p,
            seed=self._seed(j.seed), compile=self.compile,
        )  # fmt: skip
        answers, at = [], 0
        for job in group:
            mine, at = results[at : at + job.num_samples], at + job.num_samples
            documents = [self.vocab.ids_to_document(r.ids) for r in mine]
            answer: dict[str, Any] = {
                "seed": job.seed,
                "texts": [self.tokenizer.decode(list(d[0].tokens)) for d in documents],
            }
            if job.has_image:
                stacked = torch.stack([torch.as_tensor(d[1].tokens) for d in documents])  # (N, h*w)
                answer = self._with_images(answer, stacked, job.return_codes)
            answers.append(answer)
        return answers

    def _run_texts(self, group: list[TextJob]) -> list[dict[str, Any]]:
        s = group[0].settings
        ids = generate_text(
            self.model, self.vocab, torch.stack([j.codes for j in group]), [j.instruction for j in group],
            max_new_tokens=s.max_new_tokens, method=s.method, temperature=s.temperature, top_p=s.top_p,
            seed=self._seed(group[0].seed), compile=self.compile, layout=s.layout,
        )  # fmt: skip
        return [{"text": self.tokenizer.decode(a)} for a in ids]
