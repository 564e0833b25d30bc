"""The request schema of ``cm3leon serve`` and its pure helpers: which kind a body is, what it rejects (naming the
field), how requests group into decode batches, and the image round trip through base64."""

import base64

import pytest
import torch
from pydantic import TypeAdapter, ValidationError
from support.images import png_base64

from cm3leon_lightning.serve.requests import (
    MAX_TEXT_CHARS,
    EditRequest,
    GenerationRequest,
    ImageRequest,
    InfillRequest,
    TextRequest,
    chunk_by_rows,
    decode_base64_image,
    encode_png_base64,
    error_line,
    explain_unknown_fields,
    group_key,
    json_safe,
    request_kind,
)

ADAPTER = TypeAdapter(GenerationRequest)


def test_the_body_is_told_apart_by_its_fields():
    r = ADAPTER.validate_python({"prompt": "a red circle", "num_samples": 3, "seed": 5})
    assert isinstance(r, ImageRequest) and (r.num_samples, r.seed, r.cfg) == (3, 5, None)
    t = ADAPTER.validate_python({"image": "aGk=", "instruction": "What is it?", "layout": "image_first"})
    assert isinstance(t, TextRequest) and t.layout == "image_first" and t.max_new_tokens is None
    e = ADAPTER.validate_python({"image": "aGk=", "edit": "make it blue", "text_cfg": 5})
    assert isinstance(e, EditRequest) and e.text_cfg == 5.0 and e.image_cfg is None
    assert request_kind(r) == "prompt" and request_kind(t) == "image" and request_kind(e) == "edit"
    assert request_kind({"image": 1}) == "image" and request_kind({"image": 1, "edit": 2}) == "edit"
    f = ADAPTER.validate_python({"infill": "a <mask> circle", "image": "aGk=", "rows": "2:"})
    assert isinstance(f, InfillRequest) and request_kind(f) == "infill" and f.rows == "2:"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "num_samples": 0}, "num_samples"),
        ({"prompt": "x", "num_samples": 65}, "num_samples"),
        ({"prompt": "x", "method": "beam"}, "method"),
        ({"prompt": "x", "top_p": 0.0}, "top_p"),
        ({"prompt": "x", "cfg": -1}, "cfg"),
        ({"prompt": "x", "seed": -3}, "seed"),
        ({"prompt": "x", "sampels": 2}, "sampels"),  # a misspelt field is refused, not ignored
        ({"prompt": ""}, "prompt"),
        ({"image": "aGk=", "method": "cd_k"}, "method"),  # CD-K is for images only
        ({"image": "aGk=", "max_new_tokens": 0}, "max_new_tokens"),
        ({"image": "aGk=", "edit": ""}, "edit"),
        ({"edit": "x"}, "image"),
        ({"instruction": "x"}, "image"),  # the image is what is missing (was: prompt missing, instruction unknown)
        ({"image": "aGk=", "instruction": "\udfff"}, "instruction"),  # a lone surrogate the tokenizer cannot take
        ({"prompt": "a \ud800 b"}, "prompt"),
        ({"infill": "a <mask> \udfff"}, "infill"),
        # text longer than MAX_TEXT_CHARS is refused before it is tokenized (20 MB held the worker for 30 s)
        ({"prompt": "a" * (MAX_TEXT_CHARS + 1)}, "prompt"),
        ({"image": "aGk=", "instruction": "a" * (MAX_TEXT_CHARS + 1)}, "instruction"),
        ({"image": "aGk=", "edit": "a" * (MAX_TEXT_CHARS + 1)}, "edit"),
        ({"infill": "a <mask>" + "a" * MAX_TEXT_CHARS}, "infill"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(body)
    assert [field] in [[str(x) for x in err["loc"]][-1:] for err in e.value.errors()]


KINDS = (
    "prompt (text-to-image), image with an optional instruction (image-to-text), image and edit (image editing) or "
    "infill with an optional image (infilling)"
)
NONE = f"the request has none of prompt, image or infill: it needs either {KINDS}"


@pytest.mark.parametrize(
    "body, message",
    [
        # were "image.prompt: Extra inputs are not permitted", "prompt.prompt: Field required", ...: one kind's fields
        ({"image": "aGk=", "prompt": "x"}, "prompt and image"),
        ({"prompt": "x", "instruction": "y"}, "prompt and instruction"),
        ({"prompt": "x", "image": "aGk=", "edit": "y"}, "prompt, image and edit"),
        ({"image": "aGk=", "edit": "x", "instruction": "y"}, "instruction and edit"),
        ({"infill": "a <mask>", "edit": "x"}, "edit and infill"),
        ({}, NONE),
        ({"num_samples": 2, "seed": 1}, NONE),
    ],
)
def test_a_body_of_no_single_kind_is_refused_in_one_sentence_naming_its_fields(body, message):
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(body)
    if message != NONE:
        message = f"{message} cannot be sent together: a request has either {KINDS}"
    assert [(err["type"], err["loc"], err["msg"]) for err in e.value.errors()] == [("request_kind", (), message)]


@pytest.mark.parametrize(
    "body, message",
    [
        # NaN was "Input should be less than or equal to 100"; an integer's "Input should be a finite number"
        ({"prompt": "x", "cfg": float("nan")}, "cfg must be a number in [0, 100], not NaN"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature must be a number in [0, 10], not Infinity"),
        ({"prompt": "x", "top_p": float("-inf")}, "top_p must be a number in (0, 1], not -Infinity"),
        ({"prompt": "x", "num_samples": float("nan")}, "num_samples must be an integer in [1, 64], not NaN"),
        ({"prompt": "x", "top_k": float("inf")}, "top_k must be an integer >= 1, not Infinity"),
        ({"prompt": "x", "seed": float("inf")}, "seed must be an integer in [0, 9223372036854775808), not Infinity"),
        ({"image": "aGk=", "edit": "x", "image_cfg": float("nan")}, "image_cfg must be a number in [0, 100], not NaN"),
        # one seed range for every kind of request (infill requests stopped at 2**62)
        ({"infill": "a <mask>", "seed": float("nan")}, "seed must be an integer in [0, 9223372036854775808), not NaN"),
    ],
)
def test_a_non_finite_number_is_refused_naming_the_field_and_its_range(body, message):
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(body)
    field = next(k for k, v in body.items() if isinstance(v, float))
    assert [(x["type"], x["loc"][-1], x["msg"]) for x in e.value.errors()] == [("finite_number", field, message)]


@pytest.mark.parametrize(
    "body, field, message",
    [
        # pydantic's lax mode took these: true as 1 sample, "7" as seed 7, "no" and 0 as false
        ({"prompt": "x", "num_samples": True}, "num_samples", "num_samples must be an integer in [1, 64], not true"),
        ({"prompt": "x", "seed": "7"}, "seed",
         'seed must be an integer in [0, 9223372036854775808), not the string "7"'),
        ({"prompt": "x", "cfg": False}, "cfg", "cfg must be a number in [0, 100], not false"),
        ({"image": "aGk=", "max_new_tokens": "8"}, "max_new_tokens",
         'max_new_tokens must be an integer in [1, 1024], not the string "8"'),
        ({"prompt": "x", "rerank": "no"}, "rerank", 'rerank must be true or false, not the string "no"'),
        ({"prompt": "x", "return_codes": 0}, "return_codes", "return_codes must be true or false, not 0"),
        ({"infill": "a <mask>", "return_codes": "t" * 50}, "return_codes",
         f'return_codes must be true or false, not the string "{"t" * 40}..."'),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(body, field, message):
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(body)
    assert [(x["loc"][-1], x["msg"]) for x in e.value.errors()] == [(field, message)]


@pytest.mark.parametrize(
    "body, message",
    [
        # pydantic said "Extra inputs are not permitted", which names neither the fields allowed nor the right kind
        ({"prompt": "x", "sampels": 2}, "sampels is not a field of a text-to-image request, which takes prompt, "
         "num_samples, method, cfg, temperature, top_p, top_k, cdk_k, cdk_alpha, seed, retrieve, rerank, keep, "
         "return_codes"),
        ({"image": "aGk=", "task": "depth_to_image"}, "task is not a field of an image-to-text request, which takes "
         "image, instruction, layout, max_new_tokens, method, temperature, top_p, seed; task belongs to an "
         "image-editing request (with edit)"),
        ({"image": "aGk=", "num_samples": 2}, "num_samples is not a field of an image-to-text request, which takes "
         "image, instruction, layout, max_new_tokens, method, temperature, top_p, seed; num_samples belongs to a "
         "text-to-image request (with prompt) or an image-editing request (with edit) or an infilling request (with "
         "infill)"),
        ({"infill": "a <mask>", "x" * 50: 1}, f"{'x' * 40}... (50 characters) is not a field of an infilling request, "
         "which takes infill, image, rows, num_samples, method, temperature, top_p, max_span_tokens, seed, "
         "return_codes"),
    ],
)  # fmt: skip
def test_an_unknown_field_is_named_with_the_fields_its_kind_takes(body, message):
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(body)
    errors = explain_unknown_fields(e.value.errors())
    field = next(k for k in body if k not in ("prompt", "image", "infill"))
    assert [(x["type"], x["loc"][-1], x["msg"]) for x in errors] == [("extra_forbidden", field, message)]
    assert error_line(e.value) == message


def test_numbers_and_flags_of_the_right_json_type_are_read():
    r = ADAPTER.validate_python({"prompt": "x", "num_samples": 2.0, "cfg": 3, "rerank": True, "return_codes": False})
    assert (r.num_samples, r.cfg, r.rerank, r.return_codes) == (2, 3.0, True, False)


def test_text_fields_are_read_as_the_training_captions_were_cleaned():
    """The text fields reached the tokenizer as sent: a trailing newline, a tab or a doubled space added tokens that
    ``cm3leon prepare`` cleans out of every training caption. Text that cleans to nothing is refused naming the field;
    an empty instruction is still plain captioning."""
    assert ADAPTER.validate_python({"prompt": " a red\t circle\r\n"}).prompt == "a red circle"
    text = ADAPTER.validate_python({"image": "aGk=", "instruction": "Question: what\nis it?  Answer: "})
    assert text.instruction == "Question: what is it? Answer:"
    assert ADAPTER.validate_python({"image": "aGk=", "instruction": ""}).instruction == ""
    assert ADAPTER.validate_python({"image": "aGk=", "edit": "make it\x00blue\n"}).edit == "make it blue"
    assert ADAPTER.validate_python({"infill": "a  <mask>\u2028circle "}).infill == "a <mask> circle"
    for body, field, what in (
        ({"prompt": " \n"}, "prompt", "the prompt"),
        ({"image": "aGk=", "instruction": "\t"}, "instruction", "the instruction"),
        ({"image": "aGk=", "edit": "\x00\x01"}, "edit", "the edit"),
        ({"infill": "\r\n"}, "infill", "the caption"),
    ):
        with pytest.raises(ValidationError) as e:
            ADAPTER.validate_python(body)
        ((err,),) = [e.value.errors()]
        assert err["loc"][-1] == field
        assert err["msg"] == f"Value error, {field}: {what} holds no text (only whitespace or control characters)"


def test_text_of_max_text_chars_is_accepted():
    assert ADAPTER.validate_python({"prompt": "a" * MAX_TEXT_CHARS}).prompt == "a" * MAX_TEXT_CHARS


def test_json_safe_makes_a_validation_echo_strict_json():
    """Python's JSON reader takes NaN, Infinity, 1e400 and lone surrogates, which strict JSON cannot carry back."""
    echo = {"cfg": float("nan"), "x": [float("inf"), -float("inf"), 1.5, None, True, 3], "p": "a\udfffb"}
    assert json_safe(echo) == {"cfg": "nan", "x": ["inf", "-inf", 1.5, None, True, 3], "p": "a\\udfffb"}
    assert json_safe("x" * 10, max_chars=4) == "xxxx... (10 characters)"
    # a misspelt field holding a 100k-element list was echoed whole (200 KB back)
    assert json_safe(list(range(100_000)), max_items=3) == [0, 1, 2, "... (100000 items)"]
    assert json_safe({str(i): i for i in range(5)}, max_items=2) == {"0": 0, "1": 1, "...": "5 entries"}


def test_requests_group_by_settings_and_a_seeded_request_alone():
    s = {"cfg": 3.0, "num_samples": 2}
    assert group_key(s, None, 0) == group_key({"num_samples": 2, "cfg": 3.0}, None, 7)  # order of keys is irrelevant
    assert group_key(s, None, 0) != group_key({"cfg": 2.0, "num_samples": 2}, None, 0)
    assert group_key(s, 1, 0) != group_key(s, 1, 1)  # equal seeds still decode apart: batch-independent samples
    assert group_key(s, 1, 0) != group_key(s, None, 0)


def test_groups_split_into_chunks_of_at_most_max_rows():
    assert chunk_by_rows([4, 4, 4], 8) == [[0, 1], [2]]
    assert chunk_by_rows([2, 10, 2, 2], 4) == [[0], [1], [2, 3]]  # a request over the limit is decoded alone
    assert chunk_by_rows([1] * 5, 128) == [[0, 1, 2, 3, 4]] and chunk_by_rows([], 4) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        chunk_by_rows([1], 0)


def test_base64_images_decode_to_the_resolution_and_back():
    px = decode_base64_image(png_base64(0, size=20), 16)  # 20x24 -> centre 20x20 -> 16x16
    assert px.shape == (3, 16, 16) and px.dtype == torch.uint8
    assert torch.equal(decode_base64_image("data:image/png;base64," + png_base64(0, size=20), 16), px)
    image = px.float() / 127.5 - 1  # VQGAN.decode's range
    assert torch.equal(decode_base64_image(encode_png_base64(image), 16), px)  # PNG is lossless


def test_wrapped_base64_and_a_trailing_newline_are_read():
    """MIME encoders and `base64` without -w0 wrap lines, a file read whole ends in a newline: these were refused as
    "not valid base64 (Only base64 data is allowed)" or "(Excess data after padding)"."""
    data = png_base64(0, size=60)
    want = decode_base64_image(data, 16)
    wrapped = base64.encodebytes(base64.b64decode(data)).decode()  # 76 characters a line, a final newline
    assert wrapped.count("\n") > 1 and torch.equal(decode_base64_image(wrapped, 16), want)
    assert torch.equal(decode_base64_image(f"data:image/png;base64,{data}\n", 16), want)


@pytest.mark.parametrize(
    "data, match",
    [
        ("not base64!", "image: not valid base64"),
        # PIL's message named "<_io.BytesIO object at 0x7f...>"; the first bytes tell a GIF or text from an image
        (
            base64.b64encode(b"hello").decode(),
            r"^image: 5 bytes that are not a readable PNG or JPEG \(they begin b'hello'\)$",
        ),
        (base64.b64encode(b"GIF89a\x01\x00\x01\x00").decode(), r"\(they begin b'GIF89a\\x01\\x00'\)$"),
        ("aGVs-G8=", r"^image: not valid base64 \(.*: '-' at character 4 of the base64 text\)$"),  # URL-safe alphabet
    ],
)
def test_an_unreadable_image_names_the_field(data, match):
    with pytest.raises(ValueError, match=match):
        decode_base64_image(data, 16)


def image_base64(img) -> str:
    import io

    buf = io.BytesIO()
    img.save(buf, format=img.format or "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_huge_declared_images_and_other_formats_are_refused_naming_the_field():
    """A 57-byte PNG may declare 20000x10000 pixels (PIL raised DecompressionBombError, not OSError, which failed the
    whole batch); TIFF, EPS ... are not read at all."""
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(ValueError, match=r"^image: .*(20000x10000 pixels|not a readable PNG or JPEG)"):
        decode_base64_image(base64.b64encode(bomb).decode(), 16)
    big = Image.new("RGB", (9000, 8000))  # 72 megapixels: under PIL's bomb limit, over ours
    big.format = "PNG"
    with pytest.raises(ValueError, match=r"^image: 9000x8000 pixels, more than the 64,000,000"):
        decode_base64_image(image_base64(big), 16)
    tiff = Image.new("RGB", (8, 8))
    tiff.format = "TIFF"
    with pytest.raises(ValueError, match="^image: .* not a readable PNG or JPEG"):
        decode_base64_image(image_base64(tiff), 16)
    jpeg = Image.new("RGB", (20, 20), (200, 10, 10))
    jpeg.format = "JPEG"
    assert decode_base64_image(image_base64(jpeg), 16).shape == (3, 16, 16)
