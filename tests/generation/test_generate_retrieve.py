"""``cm3leon generate --retrieve BANK --shards DATA``: the nearest documents of the prompt in a tiny CLIP memory bank
are read from tiny shards and placed before the prompt, and shards or banks that do not match are clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.retrieval_setup import write_retrieval_assets

from cm3leon_lightning.data.shards import ShardSample, ShardWriter, file_sha256
from cm3leon_lightning.generation import cli
from cm3leon_lightning.generation.generate import generate_image, image_prompt
from cm3leon_lightning.generation.retrieve import check_clip_weights
from cm3leon_lightning.retrieval.encoder import create_clip
from cm3leon_lightning.retrieval.index import MemoryBank
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import Segment


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_retrieval_assets(tmp_path_factory.mktemp("retrieve"))


def argv(root, out, *extra):
    return [
        "--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--out", str(out), "--no-compile",
        "--prompt", "a blue circle", "--retrieve", str(root / "bank"), "--shards", str(root / "shards"),
        "--clip", "cm3leon-clip-tiny", "--clip-pretrained", str(root / "clip.safetensors"), *extra,
    ]  # fmt: skip


def test_retrieved_documents_are_placed_before_the_prompt(assets, tmp_path, monkeypatch):
    root, samples = assets["root"], assets["samples"]
    # Brute-force cosine ranking, independent of faiss: the caption itself first, then the nearest other caption.
    query = assets["clip"].embed_texts(["a blue circle"])[0]
    order = np.argsort(-(assets["emb"] @ query), kind="stable")
    want_keys = [f"doc-{order[0]:02d}", f"doc-{order[1]:02d}"]
    assert samples[want_keys[0]].caption == "a blue circle"

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["retrieved"])
        return generate_image(*args, **kwargs)

    monkeypatch.setattr(cli, "generate_image", spy)
    extra = ["--k", "2", "--method", "greedy", "--cfg", "1", "--num-samples", "1"]
    assert cli.main(argv(root, tmp_path, *extra)) == 0
    assert json.loads((tmp_path / "retrieved.json").read_text()) == {"prompt": "a blue circle", "keys": want_keys}
    docs = [[Segment.text(samples[k].text.tolist()), Segment.image(samples[k].image.tolist())] for k in want_keys]
    assert calls == [[docs]]

    # The model saw `<eos> caption <break> image` of both documents, then `<eos> a blue circle <break>`.
    vocab, tok_ids = assets["vocab"], TextTokenizer.load(root / "tok").encode("a blue circle")
    want = []
    for k in want_keys:
        want += [vocab.eos_id, *samples[k].text.tolist(), vocab.break_id, *(vocab.n_text + samples[k].image).tolist()]
    assert image_prompt(vocab, tok_ids, docs) == want + [vocab.eos_id, *tok_ids, vocab.break_id]

    # Greedy decoding of that prompt is what the CLI wrote, and differs from the prompt without retrieval.
    model, _ = cli.load_checkpoint(root / "model.ckpt")
    with_docs = generate_image(model, vocab, [tok_ids], retrieved=[docs], method="greedy", cfg=1.0).codes[0]
    without = generate_image(model, vocab, [tok_ids], method="greedy", cfg=1.0).codes[0]
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), with_docs.numpy())
    assert not torch.equal(with_docs, without)


def test_retrieval_errors_are_one_line(assets, tmp_path, capsys):
    root = assets["root"]

    def error(args):
        assert cli.main(args) == 2
        return capsys.readouterr().err

    no_shards = [a for a in argv(root, tmp_path) if a not in ("--shards", str(root / "shards"))]
    assert "--retrieve needs --shards" in error(no_shards)
    assert "--k must be >= 1" in error(argv(root, tmp_path, "--k", "0"))

    # Shards tokenized for another vocabulary (a 2x2 grid).
    other = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 2, "grid_w": 2, "image_size": 16}
    sample = ShardSample("x", "a red square", np.asarray([20, 21], np.int32), np.zeros(4, np.int16))
    text_info = {"path": "t", "sha256": "", "n_text": assets["vocab"].n_text, "num_sentinels": 8}
    ShardWriter(tmp_path / "other", text_info, other).write_all([sample])
    args = argv(root, tmp_path)
    args[args.index("--shards") + 1] = str(tmp_path / "other")
    msg = error(args)
    assert "was tokenized for" in msg and "'grid_h': 2" in msg and "the checkpoint's vocabulary is" in msg

    # A bank built with another CLIP.
    emb = np.eye(3, 64, dtype=np.float32)
    MemoryBank.build((emb, ["a", "b", "c"]), 64, "ViT-B-32").save(tmp_path / "bank-b32")
    args = argv(root, tmp_path)
    args[args.index("--retrieve") + 1] = str(tmp_path / "bank-b32")
    assert "ViT-B-32" in error(args)


def test_a_query_clip_with_other_weights_than_the_bank_is_refused(assets, tmp_path, capsys):
    """Only the bank's CLIP model name was checked: same-named CLIP weights other than those ``cm3leon prepare``
    built the bank with (its manifest records them) embedded the prompt into another space and retrieved unrelated
    documents, silently."""
    root = assets["root"]
    other = tmp_path / "other-clip.safetensors"
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="randomly initialised"):
        state = create_clip("cm3leon-clip-tiny", None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))

    def shards_recording(weights: str) -> str:
        out = tmp_path / f"shards-{len(list(tmp_path.glob('shards-*')))}"
        shutil.copytree(root / "shards", out)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["clip"] = {"model": "cm3leon-clip-tiny", "dim": 64, "weights_sha256": weights}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return str(out)

    def run(shards: str, clip_weights: str) -> int:
        args = argv(root, tmp_path / "out", "--method", "greedy", "--cfg", "1", "--num-samples", "1")
        args[args.index("--shards") + 1] = shards
        args[args.index("--clip-pretrained") + 1] = clip_weights
        return cli.main(args)

    built_with = shards_recording(file_sha256(root / "clip.safetensors"))
    assert run(built_with, str(other)) == 2
    want = (
        f"cm3leon generate: error: --clip-pretrained: the memory bank was built with CLIP weights sha256 "
        f"{file_sha256(root / 'clip.safetensors')[:12]}... (the manifest of {built_with}), but {other} is sha256 "
        f"{file_sha256(other)[:12]}...; queries embedded so would find unrelated documents\n"
    )
    assert capsys.readouterr().err == want
    assert run(built_with, str(root / "clip.safetensors")) == 0  # the very weights, under any path
    # A tag against a tag is compared; a local file against a tag cannot be told apart, so it is accepted.
    with pytest.raises(ValueError, match="built with CLIP weights open_clip:openai .* but laion2b_s34b_b79k is "):
        check_clip_weights({"weights_sha256": "open_clip:openai"}, "laion2b_s34b_b79k", "data/")
    check_clip_weights({"weights_sha256": "open_clip:openai"}, "openai", "data/")
    check_clip_weights({"weights_sha256": "open_clip:openai"}, str(other), "data/")
    check_clip_weights({}, str(other), "data/")  # shards written without a clip section


def test_retrieved_documents_that_overflow_the_context_name_k(assets, tmp_path, capsys):
    """Too many retrieved documents for the context said only "prompt of N tokens ... exceeds", about a three-word
    prompt; it now counts the documents and points at --k, before anything is written."""
    out = tmp_path / "out"
    model, _ = cli.load_checkpoint(assets["root"] / "model.ckpt")
    doc = len(next(iter(assets["samples"].values())).text) + 2 + assets["vocab"].image_tokens  # a document's length
    k = model.config.max_seq_len // doc + 1
    assert cli.main(argv(assets["root"], out, "--k", str(k))) == 2
    err = capsys.readouterr().err
    assert f"retrieved documents (--k {k})" in err and "retrieve fewer documents (a smaller --k)" in err
    assert not out.exists()


def test_a_picture_already_retrieved_is_skipped_for_the_next_candidate(tmp_path):
    """The paper's diversity rule at inference: COCO-style banks hold one picture under several captions, and the
    two nearest documents were often the same picture; the next distinct one is taken instead."""
    from types import SimpleNamespace

    from cm3leon_lightning.generation.retrieve import DocumentRetriever

    text_info = {"path": "t", "sha256": "", "n_text": 64, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 2, "grid_w": 2, "image_size": 16}
    pictures = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "c": [5, 6, 7, 8], "d": [1, 2, 3, 4], "e": [9, 9, 9, 9]}
    samples = [ShardSample(k, k, np.asarray([20 + i], np.int32), np.asarray(v, np.int16))
               for i, (k, v) in enumerate(pictures.items())]  # fmt: skip
    ShardWriter(tmp_path / "shards", text_info, image_info).write_all(samples)
    emb = np.asarray([[1.0, 0.0], [0.99, 0.14], [0.9, 0.44], [0.8, 0.6], [0.0, 1.0]], np.float32)  # a, b, c, d, e
    MemoryBank.build((emb, list(pictures)), 2, "toy").save(tmp_path / "bank")
    clip = SimpleNamespace(
        model_name="toy", dim=2, pretrained=None, embed_texts=lambda t: np.tile([[1.0, 0.0]], (len(t), 1))
    )
    retriever = DocumentRetriever(tmp_path / "bank", tmp_path / "shards", clip)
    assert [keys for keys, _ in retriever.retrieve(["q"], 2)] == [["a", "c"]]  # b is a's picture again
    ((keys, docs),) = retriever.retrieve(["q"], 3)
    assert keys == ["a", "c", "e"] and [d[1].tokens for d in docs] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 9, 9, 9)]
    assert [keys for keys, _ in retriever.retrieve(["q"], 5)] == [["a", "c", "e"]]  # only three distinct pictures
    retriever.bank = MemoryBank.build((np.zeros((0, 2), np.float32), []), 2, "toy")
    assert retriever.retrieve(["q", "r"], 2) == [([], []), ([], [])]  # an empty bank: "k must be >= 1, got 0"


def test_a_tag_against_a_bank_built_from_a_file_warns(tmp_path):
    """A bank built from a local CLIP file queried with a tag (the default `openai`, a forgotten --clip-pretrained)
    passed silently; a tag cannot be compared with a file, so it warns."""
    from cm3leon_lightning.generation.retrieve import check_clip_weights

    with pytest.warns(UserWarning, match=r"built with the CLIP weights file sha256 0123456789ab\.\.\. .* tag 'openai'"):
        check_clip_weights({"weights_sha256": "0123456789ab" * 5 + "cdef"}, "openai", tmp_path)


def test_the_query_is_embedded_as_the_bank_s_cleaned_captions(assets, tmp_path, capsys):
    """The CLIP text embedding of the prompt was taken of the text as given, though the bank embedded the cleaned
    captions of ``cm3leon prepare``: a control character glued two words into one CLIP token (``"blue\\x00circle"``)
    and moved the query. Every retrieval query (``cm3leon generate``, ``serve``, the FID callback) is now cleaned, and
    one that cleans to nothing is refused naming its index."""
    from cm3leon_lightning.generation.retrieve import DocumentRetriever

    root, clip = assets["root"], assets["clip"]
    embedded = []

    class Recording:
        model_name, dim, pretrained = clip.model_name, clip.dim, clip.pretrained

        def embed_texts(self, texts):
            embedded.append(list(texts))
            return clip.embed_texts(texts)

    retriever = DocumentRetriever(root / "bank", root / "shards", Recording(), assets["vocab"])
    raw = "a blue\x00circle\n"
    assert not np.allclose(clip.embed_texts([raw]), clip.embed_texts(["a blue circle"]), atol=1e-3)
    assert retriever.retrieve([raw, "a blue circle"], 2)[0] == retriever.retrieve(["a blue circle"], 2)[0]
    assert embedded[0] == ["a blue circle", "a blue circle"]
    with pytest.raises(ValueError, match=r"^captions\[1\]: the caption holds no text \(only whitespace or control"):
        retriever.retrieve(["a blue circle", "\t\x01 "], 1)
    with pytest.raises(ValueError, match="captions must be a sequence of strings, got a single str"):
        retriever.retrieve("a blue circle", 1)

    # cm3leon generate records and retrieves for the cleaned prompt.
    args = argv(root, tmp_path, "--k", "2", "--method", "greedy", "--cfg", "1", "--num-samples", "1")
    args[args.index("--prompt") + 1] = "a blue\tcircle \n"
    assert cli.main(args) == 0
    keys = retriever.retrieve(["a blue circle"], 2)[0][0]
    assert json.loads((tmp_path / "retrieved.json").read_text()) == {"prompt": "a blue circle", "keys": keys}
    capsys.readouterr()


def test_shards_tokenized_with_another_vqgan_are_refused(assets, tmp_path, capsys):
    """Found in review: only the shards' grid and codebook size were compared with the checkpoint's: shards that
    another VQGAN of the same size tokenized (their manifest records its sha256) were retrieved silently, image codes
    that mean other pictures to the model. The hash is compared where both record one."""
    from cm3leon_lightning.generation.retrieve import DocumentRetriever
    from cm3leon_lightning.tokenization.vocab import MultimodalVocab

    root, vocab = assets["root"], assets["vocab"]
    other = MultimodalVocab.from_dict({**vocab.to_dict(), "vqgan_sha256": "1" * 64})
    with pytest.raises(ValueError, match=r"^VQGAN mismatch: the checkpoint records the VQGAN of sha256 111111111111"):
        DocumentRetriever(root / "bank", root / "shards", assets["clip"], other)
    same = MultimodalVocab.from_dict({**vocab.to_dict(), "vqgan_sha256": "0" * 64})  # the manifest's
    assert DocumentRetriever(root / "bank", root / "shards", assets["clip"], same).retrieve(["a blue circle"], 1)

    ckpt = torch.load(root / "model.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["vocab"] = other.to_dict()
    torch.save(ckpt, tmp_path / "other.ckpt")
    args = argv(root, tmp_path / "out", "--method", "greedy", "--cfg", "1", "--num-samples", "1")
    args[args.index("--ckpt") + 1] = str(tmp_path / "other.ckpt")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cm3leon generate: error: VQGAN mismatch: the checkpoint records") and err.count("\n") == 1
    assert f"--shards {root / 'shards'} (manifest.json) has sha256 000000000000" in err
    assert not (tmp_path / "out").exists()


def test_overwrite_keeps_the_earlier_run_until_the_retrieved_prompt_is_decoded(assets, tmp_path, monkeypatch):
    """Found in review: with --retrieve, --overwrite deleted the earlier run's outputs and wrote retrieved.json before
    decoding, so a decode that failed or was stopped (Ctrl+C, out of memory) lost them for nothing finished; now
    they go only once this run's images are decoded, as without --retrieve."""
    root, out = assets["root"], tmp_path / "out"
    out.mkdir()
    (out / "sample-0.png").write_bytes(b"earlier")
    (out / "retrieved.json").write_text('{"prompt": "earlier", "keys": []}\n')

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_image", stopped)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv(root, out, "--overwrite", "--method", "greedy", "--num-samples", "1"))
    assert sorted(p.name for p in out.iterdir()) == ["retrieved.json", "sample-0.png"]
    assert (out / "sample-0.png").read_bytes() == b"earlier"
    assert json.loads((out / "retrieved.json").read_text())["prompt"] == "earlier"

    monkeypatch.undo()
    assert cli.main(argv(root, out, "--overwrite", "--method", "greedy", "--num-samples", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["codes.npy", "retrieved.json"]  # no --vqgan: no PNGs
    assert json.loads((out / "retrieved.json").read_text())["prompt"] == "a blue circle"


def test_retrieve_embeds_with_the_banks_clip_when_no_clip_is_given(assets, tmp_path, capsys):
    """``--clip`` defaulted to ViT-B-32 with openai weights, whatever the bank was built with (a download, then a
    model-name mismatch). With ``--retrieve`` the bank's model is now the default, the manifest's open_clip tag the
    default weights, and a manifest recording a weights file asks for that file."""
    root = assets["root"]

    def without(args: list[str], *flags: str) -> list[str]:
        for flag in flags:
            i = args.index(flag)
            args = args[:i] + args[i + 2 :]
        return args

    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    weights = file_sha256(root / "clip.safetensors")
    manifest["clip"] = {"model": "cm3leon-clip-tiny", "dim": 64, "weights_sha256": weights}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    settings = ("--method", "greedy", "--cfg", "1", "--num-samples", "1")

    def args(out: str, *drop: str) -> list[str]:
        full = argv(root, tmp_path / out, *settings)
        full[full.index("--shards") + 1] = str(shards)
        return without(full, *drop)

    assert cli.main(args("none", "--clip", "--clip-pretrained")) == 2
    assert capsys.readouterr().err == (
        f"cm3leon generate: error: --clip-pretrained: the memory bank {root / 'bank'} was built with a CLIP weights "
        f"file of sha256 {file_sha256(root / 'clip.safetensors')[:12]}... (the manifest of {shards}); pass that file\n"
    )
    assert not (tmp_path / "none").exists()
    assert cli.main(args("bank-model", "--clip")) == 0 and cli.main(args("both")) == 0
    for name in ("codes.npy", "retrieved.json"):
        assert (tmp_path / "bank-model" / name).read_bytes() == (tmp_path / "both" / name).read_bytes()

    manifest["clip"]["weights_sha256"] = "open_clip:laion2b_s34b_b79k"  # a tag: it becomes the default weights
    (shards / "manifest.json").write_text(json.dumps(manifest))
    resolved = cli.build_parser().parse_args(args("tag", "--clip", "--clip-pretrained"))
    cli.resolve_clip(resolved)
    assert (resolved.clip, resolved.clip_pretrained) == ("cm3leon-clip-tiny", "laion2b_s34b_b79k")
    (shards / "manifest.json").write_text("{not json")  # read for its CLIP weights: named by the flag
    broken = cli.build_parser().parse_args(args("broken", "--clip", "--clip-pretrained"))
    with pytest.raises(ValueError, match=rf"^--shards: cannot read manifest {shards / 'manifest.json'}: "):
        cli.resolve_clip(broken)
    rerank = cli.build_parser().parse_args(["--ckpt", "m", "--out", "o", "--prompt", "p", "--rerank"])
    cli.resolve_clip(rerank)  # no bank: open_clip's ViT-B-32 / openai, as before
    assert (rerank.clip, rerank.clip_pretrained) == ("ViT-B-32", "openai")


def test_retrieve_given_a_prepare_output_names_its_bank(assets, tmp_path, capsys):
    """``--retrieve`` given ``cm3leon prepare``'s output directory (or a split of it) said only that it has no
    meta.json; the message now names the bank inside it, ``work/bank/index``."""
    root = assets["root"]
    out = tmp_path / "prepared"
    shutil.copytree(root / "bank", out / "work" / "bank" / "index")
    shutil.copytree(root / "shards", out / "train")
    for given in (out, out / "train"):
        args = argv(root, tmp_path / "o")
        args[args.index("--retrieve") + 1] = str(given)
        assert cli.main(args) == 2
        assert capsys.readouterr().err == (
            f"cm3leon generate: error: --retrieve: memory bank {given} has no meta.json (the memory bank of a "
            f"cm3leon prepare output is {out / 'work' / 'bank' / 'index'})\n"
        )


def test_rerank_writes_the_samples_best_first_and_their_scores(assets, tmp_path):
    """``--rerank`` reordered the samples and wrote no score: ``scores.json`` now gives each written sample's CLIP
    score (descending) and the index it was decoded as, which the unreranked run of the same seed confirms."""
    from cm3leon_lightning.generation.rerank import clip_scores
    from cm3leon_lightning.retrieval.encoder import ClipEncoder
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    root = assets["root"]
    common = [
        "--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan"),
        "--prompt", "a blue circle", "--no-compile", "--num-samples", "4", "--seed", "3", "--method", "temperature",
    ]  # fmt: skip
    clip_args = ["--clip", "cm3leon-clip-tiny", "--clip-pretrained", str(root / "clip.safetensors")]
    assert cli.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "ranked"), "--rerank", *clip_args]) == 0
    written = json.loads((tmp_path / "ranked" / "scores.json").read_text())
    assert written["prompt"] == "a blue circle" and written["clip"] == "cm3leon-clip-tiny"
    assert sorted(written["decoded_as"]) == [0, 1, 2, 3] and not (tmp_path / "plain" / "scores.json").exists()
    for rank, decoded in enumerate(written["decoded_as"]):
        ranked, plain = tmp_path / "ranked" / f"sample-{rank}.png", tmp_path / "plain" / f"sample-{decoded}.png"
        assert ranked.read_bytes() == plain.read_bytes()
    assert written["scores"] == sorted(written["scores"], reverse=True)

    vqgan = VQGAN.from_pretrained(root / "vqgan").eval()
    codes = torch.from_numpy(np.load(tmp_path / "plain" / "codes.npy")).long()
    with torch.no_grad():
        images = vqgan.decode(codes)
    clip = ClipEncoder("cm3leon-clip-tiny", pretrained=str(root / "clip.safetensors"))
    want = clip_scores(clip, ["a blue circle"], images[None])[0]
    np.testing.assert_allclose(written["scores"], want[written["decoded_as"]].numpy(), rtol=0, atol=1e-6)
