"""The model remembers which text tokenizer and VQGAN it was trained with (their sha256 in its vocabulary), and
refuses another one of the same size wherever tokenizers meet it: generate, export, init_from, the data module's
vocabulary, PromptDataModule and ImageWriter. Older checkpoints without the record load with a one-time warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.checkpoint_setup import CORPUS
from support.eval_setup import micro_vqgan, tiny_tokenizer

from cm3leon_lightning.data.prepare_run import path_sha256
from cm3leon_lightning.data.shards import Manifest
from cm3leon_lightning.export import export_model
from cm3leon_lightning.generation.cli import check_tokenizers, load_checkpoint
from cm3leon_lightning.generation.cli import main as generate_main
from cm3leon_lightning.generation.predict import ImageWriter, PromptDataModule
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.modules.network import check_data_vocab, data_source
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vocab import MultimodalVocab, vqgan_weights_sha256

SAME_SIZE = "(a vocabulary of the same size is not enough: the same ids would mean other"
ESCAPE = (
    "; prepare the data with the tokenizers the checkpoint was trained with, or, to train on it anyway, pass "
    "allow_tokenizer_change=True (--model.init_args.allow_tokenizer_change true)"
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tokenizers ``tok_a``/``tok_b`` (300 ids each, other merges), VQGANs ``vqgan_a``/``vqgan_b`` (micro, other
    weights), checkpoints ``ckpt`` trained "with" tok_a and vqgan_a and ``old`` without the record."""
    root = tmp_path_factory.mktemp("identity")
    tok_a, tok_b = TextTokenizer.train(CORPUS, vocab_size=300), tiny_tokenizer()
    assert tok_a.vocab_size == tok_b.vocab_size == 300 and tok_a.sha256 != tok_b.sha256
    out = {"tok_a": tok_a.save(root / "tok_a"), "tok_b": tok_b.save(root / "tok_b"), "root": root}
    out["vqgan_a"] = micro_vqgan(0).save_pretrained(root / "vqgan_a")
    out["vqgan_b"] = micro_vqgan(1).save_pretrained(root / "vqgan_b")
    vocab = MultimodalVocab(300, 32, 8, 8, text_tokenizer_sha256=tok_a.sha256, vqgan_sha256=path_sha256(out["vqgan_a"]))
    out["vocab"] = vocab
    for name, v in (("ckpt", vocab.to_dict()), ("old", vocab.layout())):
        module = CM3LeonModule(preset="tiny", vocab=v, max_seq_len=128)
        module.configure_model()
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, root / f"{name}.ckpt")
        out[name] = root / f"{name}.ckpt"
    return out


def sha(path: Path) -> str:
    return path_sha256(path)[:12]


def test_the_record_round_trips_and_leaves_equality_to_the_sizes(tmp_path: Path) -> None:
    a = MultimodalVocab(300, 32, 8, 8, text_tokenizer_sha256="a" * 64, vqgan_sha256="b" * 64)
    assert a.to_dict() == {**a.layout(), "text_tokenizer_sha256": "a" * 64, "vqgan_sha256": "b" * 64}
    assert MultimodalVocab.from_dict(a.to_dict()).identity == a.identity
    assert MultimodalVocab.from_dict(a.layout()).to_dict() == a.layout()  # an old description loads, unchanged
    assert a == MultimodalVocab(300, 32, 8, 8) and hash(a) == hash(MultimodalVocab(300, 32, 8, 8))
    assert repr(a).endswith("text_tokenizer_sha256=aaaaaaaaaaaa, vqgan_sha256=bbbbbbbbbbbb)")
    with pytest.raises(ValueError, match=r"^v: vqgan_sha256 must be a hex sha256 \(64 lowercase hex digits\) or None"):
        MultimodalVocab.from_dict({**a.layout(), "vqgan_sha256": "0"}, "v")
    text = {"path": "t.json", "sha256": "c" * 64, "n_text": 300, "num_sentinels": 8}
    image = {"checkpoint_sha256": "d" * 64, "n_codes": 32, "grid_h": 8, "grid_w": 8, "image_size": 16}
    manifest = Manifest(format_version=1, created_by="t", text_tokenizer=text, image_tokenizer=image)
    assert manifest.vocab().identity == {"text_tokenizer_sha256": "c" * 64, "vqgan_sha256": "d" * 64}
    image["weights_sha256"] = "e" * 64  # prepare records the VQGAN's weights too
    assert Manifest(format_version=1, created_by="t", text_tokenizer=text, image_tokenizer=image).vocab().identity == {
        "text_tokenizer_sha256": "c" * 64, "vqgan_sha256": "d" * 64, "vqgan_weights_sha256": "e" * 64,
    }  # fmt: skip
    del image["weights_sha256"]
    text["sha256"] = ""  # a hand-written manifest: no hash, nothing to check
    assert Manifest(format_version=1, created_by="t", text_tokenizer=text, image_tokenizer=image).vocab().identity == {
        "vqgan_sha256": "d" * 64
    }


def test_generate_refuses_a_text_tokenizer_of_the_same_size(assets, tmp_path: Path, capsys) -> None:
    ckpt, tok_a, tok_b = assets["ckpt"], assets["tok_a"], assets["tok_b"]
    args = ["--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(tmp_path / "o"), "--num-samples", "1"]
    assert generate_main([*args, "--tokenizer", str(tok_b)]) == 2
    a, b = TextTokenizer.load(tok_a).sha256[:12], TextTokenizer.load(tok_b).sha256[:12]
    assert capsys.readouterr().err == (
        f"cm3leon generate: error: text tokenizer mismatch: --ckpt {ckpt} records the text tokenizer of sha256 {a}, "
        f"but --tokenizer {tok_b} has sha256 {b} {SAME_SIZE} words)\n"
    )
    _, vocab = load_checkpoint(ckpt)
    assert vocab.identity == assets["vocab"].identity  # the checkpoint keeps the record


def test_check_tokenizers_compares_the_vqgan_file_or_its_weights(assets) -> None:
    vocab, vqgan_a, vqgan_b = assets["vocab"], assets["vqgan_a"], assets["vqgan_b"]
    model_b = micro_vqgan(1)
    with pytest.raises(ValueError) as err:
        check_tokenizers(vocab, None, model_b, "--ckpt k.ckpt", vqgan_b)
    assert str(err.value) == (
        f"VQGAN mismatch: --ckpt k.ckpt records the VQGAN of sha256 {sha(vqgan_a)}, but --vqgan {vqgan_b} has "
        f"sha256 {sha(vqgan_b)} {SAME_SIZE} image codes)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizers(vocab, TextTokenizer.load(assets["tok_a"]), micro_vqgan(0), "--ckpt k.ckpt", vqgan_a)
        # the weights hash (as cm3leon export records it) matches a copy whose files hash otherwise
        exported = MultimodalVocab(**{**vocab.to_dict(), "vqgan_weights_sha256": vqgan_weights_sha256(micro_vqgan(0))})
        check_tokenizers(exported, None, micro_vqgan(0), "--ckpt k.ckpt", "a/copy")  # a path not even hashed
    with pytest.raises(ValueError) as err:
        check_tokenizers(exported, None, model_b, "--ckpt k.ckpt", vqgan_b)
    a, b = exported.vqgan_weights_sha256[:12], vqgan_weights_sha256(model_b)[:12]
    assert str(err.value) == (
        f"VQGAN mismatch: --ckpt k.ckpt records the VQGAN of sha256 {sha(vqgan_a)}, weights sha256 {a}, but --vqgan "
        f"{vqgan_b} has sha256 {sha(vqgan_b)}, weights sha256 {b} {SAME_SIZE} image codes)"
    )


def test_a_model_of_prepared_data_accepts_its_vqgan_saved_anew(assets, tmp_path: Path) -> None:
    """Data prepared with one VQGAN file records its weights hash too: the model trained on it accepts the same VQGAN
    re-saved elsewhere (other files, other file hash), and still refuses another VQGAN."""
    resaved = micro_vqgan(0).save_pretrained(tmp_path / "resaved")
    (resaved / "NOTE").write_text("a copy")  # the directory's hash differs from vqgan_a's
    assert path_sha256(resaved) != path_sha256(assets["vqgan_a"])
    manifest_vocab = {**assets["vocab"].to_dict(), "vqgan_weights_sha256": vqgan_weights_sha256(micro_vqgan(0))}
    vocab = MultimodalVocab.from_dict(check_data_vocab(assets["vocab"].to_dict(), manifest_vocab, "the data"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tokenizers(vocab, None, micro_vqgan(0), "--ckpt k.ckpt", resaved)
    with pytest.raises(ValueError, match=r"^VQGAN mismatch: --ckpt k.ckpt records the VQGAN of sha256 .*, weights"):
        check_tokenizers(vocab, None, micro_vqgan(1), "--ckpt k.ckpt", assets["vqgan_b"])


def test_an_old_checkpoint_is_accepted_with_one_warning(assets, recwarn) -> None:
    old = MultimodalVocab.from_dict(torch.load(assets["old"], weights_only=True)["hyper_parameters"]["vocab"])
    tok = TextTokenizer.load(assets["tok_b"])
    for _ in range(2):
        check_tokenizers(old, tok, None, f"--ckpt {assets['old']}")
    messages = [str(w.message) for w in recwarn if "cannot be checked" in str(w.message)]
    assert messages == [
        f"the text tokenizer cannot be checked: --ckpt {assets['old']} has no text tokenizer hash to compare (saved "
        f"before they were recorded); make sure --tokenizer {assets['tok_b']} is the text tokenizer --ckpt "
        f"{assets['old']} was trained with"
    ]


def test_export_refuses_another_tokenizer_and_records_the_vqgans_weights(assets, tmp_path: Path) -> None:
    ckpt, tok_b = assets["ckpt"], assets["tok_b"]
    with pytest.raises(
        ValueError, match=rf"^text tokenizer mismatch: --ckpt {ckpt} records .* but --tokenizer {tok_b}"
    ):
        export_model(ckpt, tmp_path / "bad", tok_b, assets["vqgan_a"])
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "m"
    export_model(ckpt, out, assets["tok_a"], assets["vqgan_a"])
    recorded = json.loads((out / "config.json").read_text())["vocab"]
    assert recorded == {**assets["vocab"].to_dict(), "vqgan_weights_sha256": vqgan_weights_sha256(micro_vqgan(0))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate_main(["--ckpt", str(out), "--prompt", "a red circle", "--out", str(tmp_path / "o"),
                              "--num-samples", "1"]) == 0  # fmt: skip
    with pytest.raises(ValueError, match=rf"^VQGAN mismatch: --ckpt {out} records the VQGAN of sha256 .*, weights"):
        export_model(out, tmp_path / "m2", vqgan=assets["vqgan_b"])


def test_init_from_refuses_data_of_another_tokenizer_unless_allowed(assets) -> None:
    ckpt, vocab = assets["ckpt"], assets["vocab"]
    data = {**vocab.to_dict(), "text_tokenizer_sha256": TextTokenizer.load(assets["tok_b"]).sha256}
    module = CM3LeonModule(preset="tiny", vocab=data, max_seq_len=128, init_from=str(ckpt))
    with pytest.raises(ValueError) as err:
        module.configure_model()
    assert str(err.value) == (
        f"text tokenizer mismatch: init_from checkpoint {str(ckpt)!r} records the text tokenizer of sha256 "
        f"{vocab.text_tokenizer_sha256[:12]}, but the data has sha256 {data['text_tokenizer_sha256'][:12]} "
        f"{SAME_SIZE} words){ESCAPE}"
    )
    assert module.model is None
    allowed = CM3LeonModule(
        preset="tiny", vocab=data, max_seq_len=128, init_from=str(ckpt), allow_tokenizer_change=True
    )
    allowed.configure_model()
    assert allowed.hparams.vocab == data  # the model now records the data's tokenizer
    matching = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=128, init_from=str(ckpt))
    matching.configure_model()


def test_init_from_an_old_checkpoint_warns_once(assets, recwarn) -> None:
    for _ in range(2):
        module = CM3LeonModule(
            preset="tiny", vocab=assets["vocab"].to_dict(), max_seq_len=128, init_from=str(assets["old"])
        )
        module.configure_model()
    texts = [str(w.message) for w in recwarn if "cannot be checked" in str(w.message)]
    source = f"init_from checkpoint {str(assets['old'])!r}"
    assert texts == [
        f"the text tokenizer cannot be checked: {source} has no text tokenizer hash to compare (saved before they "
        f"were recorded); make sure the data is the text tokenizer {source} was trained with",
        f"the VQGAN cannot be checked: {source} has no VQGAN hash to compare (saved before they were recorded); "
        f"make sure the data is the VQGAN {source} was trained with",
    ]


def test_the_data_modules_vocabulary_is_checked_and_named(assets) -> None:
    vocab = assets["vocab"].to_dict()
    other_vqgan = {**vocab, "vqgan_sha256": "e" * 64}
    dm = SimpleNamespace(sources={"train": (SimpleNamespace(location="/d/manifest.json"), [], [])})
    assert data_source(dm) == "the data (manifest /d/manifest.json)"
    with pytest.raises(ValueError) as err:
        check_data_vocab(vocab, other_vqgan, data_source(dm))
    assert str(err.value) == (
        f"VQGAN mismatch: the model records the VQGAN of sha256 {vocab['vqgan_sha256'][:12]}, but the data "
        f"(manifest /d/manifest.json) has sha256 eeeeeeeeeeee {SAME_SIZE} image codes){ESCAPE}"
    )
    assert check_data_vocab(vocab, other_vqgan, "d", allow_tokenizer_change=True) == other_vqgan
    exported = {**vocab, "vqgan_weights_sha256": "f" * 64}
    assert check_data_vocab(exported, vocab, "d") == exported  # matched: the weights hash is kept
    with pytest.warns(UserWarning, match="cannot be checked: the model has no text tokenizer hash"):
        assert check_data_vocab(assets["vocab"].layout(), vocab, "d") == vocab  # an old model adopts the data's


def test_prompt_data_module_and_image_writer_check_the_tokenizers(assets, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    ckpt, tok_b = assets["ckpt"], assets["tok_b"]
    with pytest.raises(
        ValueError, match=rf"^text tokenizer mismatch: vocab_from {ckpt} records .* but tokenizer {tok_b}"
    ):
        PromptDataModule(str(prompts), str(tok_b), str(ckpt))
    assert PromptDataModule(str(prompts), str(assets["tok_a"]), str(ckpt)).vocab.identity == assets["vocab"].identity
    writer = ImageWriter(str(tmp_path / "out"), vqgan=str(assets["vqgan_b"]))
    trainer = SimpleNamespace(callbacks=[writer], ckpt_path=str(ckpt))
    module = SimpleNamespace(vocab=assets["vocab"])
    with pytest.raises(
        ValueError, match=rf"^VQGAN mismatch: the model \({ckpt}\) records .* ImageWriter vqgan {assets['vqgan_b']}"
    ):
        writer.setup(trainer, module, "predict")
