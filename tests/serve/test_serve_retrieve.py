"""``cm3leon serve --retrieve``: each request gets its prompt's nearest bank documents placed before it (the same
decode as ``generate_image(retrieved=...)``), can ask for another number or none, and a server without a bank, a
bank key missing from the shards or too many documents for the context are clear errors."""

import json

import numpy as np
import pytest
from support.retrieval_setup import write_retrieval_assets

from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.retrieve import DocumentRetriever
from cm3leon_lightning.serve import CM3LeonAPI, Rejected
from cm3leon_lightning.serve.cli import build_api, build_parser
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import Segment


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_retrieval_assets(tmp_path_factory.mktemp("serve-retrieve"))


def serve_args(root, *extra):
    return ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--compile", "eager",
            "--clip", "cm3leon-clip-tiny", "--clip-pretrained", str(root / "clip.safetensors"),
            "--retrieve", str(root / "bank"), "--shards", str(root / "shards"), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def api(assets):
    api = build_api(build_parser().parse_args(serve_args(assets["root"])))
    api.setup("cpu")
    return api


def nearest(assets, prompt, k):
    """Brute-force cosine ranking of the bank's captions, independent of faiss."""
    query = assets["clip"].embed_texts([prompt])[0]
    return [f"doc-{i:02d}" for i in np.argsort(-(assets["emb"] @ query), kind="stable")[:k]]


def test_requests_get_their_nearest_documents_before_the_prompt(api, assets):
    assert api.retrieve_k == 2  # --k defaults to 2 with --retrieve
    samples, root = assets["samples"], assets["root"]
    model, vocab = load_checkpoint(root / "model.ckpt")
    tok = TextTokenizer.load(root / "tok")
    bodies = [
        {"prompt": "a blue circle", "method": "greedy", "num_samples": 1},
        {"prompt": "a red square", "method": "greedy", "num_samples": 1, "retrieve": 1},
        {"prompt": "a green triangle", "method": "greedy", "num_samples": 1, "retrieve": 0},
    ]
    out = api.predict([api.decode_request(b) for b in bodies])  # one greedy group: three prompt layouts in one decode
    for body, answer, k in zip(bodies, out, (2, 1, 0)):
        keys = nearest(assets, body["prompt"], k)
        assert answer.get("retrieved", []) == keys
        docs = [[Segment.text(samples[key].text.tolist()), Segment.image(samples[key].image.tolist())] for key in keys]
        want = generate_image(model, vocab, [tok.encode(body["prompt"])], retrieved=[docs], method="greedy")
        assert answer["codes"] == want.codes[0].tolist()  # no --vqgan: codes only
    assert samples[out[0]["retrieved"][0]].caption == "a blue circle"


def test_retrieval_is_refused_where_it_cannot_work(api, assets, tmp_path):
    job = api.decode_request({"prompt": "a blue circle", "retrieve": 16})
    assert isinstance(job, Rejected) and job.status == 400  # 12 documents found, far more than the context holds
    assert job.detail.startswith("retrieve: ") and "max_seq_len=" in job.detail
    root = assets["root"]
    plain = CM3LeonAPI(str(root / "model.ckpt"), str(root / "tok"), compile=False)
    plain.setup("cpu")
    job = plain.decode_request({"prompt": "a blue circle", "retrieve": 1})
    assert isinstance(job, Rejected) and "retrieve: this server was started without --retrieve" in job.detail

    # A bank naming a document the shards do not hold fails when the server loads, not on some later request.
    bank = root / "bank"
    broken = tmp_path / "bank"
    broken.mkdir()
    for f in bank.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    keys = json.loads((broken / "keys.json").read_text())
    keys[3] = "doc-missing"
    (broken / "keys.json").write_text(json.dumps(keys))
    with pytest.raises(ValueError, match=r"bank keys \['doc-missing'\] are not in the shards"):
        DocumentRetriever(broken, root / "shards", assets["clip"], preload=True)


@pytest.mark.parametrize(
    "extra, drop, message",
    [
        ([], "--shards", "--retrieve needs --clip (the CLIP model the bank was built with) and --shards"),
        ([], "--clip", "--retrieve needs --clip"),
        (["--k", "-1"], None, "--k must be >= 0"),
    ],
)
def test_bad_retrieval_arguments_name_the_flag(assets, extra, drop, message):
    args = serve_args(assets["root"], *extra)
    if drop:
        i = args.index(drop)
        del args[i : i + 2]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_api(build_parser().parse_args(args))


def test_k_without_a_bank_is_refused(assets):
    args = ["--ckpt", str(assets["root"] / "model.ckpt"), "--tokenizer", str(assets["root"] / "tok"), "--k", "2"]
    with pytest.raises(ValueError, match="0 without --retrieve"):
        build_api(build_parser().parse_args(args))
