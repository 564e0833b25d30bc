"""``cm3leon serve --retrieve``: each request gets its prompt's nearest bank documents placed before it (the same
decode as ``generate_image(retrieved=...)``), can ask for another number or none, and a server without a bank, a
bank key missing from the shards or too many documents for the context are clear errors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.retrieval_setup import write_retrieval_assets

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.generation import generate_image
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.retrieve import DocumentRetriever
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.serve import CM3LeonAPI, Rejected
from cm3leon_lightning.serve.api import warn_long_documents
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
    job = api.decode_request({"prompt": "a blue circle", "retrieve": 13})  # was the whole bank's 12, silently
    assert job == Rejected(400, "retrieve: 13 documents asked for; the memory bank holds 12")
    job = api.decode_request({"prompt": "a blue circle", "retrieve": 12})
    assert isinstance(job, Rejected) and job.status == 400  # 12 documents found, far more than the context holds
    assert job.detail.startswith("retrieve: ") and "max_seq_len=" in job.detail
    job = api.decode_request({"prompt": "a blue circle", "rerank": True})  # it has --clip: was "without --clip and"
    assert job == Rejected(400, "rerank: this server was started without --vqgan, so it cannot re-rank")
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


def checkpoint_with_context(assets, path, max_seq_len):
    """The retrieval setup's vocabulary in a tiny model of another context length."""
    module = CM3LeonModule(preset="tiny", vocab=assets["vocab"].to_dict(), max_seq_len=max_seq_len)
    module.configure_model()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_a_k_whose_documents_never_fit_the_context_is_refused_at_start(assets, tmp_path, capsys, monkeypatch):
    """--k 2 with a 192-position model started healthy, then answered every plain request 400 ("2 retrieved documents
    ... need 248 positions"): two documents of 64 image codes each, the prompt and the 64 codes to draw never fit. It
    is refused before any worker starts now, naming --k and the largest that fits; one that fits still starts."""
    import litserve

    from cm3leon_lightning.serve import cli

    def started(*a, **k):
        raise AssertionError("the server was started")

    monkeypatch.setattr(litserve.LitServer, "run", started)  # unfixed, the command would serve
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)
    args = serve_args(assets["root"])
    args[args.index("--ckpt") + 1] = str(checkpoint_with_context(assets, tmp_path / "short.ckpt", 192))
    assert cm3leon_main(["serve", *args, "--accelerator", "cpu"]) == 2  # --k 2, the default with --retrieve
    assert capsys.readouterr().err == (
        "cm3leon serve: error: --k 2: 2 retrieved documents of at least 66 positions each (64 image tokens, <eos> and "
        "<break>), a one-token prompt and the 64 image tokens to draw need at least 199 positions, more than the "
        "model's context max_seq_len=192; the largest --k that fits is 1\n"
    )
    assert build_api(build_parser().parse_args([*args, "--k", "1"])).retrieve_k == 1
    with pytest.raises(ValueError, match="^--k 3: .* need at least 265 positions, .*max_seq_len=256; the largest --k "
                                         "that fits is 2$"):  # fmt: skip
        build_api(build_parser().parse_args(serve_args(assets["root"], "--k", "3")))


def test_a_worker_warns_when_the_bank_s_documents_are_too_long_for_k(api, assets, tmp_path, caplog):
    """The start-up bound counts no caption text; once the shards are read a worker knows each document's length and
    warns when the k shortest (every default request refused) or the k longest (some refused) do not fit."""
    lengths = sorted(2 + len(s.text) + 64 for s in assets["samples"].values())  # <eos> caption <break> 64 codes
    room = lambda max_seq_len: max_seq_len - 3 - 64  # noqa: E731 - beside a one-token prompt and the image to draw
    vocab = api.vocab
    assert warn_long_documents(api.retriever, 2, vocab, 256) is None  # the fixture's server: every pair fits
    shortest = 3 + 64 + lengths[0] + lengths[1] - 1  # the two shortest miss by one position
    assert warn_long_documents(api.retriever, 2, vocab, shortest) == (
        f"--k 2: the 2 shortest documents of the bank need {lengths[0] + lengths[1]} positions, more than the "
        f"{room(shortest)} the model's context max_seq_len={shortest} leaves beside a one-token prompt and the 64 "
        "image tokens to draw; every request that leaves 'retrieve' out will be refused (the largest --k that fits is "
        "1)"
    )
    # documents of captions 1, 5 and 9 tokens long (lengths 67, 71, 75): the two longest miss by one position
    bank = SimpleNamespace(preloaded={f"d{n}": [Segment.text([5] * n), Segment.image([0] * 64)] for n in (1, 5, 9)})
    assert warn_long_documents(bank, 2, vocab, 3 + 64 + 75 + 71) is None
    assert warn_long_documents(bank, 2, vocab, 3 + 64 + 75 + 71 - 1) == (
        "--k 2: the 2 longest documents of the bank need 146 positions, more than the 145 the model's context "
        "max_seq_len=212 leaves beside a one-token prompt and the 64 image tokens to draw; a request whose nearest "
        "documents are long ones will be refused (--k 1 always fits)"
    )
    every = warn_long_documents(bank, 3, vocab, 3 + 64 + 67 + 71 + 75 - 1)  # the whole bank: what every request gets
    assert every.startswith("--k 3: the 3 shortest documents") and every.endswith("(the largest --k that fits is 2)")
    assert warn_long_documents(api.retriever, 0, vocab, shortest) is None

    # a server whose --k passes the start-up bound (199 <= 200) but whose documents are longer: the worker warns
    args = serve_args(assets["root"])
    args[args.index("--ckpt") + 1] = str(checkpoint_with_context(assets, tmp_path / "200.ckpt", 200))
    worker = build_api(build_parser().parse_args(args))
    caplog.clear()
    with caplog.at_level("WARNING", logger="cm3leon_lightning.serve.api"):
        worker.setup("cpu")
    assert [r.getMessage() for r in caplog.records if r.name == "cm3leon_lightning.serve.api"] == [
        warn_long_documents(worker.retriever, 2, vocab, 200)
    ]
    assert "every request that leaves 'retrieve' out will be refused" in caplog.records[-1].getMessage()
    job = worker.decode_request({"prompt": "a blue circle"})
    assert isinstance(job, Rejected) and job.status == 400  # what the warning said
