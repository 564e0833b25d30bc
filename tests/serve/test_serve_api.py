"""``CM3LeonAPI`` without a server: a batch of requests decodes in as few calls as its settings allow, every answer
equals the same request decoded on its own, and a request the server cannot honour is answered alone."""

import re

import pytest
from fastapi.responses import JSONResponse
from support.images import png_base64

import cm3leon_lightning.serve.runs as runs_module
from cm3leon_lightning.generation import edit_image, generate_image, generate_text, rerank
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.tasks import EDIT_PREFIX, task_prefix
from cm3leon_lightning.retrieval.encoder import ClipEncoder
from cm3leon_lightning.serve import CM3LeonAPI, EditSettings, ImageJob, Rejected, TextJob, TextSettings
from cm3leon_lightning.serve.requests import decode_base64_image, encode_png_base64
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN


def make_api(root, **kwargs):
    kw = dict(vqgan=str(root / "vqgan"), clip="cm3leon-clip-tiny", clip_pretrained=str(root / "clip.safetensors"))
    api = CM3LeonAPI(str(root / "model.ckpt"), str(root / "tok"), compile=False, **{**kw, **kwargs})
    api.setup("cpu")
    return api


@pytest.fixture(scope="module")
def api(serve_assets):
    return make_api(serve_assets)


@pytest.fixture(scope="module")
def direct(serve_assets):
    """The model and tokenizers loaded the way a user would, to decode requests one by one."""
    model, vocab = load_checkpoint(serve_assets / "model.ckpt")
    tok = TextTokenizer.load(serve_assets / "tok")
    vqgan = VQGAN.from_pretrained(serve_assets / "vqgan").eval()
    return model, vocab, tok, vqgan


def counting(monkeypatch, name):
    """Wrap ``serve.runs.<name>`` to record the number of prompts (or images) of every call: one per candidate for
    images and edits, which the API decodes as one row per candidate."""
    calls, real = [], getattr(runs_module, name)

    def wrapper(model, vocab, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(model, vocab, rows, *args, **kwargs)

    monkeypatch.setattr(runs_module, name, wrapper)
    return calls


def solo_image(direct, prompt, **kwargs):
    model, vocab, tok, vqgan = direct
    return generate_image(model, vocab, [tok.encode(prompt)], vqgan=vqgan, compile=False, **kwargs)


def test_a_batch_decodes_in_groups_and_each_answer_equals_its_solo_decode(api, direct, monkeypatch):
    image_calls, text_calls = counting(monkeypatch, "generate_image"), counting(monkeypatch, "generate_text")
    greedy = {"method": "greedy", "num_samples": 2, "cfg": 3.0}
    sampled = {"method": "top_p", "num_samples": 2, "top_p": 0.8, "seed": 11}
    requests = [
        {"prompt": "a red circle", **greedy},
        {"image": png_base64(0), "instruction": "what colour is it"},
        {"prompt": "two green triangles", **greedy},
        {"prompt": "a blue square", **sampled},
        {"prompt": "a blue square", **sampled},  # same seed, same request: decoded apart, same images
        {"prompt": "a red circle " * 80},  # too long for the 256-token context
        {"image": png_base64(1)},
        {"prompt": "a small red square", "num_samples": 3},  # server defaults, no seed
    ]
    jobs = [api.decode_request(r) for r in requests]
    assert [type(j) for j in jobs] == [ImageJob, TextJob, ImageJob, ImageJob, ImageJob, Rejected, TextJob, ImageJob]
    out = api.predict(jobs)
    # the greedy pair in one decode (2 x 2 candidates), each seeded request alone, the defaults' request alone; texts
    assert sorted(image_calls) == [2, 2, 3, 4] and text_calls == [2]

    for i, prompt in ((0, "a red circle"), (2, "two green triangles")):
        want = solo_image(direct, prompt, **greedy)
        assert out[i]["images"] == [encode_png_base64(im) for im in want.images[0]] and out[i]["seed"] is None
        assert "codes" not in out[i]
    want = solo_image(direct, "a blue square", **sampled)
    assert out[3]["images"] == [encode_png_base64(im) for im in want.images[0]] == out[4]["images"]
    assert out[3]["seed"] == 11
    assert len(out[7]["images"]) == 3  # num_samples from the request, the rest from the server's defaults

    assert isinstance(out[5], Rejected) and out[5].status == 400
    assert "prompt: " in out[5].detail and "max_seq_len=256" in out[5].detail
    model, vocab, tok, vqgan = direct
    for i, seed, instruction in ((1, 0, "what colour is it"), (6, 1, "")):
        codes = vqgan.encode(decode_base64_image(png_base64(seed), 16)[None])
        want = generate_text(model, vocab, codes, tok.encode(instruction) if instruction else None, compile=False)
        assert out[i] == {"text": tok.decode(want[0])}


def test_max_rows_splits_a_group_into_decodes_of_bounded_size(serve_assets, direct, monkeypatch):
    """Three greedy requests of 2 candidates with CFG (4 rows each): one decode of 12 rows by default, 8 + 4 under
    max_rows=8, and the same images either way."""
    calls = counting(monkeypatch, "generate_image")
    bodies = [{"prompt": p, "method": "greedy", "num_samples": 2} for p in ("a red circle", "a blue square", "x")]
    answers = {}
    for max_rows in (128, 8):
        api = make_api(serve_assets, clip=None, max_rows=max_rows)
        answers[max_rows] = api.predict([api.decode_request(b) for b in bodies])
    assert calls == [6, 4, 2]  # candidates per decode
    assert answers[128] == answers[8]
    want = solo_image(direct, "a blue square", method="greedy", num_samples=2)
    assert answers[8][1]["images"] == [encode_png_base64(im) for im in want.images[0]]


def test_requests_for_different_numbers_of_candidates_share_a_decode(api, direct, monkeypatch):
    """Greedy requests for 1 and 3 candidates: one decode of 4 rows (a row per candidate), each answer equal to the
    request decoded on its own with num_samples."""
    calls = counting(monkeypatch, "generate_image")
    bodies = [{"prompt": "a red circle", "method": "greedy", "num_samples": n, "return_codes": True} for n in (1, 3)]
    out = api.predict([api.decode_request(b) for b in bodies])
    assert calls == [4]
    for body, answer in zip(bodies, out):
        want = solo_image(direct, body["prompt"], method="greedy", num_samples=body["num_samples"])
        assert answer["codes"] == want.codes[0].tolist()
        assert answer["images"] == [encode_png_base64(im) for im in want.images[0]]


def test_rerank_orders_by_clip_score_and_keeps_the_best(api, direct, serve_assets):
    out = api.predict(api.decode_request({"prompt": "a red circle", "num_samples": 4, "seed": 3, "rerank": True,
                                          "keep": 2, "return_codes": True}))  # fmt: skip
    want = solo_image(direct, "a red circle", num_samples=4, seed=3, cfg=3.0, method="top_p")
    clip = ClipEncoder("cm3leon-clip-tiny", pretrained=str(serve_assets / "clip.safetensors"))
    best = rerank(clip, ["a red circle"], want.images, want.codes, keep=2)
    assert out["images"] == [encode_png_base64(im) for im in best.images[0]]
    assert out["codes"] == best.codes[0].tolist()
    assert out["clip_scores"] == pytest.approx(best.scores[0].tolist(), abs=1e-6)
    assert out["clip_scores"][0] >= out["clip_scores"][1]


def test_edit_requests_equal_edit_image_and_seeded_ones_decode_alone(api, direct, monkeypatch):
    """An edit request runs edit_image (three guidance streams) on its picture's codes with the SFT edit prefix;
    unseeded edits with equal settings share one call, a seeded one is decoded alone and reproducible."""
    calls = counting(monkeypatch, "edit_image")
    model, vocab, tok, vqgan = direct
    seeded = {"image": png_base64(0), "edit": "make it blue", "num_samples": 2, "seed": 5, "text_cfg": 4.0,
              "image_cfg": 1.2, "return_codes": True}  # fmt: skip
    bodies = [seeded, {"image": png_base64(1), "edit": "make it red"}, {"image": png_base64(2), "edit": "a square"}]
    jobs = [api.decode_request(b) for b in bodies]
    assert [type(j).__name__ for j in jobs] == ["EditJob"] * 3
    assert jobs[1].settings == EditSettings()  # the server's: 4 samples of top-p, the paper's 7.5 / 1.5
    out = api.predict(jobs)
    assert sorted(calls) == [2, 8]  # candidates per decode: the seeded request's 2; both unseeded ones' 4 + 4
    codes = vqgan.encode(decode_base64_image(png_base64(0), 16)[None])
    want = edit_image(model, vocab, codes, [tok.encode("make it blue")], tok.encode(EDIT_PREFIX), text_cfg=4.0,
                      image_cfg=1.2, num_samples=2, seed=5, vqgan=vqgan)  # fmt: skip
    assert out[0]["codes"] == want.codes[0].tolist() and out[0]["seed"] == 5
    assert out[0]["images"] == [encode_png_base64(im) for im in want.images[0]]
    assert [len(o["images"]) for o in out[1:]] == [4, 4] and "codes" not in out[1]


def test_grounded_generation_uses_the_task_prefix_and_a_single_cfg(api, direct):
    """task depth_to_image: the depth template's prefix, and the paper's CFG 3 for both scales unless given."""
    model, vocab, tok, vqgan = direct
    body = {"image": png_base64(3), "edit": "a red circle", "task": "depth_to_image", "num_samples": 1, "seed": 2,
            "return_codes": True}  # fmt: skip
    job = api.decode_request(body)
    assert (job.settings.task, job.settings.text_cfg, job.settings.image_cfg) == ("depth_to_image", 3.0, 3.0)
    assert api.decode_request({**body, "text_cfg": 5.0}).settings.text_cfg == 5.0
    codes = vqgan.encode(decode_base64_image(png_base64(3), 16)[None])
    want = edit_image(model, vocab, codes, [tok.encode("a red circle")], tok.encode(task_prefix("depth_to_image")),
                      text_cfg=3.0, image_cfg=3.0, num_samples=1, seed=2)  # fmt: skip
    assert api.predict(job)["codes"] == want.codes[0].tolist()


def test_infill_requests_equal_infill_batch(api, direct):
    """Caption spans and image rows filled as infill_batch() fills a request's samples, in one decode."""
    from cm3leon_lightning.generation import infill, infill_batch
    from cm3leon_lightning.generation.masking import infill_document

    model, vocab, tok, vqgan = direct
    body = {"infill": "a <mask> circle", "image": png_base64(4), "rows": "2:4", "num_samples": 2, "seed": 5,
            "method": "top_p", "return_codes": True}  # fmt: skip
    out = api.predict(api.decode_request(body))
    codes = vqgan.encode(decode_base64_image(png_base64(4), 16)[None])[0].tolist()
    ids, kinds = infill_document(tok.encode, vocab, "a <mask> circle", codes, (2, 4))
    both = infill_batch(model, vocab, [ids, ids], span_kinds=[kinds, kinds], method="top_p", seed=5)
    for i, result in enumerate(both):
        doc = vocab.ids_to_document(result.ids)
        assert out["texts"][i] == tok.decode(list(doc[0].tokens)) and out["codes"][i] == list(doc[1].tokens)
    assert len(out["images"]) == 2 and out["seed"] == 5
    text_only = api.predict(api.decode_request({"infill": "a red <mask>"}))  # greedy, one sample: the defaults
    ids, kinds = infill_document(tok.encode, vocab, "a red <mask>")
    want = vocab.ids_to_document(infill(model, vocab, ids, span_kinds=kinds).ids)[0].tokens
    assert text_only == {"seed": None, "texts": [tok.decode(list(want))]}


def test_infill_requests_with_spans_of_the_same_modalities_share_a_decode(api, direct, monkeypatch):
    """Greedy infill requests of different captions (2 samples each) decode as one batch of rows and each answer is
    its solo infill; a request with an image span, or with a seed, decodes apart."""
    from cm3leon_lightning.generation import infill
    from cm3leon_lightning.generation.masking import infill_document

    calls = counting(monkeypatch, "infill_batch")
    model, vocab, tok, _ = direct
    texts = ["a <mask> circle", "two green <mask>", "<mask> square"]
    requests = [{"infill": t, "method": "greedy", "num_samples": 2, "max_span_tokens": 5} for t in texts]
    requests += [{"infill": "a <mask> circle", "image": png_base64(4), "rows": "2:4", "method": "greedy"}]
    requests += [{"infill": "a <mask> circle", "method": "top_p", "seed": 3}, {"infill": "a <mask>", "method": "top_p"}]
    out = api.predict([api.decode_request(r) for r in requests])
    assert sorted(calls) == [1, 1, 1, 6]  # three captions x 2 samples together; the image span, the seeded, the rest
    for text, answer in zip(texts, out):
        ids, kinds = infill_document(tok.encode, vocab, text)
        want = vocab.ids_to_document(infill(model, vocab, ids, span_kinds=kinds, max_span_tokens=5).ids)[0].tokens
        assert answer == {"seed": None, "texts": [tok.decode(list(want))] * 2}


def test_infill_requests_that_fit_alone_but_not_together_decode_apart(api, monkeypatch):
    """A long caption missing one grid row and a short one missing the whole image both fit the 256-token context,
    but not in one batch (left-padded to the longer prompt, both decoding 64 codes): each is answered as when alone,
    not both refused with 400 (found in review)."""
    calls = counting(monkeypatch, "infill_batch")
    fits = [n for n in range(20, 60) if not isinstance(api.decode_request(long_infill(n)), Rejected)]
    long, short = long_infill(max(fits)), {"infill": "x", "image": png_base64(1), "rows": "0:8", "method": "greedy"}
    jobs = [api.decode_request(b) for b in (long, short)]
    assert len(jobs[0].ids) + 2 + 64 + 2 > 256  # together: the long prompt and the whole image's 64 codes
    out = api.predict(jobs)
    assert calls == [1, 1]
    assert out == [api.predict(api.decode_request(b)) for b in (long, short)] and "images" in out[0]
    calls.clear()
    out = api.predict([api.decode_request(short), api.decode_request({**short, "image": png_base64(2)})])
    assert calls == [2] and all("images" in o for o in out)  # requests that fit together still share a decode


def long_infill(words: int) -> dict:
    return {"infill": " ".join(["circle"] * words), "image": png_base64(0), "rows": "7:8", "method": "greedy"}


@pytest.mark.parametrize(
    "request_, status, detail",
    [
        ({"prompt": "x", "num_samples": 17}, 400, "num_samples: 17 exceeds this server's limit of 16"),
        ({"prompt": "x", "keep": 1}, 400, "keep: needs rerank"),
        ({"prompt": "x", "rerank": True, "num_samples": 2, "keep": 3}, 400, "keep: needs rerank and at most"),
        ({"prompt": "x", "method": "cd_k", "cdk_alpha": 0.5, "cdk_k": 0}, 422, "cdk_k"),
        ({"image": "%%%"}, 400, "image: not valid base64"),
        ({"image": png_base64(0), "max_new_tokens": 200}, 400, "instruction: the prompt plus max_new_tokens=200"),
        ({"image": png_base64(0), "edit": "make it blue " * 40}, 400, "edit: the edit prompt and its image need"),
        ({"image": png_base64(0), "edit": "x", "method": "cd_k"}, 422, "method"),
        ({"image": png_base64(0), "edit": "x", "task": "vqa"}, 422, "task"),
        ({"infill": "a <mask>", "rows": "0:2"}, 400, "rows: redrawing rows needs the image"),
        ({"infill": "a red circle"}, 400, "nothing to fill: put <mask> in the text or give rows"),
        (
            {"infill": "a red circle", "image": png_base64(0), "rows": "0:9"},
            400,
            "rows must be A:B with 0 <= A < B <= 8",
        ),
        ({"infill": "a <mask>", "rows": "top"}, 422, "rows"),
        ({"image": png_base64(0), "edit": "x", "num_samples": 17}, 400, "num_samples: 17 exceeds"),
        ({"infill": "a <mask> b <mask> c <mask>", "max_span_tokens": 100}, 400, "spans of up to max_span_tokens=100"),
        ({"infill": "a" + " <mask>" * 9}, 400, "infill: 9 masks"),
    ],
)
def test_a_request_the_server_cannot_honour_is_rejected_naming_the_field(api, request_, status, detail):
    job = api.decode_request(request_)
    assert isinstance(job, Rejected) and job.status == status and detail in job.detail
    response = api.encode_response(job)
    assert isinstance(response, JSONResponse) and response.status_code == status and detail.encode() in response.body


@pytest.mark.parametrize(
    "request_, detail",
    [
        ({"prompt": "x", "method": "greedy", "temperature": 0.7},
         "temperature 0.7 applies to method temperature, top_p or cd_k only; this request decodes with method greedy, "
         "which ignores it"),
        ({"prompt": "x", "method": "temperature", "top_p": 0.5},
         "top_p 0.5 applies to method top_p only; this request decodes with method temperature, which ignores it"),
        ({"prompt": "x", "method": "cd_k", "cfg": 2.0},
         "cfg 2.0 applies to method greedy, temperature or top_p only; this request decodes with method cd_k, which "
         "ignores it"),
        ({"prompt": "x", "cdk_k": 4},
         "cdk_k 4 applies to method cd_k only; this request decodes with method top_p (this server's --method), which "
         "ignores it"),
        ({"prompt": "x", "method": "top_p", "cdk_alpha": 0.2}, "cdk_alpha 0.2 applies to method cd_k only"),
        ({"prompt": "x", "method": "greedy", "top_k": 3}, "top_k 3 applies to method temperature, top_p or cd_k only"),
        ({"image": png_base64(0), "temperature": 0.7},
         "temperature 0.7 applies to method temperature or top_p only; this request decodes with method greedy (this "
         "server's --text-method), which ignores it"),
        ({"image": png_base64(0), "edit": "x", "method": "greedy", "top_p": 0.5},
         "top_p 0.5 applies to method top_p only; this request decodes with method greedy, which ignores it"),
        ({"infill": "a <mask>", "method": "temperature", "top_p": 0.5},
         "top_p 0.5 applies to method top_p only; this request decodes with method temperature, which ignores it"),
        ({"infill": "a <mask>", "temperature": 0.5},
         "temperature 0.5 applies to method temperature or top_p only; this request decodes with method greedy (this "
         "server's --text-method), which ignores it"),
    ],
)  # fmt: skip
def test_a_setting_the_method_ignores_is_refused_as_generate_refuses_it(api, request_, detail):
    """Decoded as if the field had been left out (``cm3leon generate`` refuses the same flags): 422 naming it."""
    job = api.decode_request(request_)
    assert isinstance(job, Rejected) and job.status == 422 and job.detail.startswith(detail), job


@pytest.mark.parametrize(
    "request_",
    [
        {"prompt": "x", "method": "greedy", "temperature": 1.0, "top_p": 0.9, "cdk_k": 8},  # the server's defaults
        {"prompt": "x", "method": "cd_k", "temperature": 0.7, "cdk_k": 4, "cdk_alpha": 0.0, "top_k": 5},
        {"prompt": "x", "temperature": 0.7, "top_p": 0.5, "cfg": 2.0},  # the server's method: top_p
        {"image": png_base64(0), "method": "top_p", "temperature": 0.7, "top_p": 0.5},
    ],
)
def test_the_settings_a_method_reads_are_accepted(api, request_):
    assert not isinstance(api.decode_request(request_), Rejected)


def test_requests_are_tokenized_as_the_training_captions(api, direct):
    """A prompt, instruction, edit or infill caption with a trailing newline, a tab or a doubled space was tokenized
    as sent (tokens the model never saw after a training caption); each is now the cleaned text's ids, and one that
    cleans to nothing is answered 422 naming its field."""
    _, vocab, tok, _ = direct
    job = api.decode_request({"prompt": "a red  circle\t\n", "num_samples": 1})
    assert job.ids == tok.encode("a red circle") == [77, 278, 274, 289, 284] and job.prompt == "a red circle"
    assert tok.encode("a red  circle\t\n") != job.ids
    job = api.decode_request({"image": png_base64(0), "instruction": "Question: what is\nred?  Answer: "})
    assert job.instruction == tok.encode("Question: what is red? Answer:")
    assert api.decode_request({"image": png_base64(0), "edit": "make it\tblue\n"}).instruction == tok.encode(
        "make it blue"
    )
    job = api.decode_request({"infill": " a  <mask> circle\n"})
    assert job.ids == [vocab.eos_id, *tok.encode("a"), vocab.sentinel_id(0), *tok.encode(" circle")]
    image = png_base64(0)
    for request_, field in (({"prompt": "\n "}, "prompt"), ({"image": image, "instruction": " "}, "instruction"),
                            ({"image": image, "edit": "\t"}, "edit"), ({"infill": "\x00"}, "infill")):  # fmt: skip
        job = api.decode_request(request_)
        assert isinstance(job, Rejected) and job.status == 422
        assert f"{field}: " in job.detail and "holds no text (only whitespace or control characters)" in job.detail
        api.encode_response(job)


@pytest.mark.parametrize(
    "request_, detail",
    [
        ({"prompt": "x", "num_samples": 0, "colour": 1},  # was "colour: Extra inputs are not permitted"
         "num_samples: Input should be greater than or equal to 1; colour is not a field of a text-to-image request, "
         "which takes prompt, num_samples, method, cfg, temperature, top_p, top_k, cdk_k, cdk_alpha, seed, retrieve, "
         "rerank, keep, return_codes"),
        ({"prompt": "x", "cfg": float("nan")}, "cfg must be a number in [0, 100], not NaN"),
        ({"prompt": "\n"}, "prompt: the prompt holds no text (only whitespace or control characters)"),
        ({"prompt": "x", "image": "aGk="}, "prompt and image cannot be sent together: a request has either prompt "
         "(text-to-image), image with an optional instruction (image-to-text), image and edit (image editing) or "
         "infill with an optional image (infilling)"),
    ],
)  # fmt: skip
def test_a_dict_request_from_python_is_refused_in_one_line(api, request_, detail):
    """``decode_request`` with a dict (from Python; LitServe hands over the validated model) answered with pydantic's
    text: "1 validation error for tagged-union[ImageRequest,...]", a line per field and a documentation URL."""
    job = api.decode_request(request_)
    assert job == Rejected(422, detail)
    api.encode_response(job)  # answered: the server's count of requests in flight is even again


def test_an_unexpected_failure_fails_its_request_or_decode_only(api, monkeypatch):
    """Whatever raises while a request is read, or while a decode runs, is that request's 500: LitServe would answer
    every request of the batch with 500."""
    tok = api.tokenizer
    real_encode = tok.encode

    def encode(text: str) -> list[int]:
        if "boom" in text:
            raise TypeError("TextInputSequence must be str")
        return real_encode(text)

    monkeypatch.setattr(tok, "encode", encode)
    jobs = [api.decode_request(r) for r in ({"prompt": "boom"}, {"prompt": "a red circle", "method": "greedy"})]
    assert isinstance(jobs[0], Rejected) and jobs[0].status == 500 and "TypeError" in jobs[0].detail
    texts = [api.decode_request({"image": png_base64(i), "method": "greedy"}) for i in range(2)]
    monkeypatch.setattr(api, "_run_texts", lambda group: 1 / 0)
    out = api.predict([jobs[0], jobs[1], *texts])
    assert out[0] is jobs[0] and "images" in out[1]  # the image decode ran as usual
    assert all(isinstance(o, Rejected) and o.status == 500 and "ZeroDivisionError" in o.detail for o in out[2:])


def test_a_server_without_vqgan_or_clip_answers_codes_and_refuses_what_it_cannot_do(serve_assets, direct):
    api = make_api(serve_assets, vqgan=None, clip=None)
    out = api.predict(api.decode_request({"prompt": "a red circle", "method": "greedy", "num_samples": 2}))
    want = solo_image(direct, "a red circle", method="greedy", num_samples=2)
    assert set(out) == {"seed", "codes"} and out["codes"] == want.codes[0].tolist()
    refusals = (({"prompt": "x", "rerank": True}, "rerank: this server was started without --clip and --vqgan"),
                ({"image": png_base64(0)}, "image: this server was started without --vqgan"))  # fmt: skip
    for request, detail in refusals:
        job = api.decode_request(request)
        assert isinstance(job, Rejected) and job.status == 400 and detail in job.detail


def test_server_defaults_apply_to_fields_a_request_leaves_out(serve_assets):
    api = make_api(serve_assets, text_defaults=TextSettings(layout="image_first", max_new_tokens=5), clip=None)
    job = api.decode_request({"image": png_base64(0)})
    assert job.settings == TextSettings(layout="image_first", max_new_tokens=5)
    job = api.decode_request({"image": png_base64(0), "max_new_tokens": 7, "layout": "infill"})
    assert (job.settings.layout, job.settings.max_new_tokens) == ("infill", 7)
    assert api.image_defaults.num_samples == 4 and api.decode_request({"prompt": "x"}).settings.num_samples == 4
    with pytest.raises(ValueError, match="layout must be one of"):
        TextSettings(layout="sideways")
    with pytest.raises(ValueError, match="max_num_samples"):
        CM3LeonAPI("m.ckpt", "tok", max_num_samples=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TextSettings(temperature=float("nan")), "temperature must be finite and >= 0 (0 = greedy), got nan"),
        (lambda: TextSettings(method="top_p", top_p=0.0), "top_p must lie in (0, 1], got 0.0"),
        (lambda: EditSettings(temperature=-1.0), "temperature must be finite and >= 0 (0 = greedy), got -1.0"),
        (lambda: EditSettings(text_cfg=float("inf")), "text_cfg must be finite, got inf"),
        (lambda: EditSettings(image_cfg=float("nan")), "image_cfg must be finite, got nan"),
    ],
)
def test_bad_server_defaults_are_refused_naming_the_setting(make, message):
    """Accepted before, then every request (greedy ones too) of that kind was answered 400 as if it had sent it."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make()


def test_a_greedy_batch_is_equal_to_one_decode_per_request(api, direct):
    """Left-padded prompts of different lengths in one decode give the same greedy images as decoding each alone
    (each request's codes are decoded to pixels apart, so the VQGAN's batch size cannot change a pixel either)."""
    prompts = ["a red circle", "two green triangles and a small red square", "a blue square"]
    jobs = [api.decode_request({"prompt": p, "method": "greedy", "num_samples": 1, "cfg": 2.0}) for p in prompts]
    out = api.predict(jobs)
    for p, answer in zip(prompts, out):
        want = solo_image(direct, p, method="greedy", num_samples=1, cfg=2.0)
        assert answer["images"] == [encode_png_base64(want.images[0, 0])]


def test_a_batch_of_all_four_kinds_answers_each_request_as_alone(serve_assets):
    """Greedy requests of the four kinds interleaved, with different settings and numbers of candidates, and a seeded
    sampled edit, cut into decodes of at most 4 rows: each answer is the one its request gets alone, in its place."""
    api = make_api(serve_assets, clip=None, max_rows=4)
    g = {"method": "greedy", "return_codes": True}
    bodies = [
        {"prompt": "a red circle", "num_samples": 2, **g},
        {"image": png_base64(0), "method": "greedy", "max_new_tokens": 4},
        {"image": png_base64(1), "edit": "make it blue", "num_samples": 1, **g},
        {"infill": "a <mask>", "image": png_base64(3), "rows": "1:2", "max_span_tokens": 4, **g},
        {"prompt": "x", "num_samples": 1, "cfg": 1.0, **g},
        {"image": png_base64(2), "edit": "x", "num_samples": 1, **g, "method": "top_p", "seed": 3},
        {"infill": "<mask> square", "method": "greedy", "num_samples": 2, "max_span_tokens": 4},
        {"image": png_base64(1), "method": "greedy", "max_new_tokens": 4, "instruction": "what colour is it"},
    ]
    out = api.predict([api.decode_request(b) for b in bodies])
    assert out == [api.predict(api.decode_request(b)) for b in bodies]
    assert [sorted(o) for o in out] == [
        ["codes", "images", "seed"], ["text"], ["codes", "images", "seed"], ["codes", "images", "seed", "texts"],
        ["codes", "images", "seed"], ["codes", "images", "seed"], ["seed", "texts"], ["text"],
    ]  # fmt: skip
    assert [len(o.get("images", o.get("texts", [0]))) for o in out] == [2, 1, 1, 1, 1, 1, 2, 1]
