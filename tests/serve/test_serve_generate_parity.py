"""``cm3leon serve`` and ``cm3leon generate`` give the same tokens for the same request: the same settings and seed,
sampled (not greedy), for each kind of request, on a tiny random model built in the test."""

import base64
import json

import numpy as np
import pytest
from support.images import png_base64

from cm3leon_lightning.generation.cli import main as generate
from cm3leon_lightning.serve import CM3LeonAPI


@pytest.fixture(scope="module")
def api(serve_assets):
    api = CM3LeonAPI(str(serve_assets / "model.ckpt"), str(serve_assets / "tok"), vqgan=str(serve_assets / "vqgan"),
                     compile=False)  # fmt: skip
    api.setup("cpu")
    return api


@pytest.mark.parametrize(
    "flags, body",
    [
        (["--prompt", "a red circle", "--num-samples", "3", "--seed", "5", "--top-p", "0.8"],
         {"prompt": "a red circle", "num_samples": 3, "seed": 5, "method": "top_p", "top_p": 0.8}),
        (["--prompt", "a red circle", "--num-samples", "2", "--seed", "5", "--method", "cd_k", "--cdk-k", "4",
          "--cdk-alpha", "0.2", "--temperature", "0.7"],
         {"prompt": "a red circle", "num_samples": 2, "seed": 5, "method": "cd_k", "cdk_k": 4, "cdk_alpha": 0.2,
          "temperature": 0.7}),
        (["--prompt", "a blue square", "--num-samples", "2", "--seed", "9", "--method", "temperature", "--cfg", "1.5"],
         {"prompt": "a blue square", "num_samples": 2, "seed": 9, "method": "temperature", "cfg": 1.5}),
        (["--image", "x.png", "--edit", "make it blue", "--num-samples", "2", "--seed", "3"],
         {"image": "x.png", "edit": "make it blue", "num_samples": 2, "seed": 3, "method": "top_p"}),
        (["--image", "x.png", "--edit", "a cat", "--task", "edge_to_image", "--num-samples", "2", "--seed", "3",
          "--method", "temperature", "--temperature", "0.8"],
         {"image": "x.png", "edit": "a cat", "task": "edge_to_image", "num_samples": 2, "seed": 3,
          "method": "temperature", "temperature": 0.8}),
        (["--image", "x.png", "--instruction", "what colour is it", "--seed", "3", "--top-p", "0.7",
          "--max-new-tokens", "6"],
         {"image": "x.png", "instruction": "what colour is it", "seed": 3, "method": "top_p", "top_p": 0.7,
          "max_new_tokens": 6}),
        (["--infill", "a <mask> circle", "--image", "x.png", "--infill-rows", "2:4", "--num-samples", "2", "--seed",
          "3", "--max-new-tokens", "5"],
         {"infill": "a <mask> circle", "image": "x.png", "rows": "2:4", "num_samples": 2, "seed": 3,
          "method": "top_p", "max_span_tokens": 5}),
    ],
)  # fmt: skip
def test_generate_and_serve_give_the_same_tokens_for_the_same_request(api, serve_assets, tmp_path, flags, body):
    picture = tmp_path / "x.png"
    picture.write_bytes(base64.b64decode(png_base64(0)))
    flags = [str(picture) if f == "x.png" else f for f in flags]
    body = {k: png_base64(0) if v == "x.png" else v for k, v in body.items()}
    out = tmp_path / "out"
    argv = ["--ckpt", str(serve_assets / "model.ckpt"), "--tokenizer", str(serve_assets / "tok"), "--vqgan",
            str(serve_assets / "vqgan"), "--no-compile", "--out", str(out), *flags]  # fmt: skip
    assert generate(argv) == 0
    kind = "image" if "edit" in body or "prompt" in body else "text"
    job = api.decode_request({**body, "return_codes": True} if kind == "image" or "rows" in body else body)
    answer = api.predict(job)
    if "infill" in body:
        assert answer["texts"] == json.loads((out / "answers.json").read_text(encoding="utf-8"))
    elif kind == "text":
        assert answer["text"] + "\n" == (out / "answer.txt").read_bytes().decode("utf-8")
    if "codes" in answer:
        assert answer["codes"] == np.load(out / "codes.npy").tolist()
        assert len({tuple(c) for c in answer["codes"]}) == len(answer["codes"])  # sampled: the candidates differ
