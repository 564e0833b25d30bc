"""``CM3LeonAPI``: a LitServe API that serves text-to-image, image-to-text, image editing and CM3 infilling from a
``CM3LeonModule`` checkpoint.

LitServe (Lightning's serving library) runs :meth:`CM3LeonAPI.setup` once per worker, gathers up to
``max_batch_size`` requests that arrive within ``batch_timeout`` seconds, and hands them to :meth:`predict` together.
There the requests are grouped (:func:`~cm3leon_lightning.serve.requests.group_key`): each group is one call of
:func:`~cm3leon_lightning.generation.generate.generate_image`,
:func:`~cm3leon_lightning.generation.generate.generate_text` or
:func:`~cm3leon_lightning.generation.generate.edit_image`, so concurrent requests with equal settings share the
decode's forward passes (a decode step costs nearly the same for 2 or 16 rows on a GPU). A request that carries a
``seed`` and samples is decoded on its own, so the same request always gives the same images. A request the server
cannot honour is answered 400 on its own; the rest of its batch is unaffected.

Usage, from Python (``cm3leon serve`` does the same from the command line)::

    import litserve as ls
    from cm3leon_lightning.serve import CM3LeonAPI, install_error_handlers

    api = CM3LeonAPI("last.ckpt", "tok/", vqgan="vqgan/", max_batch_size=8, batch_timeout=0.05)
    server = ls.LitServer(api, accelerator="auto", timeout=600, max_payload_size=32 * 2**20)
    install_error_handlers(server.app)  # a 422 for NaN or a lone surrogate, not a 500
    server.run(port=8000, generate_client_file=False)
"""

# No `from __future__ import annotations`: LitServe hands decode_request's annotation to FastAPI as the body type,
# and a string annotation would not resolve there.
import logging
import random
from dataclasses import asdict, replace
from typing import Any

import litserve as ls
import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from cm3leon_lightning.generation.generate import GenerationSettings, caption_prompt, image_prompt
from cm3leon_lightning.generation.infilling import infill_positions, plan_spans
from cm3leon_lightning.generation.retrieve import DocumentRetriever
from cm3leon_lightning.generation.tasks import TASK_GUIDANCE, task_prefix
from cm3leon_lightning.serve.jobs import (
    EDIT_SETTINGS,
    IMAGE_SETTINGS,
    TEXT_SETTINGS,
    EditJob,
    EditSettings,
    ImageJob,
    InfillJob,
    Job,
    TextJob,
    TextSettings,
    ignored_setting,
    job_key,
    job_rows,
)
from cm3leon_lightning.serve.lifecycle import StopWhenIdle
from cm3leon_lightning.serve.requests import (
    EditRequest,
    GenerationRequest,
    ImageRequest,
    InfillRequest,
    Rejected,
    TextRequest,
    chunk_by_rows,
    decode_base64_image,
    error_line,
    explain_unknown_fields,
    json_safe,
)
from cm3leon_lightning.serve.runs import JobRunner
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

log = logging.getLogger(__name__)


class CM3LeonAPI(JobRunner, StopWhenIdle, ls.LitAPI):
    """Serves a CM3Leon checkpoint over HTTP with LitServe (``POST /predict``, see
    :mod:`cm3leon_lightning.serve.requests` for the JSON).

    Args:
        ckpt: ``CM3LeonModule`` checkpoint (``.ckpt``, or the sharded directory FSDP writes) or a model directory of
            ``cm3leon export``, loaded without pickle.
        tokenizer: text tokenizer (``tokenizer.json`` or its directory); None: the model directory's ``tokenizer/``.
        vqgan: VQGAN directory (``VQGAN.from_pretrained``); needed for PNGs, image-to-text, editing and re-ranking.
            Without it text-to-image answers with codes only. None: the model directory's ``vqgan/`` if it has one.
        clip: open_clip model name for ``rerank`` requests and for retrieval (None: both refused with 400).
        clip_pretrained: open_clip weights tag or local weights file for ``clip``.
        retrieve: memory bank directory for retrieval-augmented prompts (needs ``clip``, the CLIP it was built with,
            and ``shards``); its documents are read into memory at setup.
        shards: the prepared dataset holding the bank's documents.
        retrieve_k: documents retrieved for a request that leaves ``retrieve`` out (0: none).
        image_defaults: text-to-image settings for fields a request leaves out (``seed`` is unused: a request
            without a seed gets a fresh one).
        text_defaults: image-to-text settings for fields a request leaves out.
        edit_defaults: image-editing settings for fields a request leaves out (default: the paper's guidance scales
            with ``image_defaults``' samples, temperature and top-p, and its method unless that is CD-K); a request
            for a grounded task gets the paper's single CFG 3 unless it gives its own scales.
        max_num_samples: the most candidates one request may ask for.
        max_rows: the most sequences (guidance streams x candidates, summed over requests) one decode holds; a
            larger group of requests is decoded in several chunks.
        dtype: transformer weights and KV cache: ``auto`` (bfloat16 on CUDA, float32 on CPU) or a dtype name.
        compile: how the decode step runs (None: the fastest available, see ``generation/graphs.py``).
        attention: ``sdpa`` or ``flex``.
        max_batch_size: requests gathered into one :meth:`predict` call.
        batch_timeout: seconds to wait for a batch to fill.
        api_path: the endpoint.
    """

    def __init__(
        self,
        ckpt: str,
        tokenizer: str | None = None,
        vqgan: str | None = None,
        clip: str | None = None,
        clip_pretrained: str | None = "openai",
        retrieve: str | None = None,
        shards: str | None = None,
        *,
        retrieve_k: int = 0,
        image_defaults: GenerationSettings | None = None,
        text_defaults: TextSettings | None = None,
        edit_defaults: EditSettings | None = None,
        max_num_samples: int = 16,
        max_rows: int = 128,
        dtype: str = "auto",
        compile: bool | str | None = None,
        attention: str = "sdpa",
        max_batch_size: int = 1,
        batch_timeout: float = 0.0,
        api_path: str = "/predict",
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        if max_num_samples < 1:
            raise ValueError(f"max_num_samples must be >= 1, got {max_num_samples}")
        if retrieve is not None and (clip is None or shards is None):
            raise ValueError("retrieve needs clip (the CLIP model the bank was built with) and shards (its documents)")
        if retrieve_k < 0 or (retrieve_k > 0 and retrieve is None):
            raise ValueError(f"retrieve_k must be >= 0, and 0 without a retrieve bank; got {retrieve_k}")
        self.bank_dir, self.shards_dir, self.retrieve_k = retrieve, shards, retrieve_k
        from cm3leon_lightning.generation.cli import bundled_tokenizers

        self.ckpt = str(ckpt)
        self.tokenizer_path, self.vqgan_path = bundled_tokenizers(ckpt, tokenizer, vqgan)
        self.clip_name, self.clip_pretrained = clip, clip_pretrained
        self.image_defaults = replace(image_defaults or GenerationSettings(num_samples=4), compile=compile)
        self.text_defaults = text_defaults or TextSettings()
        d = self.image_defaults
        self.edit_defaults = edit_defaults or EditSettings(
            num_samples=d.num_samples, method=d.method if d.method != "cd_k" else "top_p", temperature=d.temperature,
            top_p=d.top_p,
        )  # fmt: skip
        self.max_num_samples = max_num_samples
        chunk_by_rows([], max_rows)  # validates max_rows
        self.max_rows = max_rows
        self.dtype, self.compile, self.attention = dtype, compile, attention
        self._adapter = TypeAdapter(GenerationRequest)
        self._stop_signals, self._stop_at, self._pending, self._activity = 0, 0.0, 0, 0.0  # see StopWhenIdle

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, device: str) -> None:
        """Load the checkpoint, tokenizers and (optionally) CLIP on ``device``; mismatched vocabularies fail here."""
        from cm3leon_lightning.generation.cli import check_tokenizers, load_checkpoint, resolve_dtype
        from cm3leon_lightning.tokenization.text import TextTokenizer

        self.model, self.vocab = load_checkpoint(self.ckpt, device, resolve_dtype(self.dtype, device))
        self.model.set_attention(self.attention)
        self.tokenizer = TextTokenizer.load(self.tokenizer_path)
        self.vqgan = None
        if self.vqgan_path:
            from cm3leon_lightning.tokenization.vqgan import VQGAN

            self.vqgan = VQGAN.from_pretrained(self.vqgan_path, map_location=device).eval()
        check_tokenizers(self.vocab, self.tokenizer, self.vqgan, f"--ckpt {self.ckpt}", self.vqgan_path)
        self.clip = None
        if self.clip_name:
            from cm3leon_lightning.retrieval.encoder import ClipEncoder

            self.clip = ClipEncoder(self.clip_name, pretrained=self.clip_pretrained, device=str(device))
        self.retriever = None
        if self.bank_dir:
            from cm3leon_lightning.generation.retrieve import DocumentRetriever

            self.retriever = DocumentRetriever(
                self.bank_dir, self.shards_dir, self.clip, self.vocab, self.tokenizer.sha256, preload=True
            )
            warn_long_documents(self.retriever, self.retrieve_k, self.vocab, self.model.config.max_seq_len)
        self._rng = random.Random()  # seeds for requests without one
        self._serve_device = torch.device(device)
        self.install_stop_handlers()

    # ----------------------------------------------------------------------------------------------- requests
    def decode_request(self, request: GenerationRequest) -> Job | Rejected:  # type: ignore[override]
        """Check a request against this server and the model's context; a dict is validated against the schema
        first (the HTTP endpoint has done that already)."""
        self._touch(+1)  # answered in encode_response
        try:
            return self._decode_request(request)
        except BaseException:
            self._touch(-1)  # no answer of ours will follow
            raise

    def _decode_request(self, request: GenerationRequest) -> Job | Rejected:
        if isinstance(request, dict):
            try:
                request = self._adapter.validate_python(request)
            except ValidationError as e:
                return Rejected(422, error_line(e))
        defaults, flag = {
            ImageRequest: (self.image_defaults, "--method"), EditRequest: (self.edit_defaults, "default for edits"),
        }.get(type(request), (self.text_defaults, "--text-method"))  # fmt: skip
        ignored = ignored_setting(request, defaults, flag)
        if ignored is not None:  # as cm3leon generate refuses a flag its method ignores
            return Rejected(422, ignored)
        try:
            if isinstance(request, ImageRequest):
                return self._image_job(request)
            if isinstance(request, EditRequest):
                return self._edit_job(request)
            if isinstance(request, InfillRequest):
                return self._infill_job(request)
            return self._text_job(request)
        except ValueError as e:
            return Rejected(400, str(e))
        except Exception as e:  # noqa: BLE001 - a bug must fail this request, not its whole batch (LitServe: 500s)
            log.exception("request failed while being read")
            return Rejected(500, f"the server failed on this request: {type(e).__name__}: {e}")

    def _image_job(self, r: ImageRequest) -> ImageJob:
        overrides = r.model_dump(include=set(IMAGE_SETTINGS), exclude_none=True)
        settings = GenerationSettings(**{**asdict(self.image_defaults), **overrides})
        n = settings.num_samples
        if n > self.max_num_samples:
            raise ValueError(f"num_samples: {n} exceeds this server's limit of {self.max_num_samples}")
        missing = [flag for flag, part in (("--clip", self.clip), ("--vqgan", self.vqgan)) if part is None]
        if r.rerank and missing:  # a server with --clip for --retrieve may lack the VQGAN that draws the candidates
            raise ValueError(f"rerank: this server was started without {' and '.join(missing)}, so it cannot re-rank")
        if r.keep is not None and (not r.rerank or r.keep > n):
            raise ValueError(f"keep: needs rerank and at most num_samples={n} (got keep={r.keep})")
        k = self.retrieve_k if r.retrieve is None else r.retrieve
        if k and self.retriever is None:
            raise ValueError("retrieve: this server was started without --retrieve, so it has no memory bank")
        if k and k > len(self.retriever.bank):  # the retriever returned the whole bank, silently
            raise ValueError(f"retrieve: {k} documents asked for; the memory bank holds {len(self.retriever.bank)}")
        keys, docs = self.retriever.retrieve([r.prompt], k)[0] if k else ([], [])
        ids = self.tokenizer.encode(r.prompt)
        need = len(image_prompt(self.vocab, ids, docs)) + self.vocab.image_tokens
        if need > self.model.config.max_seq_len:
            limit = self.model.config.max_seq_len
            alone = len(image_prompt(self.vocab, ids, [])) + self.vocab.image_tokens
            name = "retrieve" if docs and alone <= limit else "prompt"  # no number of documents would help
            raise ValueError(
                f"{name}: {len(ids)} text tokens, {len(docs)} retrieved documents and {self.vocab.image_tokens} "
                f"image tokens need {need} positions, more than the model's context max_seq_len={limit}"
                + (f" (the prompt alone needs {alone})" if docs and name == "prompt" else "")
            )
        return ImageJob(r.prompt, ids, settings, r.seed, r.rerank, r.keep, r.return_codes, keys, docs)

    def _encode_image(self, data: str) -> torch.Tensor:
        """A request's base64 image as VQGAN codes ``(h*w,)`` on the CPU."""
        if self.vqgan is None:
            raise ValueError("image: this server was started without --vqgan, so it cannot read images")
        pixels = decode_base64_image(data, self.vqgan.config.resolution)  # (3, R, R) uint8
        with torch.no_grad():
            return self.vqgan.encode(pixels[None].to(self._serve_device))[0].cpu()

    def _edit_job(self, r: EditRequest) -> EditJob:
        overrides = r.model_dump(include=set(EDIT_SETTINGS), exclude_none=True)
        base = asdict(self.edit_defaults)
        if r.task != "edit":  # grounded generation: the paper's single CFG unless the request says otherwise
            base["text_cfg"], base["image_cfg"] = TASK_GUIDANCE[r.task]
        settings = EditSettings(**{**base, **overrides, "task": r.task})
        if settings.num_samples > self.max_num_samples:
            raise ValueError(
                f"num_samples: {settings.num_samples} exceeds this server's limit of {self.max_num_samples}"
            )
        codes = self._encode_image(r.image)
        instruction = self.tokenizer.encode(r.edit)
        # <eos> prefix <break> image <break> instruction <break>, then the edited image
        need = len(self.tokenizer.encode(task_prefix(r.task))) + len(instruction) + 4 + 2 * self.vocab.image_tokens
        if need > self.model.config.max_seq_len:
            raise ValueError(
                f"edit: the edit prompt and its image need {need} positions, more than the model's context "
                f"max_seq_len={self.model.config.max_seq_len}"
            )
        return EditJob(codes, instruction, settings, r.seed, r.return_codes)

    def _infill_job(self, r: InfillRequest) -> InfillJob:
        from cm3leon_lightning.generation.masking import infill_document, parse_rows

        n = r.num_samples or 1
        if n > self.max_num_samples:
            raise ValueError(f"num_samples: {n} exceeds this server's limit of {self.max_num_samples}")
        if r.rows is not None and r.image is None:
            raise ValueError("rows: redrawing rows needs the image")
        codes = self._encode_image(r.image).tolist() if r.image is not None else None
        try:  # the messages name the command-line flags; name the request's fields instead
            rows = parse_rows(r.rows, self.vocab.grid_h) if r.rows is not None else None
            ids, kinds = infill_document(self.tokenizer.encode, self.vocab, r.infill, codes, rows)
            body = ids[:-1] if ids and ids[-1] == self.vocab.eos_id else ids  # as infill_batch reads it
            plan = plan_spans(self.vocab, body, kinds)
        except ValueError as e:
            text = str(e).replace("--infill-rows", "rows").replace("--image", "image")
            raise ValueError(text if text.startswith(("rows", "image")) else f"infill: {text}") from e
        d = self.text_defaults
        span = r.max_span_tokens or d.max_new_tokens
        need = infill_positions(plan, len(body), span)
        if need > self.model.config.max_seq_len:
            raise ValueError(
                f"infill: {len(body)} tokens and {len(plan)} spans of up to max_span_tokens={span} (image spans: the "
                f"missing codes) need {need} positions, more than the model's context "
                f"max_seq_len={self.model.config.max_seq_len}"
            )
        return InfillJob(
            ids, kinds, n, r.method or d.method, d.temperature if r.temperature is None else r.temperature,
            d.top_p if r.top_p is None else r.top_p, span, r.seed, r.return_codes, rows is not None,
        )  # fmt: skip

    def _text_job(self, r: TextRequest) -> TextJob:
        overrides = r.model_dump(include=set(TEXT_SETTINGS), exclude_none=True)
        settings = TextSettings(**{**asdict(self.text_defaults), **overrides})
        codes = self._encode_image(r.image)
        instruction = self.tokenizer.encode(r.instruction) if r.instruction else []
        need = len(caption_prompt(self.vocab, codes.tolist(), instruction, settings.layout)) + settings.max_new_tokens
        if need > self.model.config.max_seq_len:
            raise ValueError(
                f"instruction: the prompt plus max_new_tokens={settings.max_new_tokens} needs {need} positions, more "
                f"than the model's context max_seq_len={self.model.config.max_seq_len}"
            )
        return TextJob(codes, instruction, settings, r.seed)

    # ----------------------------------------------------------------------------------------------- predict
    def predict(self, x: Any) -> Any:
        """Run a job, or a list of jobs grouped into as few decodes as their settings, seeds and ``max_rows``
        allow."""
        self._touch()
        try:
            return self._predict(x)
        except BaseException:
            self._pending = 0  # LitServe answers the batch itself: encode_response will not run
            raise
        finally:
            self._touch()

    def _predict(self, x: Any) -> Any:
        jobs = x if isinstance(x, list) else [x]
        results: list[Any] = list(jobs)  # Rejected entries pass through
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if not isinstance(job, Rejected):
                groups.setdefault(job_key(job, i), []).append(i)
        chunks = [
            [same[j] for j in chunk]
            for same in groups.values()
            for chunk in chunk_by_rows([job_rows(jobs[i]) for i in same], self.max_rows)
        ]
        for idx in chunks:
            group = [jobs[i] for i in idx]
            run = {
                ImageJob: self._run_images, TextJob: self._run_texts, EditJob: self._run_edits,
                InfillJob: self._run_infill,
            }[type(group[0])]  # fmt: skip
            try:
                outs = run(group)
            except ValueError as e:  # a setting the decoder refuses: answer these requests, not the batch
                outs = [Rejected(400, str(e))] * len(group)
            except Exception as e:  # noqa: BLE001 - an unexpected failure fails this decode's requests only
                log.exception("a decode failed")
                outs = [Rejected(500, f"the server failed on this request: {type(e).__name__}: {e}")] * len(group)
            for i, out in zip(idx, outs):
                results[i] = out
        return results if isinstance(x, list) else results[0]

    # ----------------------------------------------------------------------------------------------- responses
    def encode_response(self, output: Any) -> Any:
        """The JSON answer; a :class:`Rejected` request becomes its own 4xx response."""
        self._touch(-1)
        if isinstance(output, Rejected):
            return JSONResponse(status_code=output.status, content={"detail": output.detail})
        return output


def warn_long_documents(retriever: DocumentRetriever, k: int, vocab: MultimodalVocab, max_seq_len: int) -> str | None:
    """Log (and return) a warning when ``k`` of the preloaded bank documents of ``retriever`` need more positions
    than ``max_seq_len`` leaves beside a one-token prompt and the image to draw: the ``k`` shortest (every request
    that leaves ``retrieve`` out is refused) or the ``k`` longest (requests retrieving them are refused). ``cm3leon
    serve`` has refused a ``--k`` that no documents could fit before the workers started
    (:func:`~cm3leon_lightning.serve.cli.check_retrieve_k`); the exact lengths are known only here, once the shards
    are read."""
    documents = retriever.preloaded
    if not k or not documents:
        return None
    # <eos> text <break> image: one position per segment besides its tokens
    lengths = sorted(len(doc) + sum(len(seg.tokens) for seg in doc) for doc in documents.values())
    room = max_seq_len - 3 - vocab.image_tokens  # beside <eos> <one text token> <break> and the image to draw
    every = sum(lengths[:k]) > room  # even the k shortest do not fit
    need = sum(lengths[:k]) if every else sum(lengths[-k:])
    if need <= room:
        return None
    sizes = lengths if every else lengths[::-1]
    fit = next(n for n in range(k) if sum(sizes[: n + 1]) > room)  # how many of them fit together
    if every:
        outcome = f"every request that leaves 'retrieve' out will be refused (the largest --k that fits is {fit})"
    else:
        outcome = f"a request whose nearest documents are long ones will be refused (--k {fit} always fits)"
    message = (
        f"--k {k}: the {k} {'shortest' if every else 'longest'} documents of the bank need {need} positions, more "
        f"than the {room} the model's context max_seq_len={max_seq_len} leaves beside a one-token prompt and the "
        f"{vocab.image_tokens} image tokens to draw; {outcome}"
    )
    log.warning(message)
    return message


def body_errors(errors: list[dict[str, Any]], content_type: str | None) -> list[dict[str, Any]]:
    """``errors`` (FastAPI's, for ``POST /predict``) with a body that is no JSON object named as such: FastAPI reads a
    body as JSON only under ``Content-Type: application/json`` (``curl -d`` sends a form's type), and the union's
    error then blamed the field ``prompt`` ("Input should be a valid dictionary") of a well-formed request."""
    if not any(e.get("type") == "model_attributes_type" and tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
        return errors
    if "json" not in (content_type or "").lower():
        got = f"got {content_type!r}" if content_type else "it had none"
        msg = f"not read as JSON: send the header Content-Type: application/json ({got})"
    else:
        msg = 'must be a JSON object, e.g. {"prompt": "a red circle"}'
    return [{"type": "body_not_json_object", "loc": ["body"], "msg": f"body: {msg}"}]


async def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer naming the fields, with the echoed input made strict JSON (:func:`json_safe`): FastAPI's
    own handler failed with a 500 and a traceback on ``NaN``, ``Infinity``, ``1e400`` or a lone surrogate. A body that
    is not a JSON object is named as such (:func:`body_errors`), and an unknown field with the fields its kind takes
    (:func:`~cm3leon_lightning.serve.requests.explain_unknown_fields`). The messages are ours and pydantic's, never the
    request's text (an unknown field's name is cut to 40 characters), so they are kept whole (only the echo of the
    request is cut short)."""
    errors = explain_unknown_fields(jsonable_encoder(exc.errors()))
    errors = body_errors(errors, request.headers.get("content-type"))
    detail = [
        {**json_safe(e), "msg": json_safe(e["msg"], max_chars=2000)} if "msg" in e else json_safe(e) for e in errors
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> FastAPI:
    """Answer malformed requests to ``app`` (``LitServer.app``) with :func:`validation_error_response`."""
    app.add_exception_handler(RequestValidationError, validation_error_response)  # type: ignore[arg-type]
    return app
