"""``cm3leon predict``: prompts files, the vocabulary link, Lightning's predict loop with ImageWriter in process, and
the documented command in a subprocess on two CPU processes (DDP) with a checkpoint written by a short ``cm3leon fit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support.eval_setup import micro_vqgan, tiny_module, tiny_tokenizer, write_eval_data

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.generation.cli import load_checkpoint
from cm3leon_lightning.generation.generate import GenerationSettings, generate_image
from cm3leon_lightning.generation.predict import (
    ImageWriter,
    PromptDataModule,
    collate_prompts,
    load_vocab,
    read_prompts,
)
from cm3leon_lightning.modules.cm3leon import CM3LeonModule

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"num_samples": 2, "method": "top_p", "cfg": 2.0, "top_p": 0.8, "seed": 5}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizer, micro VQGAN (16 px, 8x8 codes), a random tiny CM3LeonModule checkpoint, and a prompts file."""
    root = tmp_path_factory.mktemp("predict")
    tok = tiny_tokenizer()
    tok.save(root / "tok")
    micro_vqgan().save_pretrained(root / "vqgan")
    module = tiny_module(tok)
    with torch.no_grad():  # random blocks, so samples differ between seeds
        for p in module.model.parameters():
            p.normal_(0.0, 0.2)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**ckpt, "pytorch-lightning_version": L.__version__}, root / "model.ckpt")
    lines = [{"prompt": "a red square"}, {"prompt": "a blue circle", "seed": 123}, {"prompt": "a green triangle"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def reference_codes(ckpt: Path, tok_dir: Path, prompts: list[str], seeds: list[int], settings: dict) -> np.ndarray:
    """``generate_image`` called directly, one prompt at a time with its seed: ``(P, N, h*w)``."""
    model, vocab = load_checkpoint(ckpt)
    from cm3leon_lightning.tokenization.text import TextTokenizer

    tok, s = TextTokenizer.load(tok_dir), GenerationSettings(**settings)
    out = [
        generate_image(model, vocab, [tok.encode(p)], seed=seed, **s.image_kwargs()).codes[0].numpy()
        for p, seed in zip(prompts, seeds)
    ]
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ reading
def test_generation_settings_the_method_ignores_are_refused_naming_them() -> None:
    """`cm3leon predict` with generation.method cd_k and generation.cfg 5 decoded without guidance, silently."""
    with pytest.raises(
        ValueError, match=r"method='cd_k' does not read generation\.cfg=5\.0 \(read by greedy, temperature"
    ):
        CM3LeonModule(generation=GenerationSettings(method="cd_k", cfg=5.0))
    with pytest.raises(ValueError, match=r"generation\.temperature=0\.7 .*; generation\.top_p=0\.5 \(read by top_p\)"):
        CM3LeonModule(generation={"method": "greedy", "temperature": 0.7, "top_p": 0.5})
    CM3LeonModule(generation=GenerationSettings(method="cd_k", cdk_k=4))  # defaults of the others: accepted
    CM3LeonModule(generation=GenerationSettings(method="greedy", cfg=2.0))  # greedy reads cfg


def test_read_prompts_txt_jsonl_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red square\n\n  a blue circle  \n")
    assert read_prompts(txt) == [("a red square", None), ("a blue circle", None)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a", "seed": 3}\n\n{"prompt": "b"}\n')
    assert read_prompts(jl) == [("a", 3), ("b", None)]

    def error(text: str, name: str = "bad.jsonl") -> str:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as e:
            read_prompts(tmp_path / name)
        return str(e.value)

    assert "line 2 is not JSON" in error('{"prompt": "a"}\n{oops\n')
    assert "line 1 has unknown fields ['caption']" in error('{"prompt": "a", "caption": "b"}\n')
    assert "line 1: 'seed' must be a non-negative integer" in error('{"prompt": "a", "seed": "7"}\n')
    assert "line 1 must be an object with a non-empty string 'prompt'" in error('{"prompt": ""}\n')
    assert "holds no prompt" in error("\n\n", "empty.txt")
    assert "must end in .txt" in error("a\n", "p.csv")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")
    # Lines end at "\n" (and "\r\n") only: U+2028 or a form feed inside a prompt used to split it in two (every later
    # index shifted) or break a JSON string; a byte-order mark used to start the first prompt.
    txt.write_bytes("\ufeffa red \u2028 square\r\nform\x0cfeed\n".encode())
    assert read_prompts(txt) == [("a red \u2028 square", None), ("form\x0cfeed", None)]
    jl.write_bytes('\ufeff{"prompt": "left\u2028right", "seed": 1}\n'.encode())
    assert read_prompts(jl) == [("left\u2028right", 1)]

    # Bytes that are not UTF-8 named the codec only, not the file or line; a seed torch cannot take failed only when
    # its prompt came up, after every earlier prompt was decoded.
    txt.write_bytes(b"a red square\n\na blue \xff circle\n")
    with pytest.raises(ValueError, match=r"p.txt line 3 is not UTF-8 text: invalid start byte at byte 21"):
        read_prompts(txt)
    assert "line 1: 'seed' must be a non-negative integer below 2**63, got 9223372036854775808" in error(
        json.dumps({"prompt": "a", "seed": 2**63}) + "\n"
    )
    jl.write_text(json.dumps({"prompt": "a", "seed": 2**63 - 1}) + "\n")
    assert read_prompts(jl) == [("a", 2**63 - 1)]


def test_prompts_are_tokenized_as_the_training_captions(assets, tmp_path):
    """A jsonl prompt's trailing space or newline, a tab or a doubled space (COCO captions hold them) was tokenized
    as given, though ``cm3leon prepare`` cleans every training caption of them (``clean_caption``): the model read
    tokens it never saw after a caption. An unpaired surrogate failed in the tokenizer with a TypeError naming no
    line, and a prompt of control characters only was decoded as one."""
    raw = ["a red square ", "a red  square", "a red\tsquare\n", "\u00a0a red square\u2028", "a red\x00square"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in raw))
    dm = PromptDataModule(str(prompts), str(assets / "tok"), str(assets / "model.ckpt"))
    dm.setup("predict")
    want = dm.tokenizer.encode("a red square")
    assert [dm.dataset[i]["prompt"] for i in range(5)] == raw  # recorded as given
    assert dm.dataset.ids == [want] * 5 and len(want) == 4
    txt = tmp_path / "p.txt"
    txt.write_text("a  red\tsquare\n")
    dm = PromptDataModule(str(txt), str(assets / "tok"), str(assets / "model.ckpt"))
    dm.setup("predict")
    assert dm.dataset.ids == [want] and read_prompts(txt) == [("a  red\tsquare", None)]

    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "red \ud83d square"}) + "\n")
    with pytest.raises(ValueError, match=rf"^prompts: {prompts} line 2: the prompt holds an unpaired UTF-16 surrogate"):
        read_prompts(prompts)
    prompts.write_text(json.dumps({"prompt": "\x00\x01"}) + "\n")
    with pytest.raises(ValueError, match=rf"^prompts: {prompts} line 1: the prompt holds no text \(only whitespace"):
        read_prompts(prompts)
    txt.write_bytes(b"a red square\n\x01\n")
    with pytest.raises(ValueError, match=rf"^prompts: {txt} line 2: the prompt holds no text"):
        read_prompts(txt)


def test_vocab_from_checkpoint_or_manifest_and_tokenizer_mismatch(assets, tmp_path):
    ckpt_vocab = load_vocab(assets / "model.ckpt")
    assert ckpt_vocab.to_dict() == torch.load(assets / "model.ckpt", weights_only=True)["hyper_parameters"]["vocab"]
    data = write_eval_data(tmp_path / "data", n_train=2, n_val=1)
    assert load_vocab(data["train"]) == ckpt_vocab  # a prepared directory
    assert load_vocab(Path(data["train"]) / "manifest.json") == ckpt_vocab
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), data["train"])
    assert dm.vocab == ckpt_vocab

    from cm3leon_lightning.tokenization.text import TextTokenizer

    TextTokenizer.train(["a red square", "a blue circle"] * 10, vocab_size=280).save(tmp_path / "other")
    with pytest.raises(ValueError, match=r"vocabulary mismatch: .*model.ckpt has n_text=\d+.*vocab_size=\d+"):
        PromptDataModule(str(assets / "prompts.jsonl"), str(tmp_path / "other"), str(assets / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="vocab_from"):
        load_vocab(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a manifest.json nor a readable torch checkpoint"):
        load_vocab(tmp_path / "junk.ckpt")


# ------------------------------------------------------------------------------------------------ predict loop
def predict(assets: Path, out: Path | None, batch_size: int, vqgan: bool = True, **writer) -> list[dict]:
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), batch_size)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    callbacks = [] if out is None else [ImageWriter(str(out), str(assets / "vqgan") if vqgan else None, **writer)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(assets),
    )  # fmt: skip
    return trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))


def test_trainer_predict_writes_pngs_grids_codes_and_jsonl(assets, tmp_path):
    out = tmp_path / "out"
    batches = predict(assets, out, batch_size=2)
    assert [b["codes"].shape for b in batches] == [(2, 2, 64), (1, 2, 64)]
    assert [i for b in batches for i in b["index"]] == [0, 1, 2]
    seeds = [5 + 0, 123, 5 + 2]  # settings seed + global index, unless the line gives one
    assert [s for b in batches for s in b["seed"]] == seeds

    prompts = ["a red square", "a blue circle", "a green triangle"]
    want = reference_codes(assets / "model.ckpt", assets / "tok", prompts, seeds, SETTINGS)
    np.testing.assert_array_equal(torch.cat([b["codes"] for b in batches]).numpy(), want)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == list(zip(range(3), prompts, seeds))
    for i, r in enumerate(rows):
        assert r["files"] == [f"{i:06d}-0.png", f"{i:06d}-1.png"] and r["grid"] == f"{i:06d}-grid.png"
        np.testing.assert_array_equal(np.load(out / r["codes"]), want[i])
        for f in r["files"]:
            assert Image.open(out / f).size == (16, 16)
        grid = Image.open(out / r["grid"])
        assert grid.width == 2 * (16 + 4) + 4 and grid.height == 16 + 2 * 4 + 14  # two tiles under the prompt strip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predict_settings.json", "predictions.jsonl"] + [f for r in rows for f in (*r["files"], r["grid"], r["codes"])]
    )  # no part files left

    # The same prompts one per batch, without a VQGAN: the same codes (a prompt's samples ignore its batch).
    out1 = tmp_path / "codes-only"
    single = predict(assets, out1, batch_size=1, vqgan=False)
    np.testing.assert_array_equal(torch.cat([b["codes"] for b in single]).numpy(), want)
    assert sorted(p.suffix for p in out1.iterdir()) == [".json", ".jsonl", ".npy", ".npy", ".npy"]


def writer_trainer(out: Path, root: Path) -> L.Trainer:
    """A quiet one-device CPU trainer whose ``ImageWriter`` writes codes only (no VQGAN) to ``out``."""
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[ImageWriter(str(out), None)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
    )  # fmt: skip


def test_the_writer_keeps_prompts_with_line_separators_on_one_line(assets, tmp_path):
    """The part files were written with the raw U+2028 of a prompt and split on it when merged: the run ended
    without predictions.jsonl."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "left\u2028right"}) + "\n" + json.dumps({"prompt": "a\x0cb"}) + "\n")
    dm = PromptDataModule(str(prompts), str(assets / "tok"), str(assets / "model.ckpt"), 2)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    out = tmp_path / "out"
    trainer = writer_trainer(out, tmp_path)
    trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert [r["prompt"] for r in rows] == ["left\u2028right", "a\x0cb"]


def test_a_failed_merge_keeps_the_part_files(assets, tmp_path, monkeypatch):
    """Rank zero deleted each part file before predictions.jsonl was written: a write that failed (a full disk) lost
    the line of every prompt, leaving PNGs and codes that nothing described."""

    def failing(real):
        def full_disk(self, *args, **kwargs):
            if self.name.endswith("predictions.jsonl") or self.name.startswith(".predictions.jsonl"):  # or its temp
                raise OSError(28, "No space left on device")
            return real(self, *args, **kwargs)

        return full_disk

    monkeypatch.setattr(Path, "write_text", failing(Path.write_text))
    monkeypatch.setattr(Path, "write_bytes", failing(Path.write_bytes))
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        predict(assets, out, batch_size=2, vqgan=False)
    rows = [json.loads(line) for line in (out / "predictions.rank0.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["codes"]) for r in rows] == [
        (0, "a red square", "000000-codes.npy"), (1, "a blue circle", "000001-codes.npy"),
        (2, "a green triangle", "000002-codes.npy"),
    ]  # fmt: skip


def test_predict_from_an_exported_model_directory(assets, tmp_path):
    """``cm3leon predict`` without a Lightning checkpoint: ``init_from`` and ``vocab_from`` name a model directory of
    ``cm3leon export`` (its bundled tokenizer too), and the codes equal those of the checkpoint it came from."""
    from cm3leon_lightning.export import export_model

    model_dir = tmp_path / "model"
    export_model(assets / "model.ckpt", model_dir, assets / "tok")
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(model_dir / "tokenizer"), str(model_dir), batch_size=2)
    module = CM3LeonModule(
        preset="tiny", vocab=dm.vocab.to_dict(),
        generation=GenerationSettings(**SETTINGS), init_from=str(model_dir),
    )  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    batches = trainer.predict(module, datamodule=dm)
    prompts = ["a red square", "a blue circle", "a green triangle"]
    want = reference_codes(assets / "model.ckpt", assets / "tok", prompts, [5, 123, 7], SETTINGS)
    np.testing.assert_array_equal(torch.cat([b["codes"] for b in batches]).numpy(), want)


class BrightnessScorer:
    """An exact scorer with the ClipEncoder interface: every text embeds to ``[1, 0]``, an image to its normalised
    ``[mean, 1 - mean]`` brightness, so brighter candidates score higher."""

    def embed_texts(self, texts):
        return np.tile([1.0, 0.0], (len(texts), 1))

    def embed_images(self, images: torch.Tensor):
        m = images.mean(dim=(1, 2, 3)).double()
        z = torch.stack([m, 1 - m], dim=1)
        return (z / z.norm(dim=1, keepdim=True)).numpy()


class BrightnessWriter(ImageWriter):
    def load_scorer(self, device):
        return BrightnessScorer()


def test_writer_scores_the_prompt_the_model_read(assets, tmp_path):
    """Re-ranking embedded the prompt as given with CLIP, though the model read it cleaned (and the memory bank's
    captions were): a control character glued two words into one CLIP token. The scorer now gets the cleaned text;
    predictions.jsonl still records the prompt as given."""
    texts = []

    class Recording(BrightnessScorer):
        def embed_texts(self, t):
            texts.extend(t)
            return super().embed_texts(t)

    class Writer(ImageWriter):
        def load_scorer(self, device):
            return Recording()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red\x00square\n"}) + "\n" + json.dumps({"prompt": " a  blue circle"}))
    dm = PromptDataModule(str(prompts), str(assets / "tok"), str(assets / "model.ckpt"), 2)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    writer = Writer(str(tmp_path / "out"), str(assets / "vqgan"), clip="any")
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    assert texts == ["a red square", "a blue circle"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red\x00square\n", " a  blue circle"]


def test_writer_reranks_candidates_best_first_and_keeps_the_best(assets, tmp_path):
    """With re-ranking the writer orders each prompt's candidates by score, best first (files, codes, scores and
    order agree), and with keep=1 writes only the best."""
    from cm3leon_lightning.generation.rerank import clip_scores
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    prompts = ["a red square", "a blue circle", "a green triangle"]
    want = reference_codes(assets / "model.ckpt", assets / "tok", prompts, [5, 123, 7], SETTINGS)  # (3, 2, 64)
    with torch.no_grad():
        images = VQGAN.from_pretrained(assets / "vqgan").eval().decode(torch.as_tensor(want).flatten(0, 1))
    scores = clip_scores(BrightnessScorer(), prompts, images.view(3, 2, *images.shape[1:]))  # (3, 2)
    assert 1 in scores.argmax(1).tolist()  # some prompt's best is its second candidate: the order must change

    for name, keep in (("all", None), ("best", 1)):
        out = tmp_path / name
        dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), 2)
        module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
        writer = BrightnessWriter(str(out), str(assets / "vqgan"), clip="any", keep=keep)
        trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):
            order = torch.sort(scores[i], descending=True, stable=True).indices[: keep or 2].tolist()
            assert r["order"] == order and len(r["files"]) == len(order)
            np.testing.assert_allclose(r["clip_scores"], scores[i, order].numpy(), atol=1e-5)
            np.testing.assert_array_equal(np.load(out / r["codes"]), want[i][order])
            best = np.asarray(Image.open(out / r["files"][0]), dtype=np.float64)
            assert abs(best.mean() / 255 - (images[2 * i + order[0]].mean().item() + 1) / 2) < 0.01
    with pytest.raises(ValueError, match="re-ranking scores decoded images, so it needs vqgan"):
        ImageWriter(str(tmp_path), None, clip="ViT-B-32")
    with pytest.raises(ValueError, match="keep must be >= 1 and needs clip"):
        ImageWriter(str(tmp_path), str(assets / "vqgan"), keep=1)


def test_writer_loads_its_clip_from_a_local_checkpoint(assets, tmp_path):
    """The default scorer is a frozen ClipEncoder built from ``clip`` and ``clip_pretrained`` (a local file here, as
    on a machine without the hub); every line then carries its candidates' scores."""
    from cm3leon_lightning.retrieval.encoder import ClipEncoder

    torch.manual_seed(0)
    torch.save(ClipEncoder("cm3leon-clip-tiny", pretrained=None).model.state_dict(), tmp_path / "clip.pt")
    rows = predict(assets, tmp_path / "out", 3, clip="cm3leon-clip-tiny", clip_pretrained=str(tmp_path / "clip.pt"))
    assert len(rows) == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [len(r["clip_scores"]) for r in lines] == [2, 2, 2]
    assert all(sorted(r["order"]) == [0, 1] for r in lines)


def test_writer_refuses_a_mismatching_vqgan_and_a_second_writer(assets, tmp_path):
    from cm3leon_lightning.tokenization.vqgan import VQGAN

    VQGAN.from_name("tiny").save_pretrained(tmp_path / "other-vqgan")
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"))
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict())
    for callbacks, match in (
        ([ImageWriter(str(tmp_path), str(tmp_path / "other-vqgan"))], "vocabulary mismatch: .* but --vqgan has"),
        ([ImageWriter(str(tmp_path)), ImageWriter(str(tmp_path))], "2 ImageWriter callbacks write to"),
    ):
        trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, enable_progress_bar=False)
        with pytest.raises(ValueError, match=match):
            trainer.predict(module, datamodule=dm)


def test_a_prompt_longer_than_the_context_is_refused_before_any_decoding(assets, tmp_path, monkeypatch):
    """A too-long prompt failed only when its batch came up (every earlier prompt decoded and written first), named
    by its index rather than its line; now the file and line are named before the first predict step."""
    long = tmp_path / "long.txt"
    long.write_text("a red square\n\n" + " ".join(["a green triangle"] * 80) + "\na blue circle\n")
    dm = PromptDataModule(str(long), str(assets / "tok"), str(assets / "model.ckpt"), batch_size=1)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict())
    steps = []
    monkeypatch.setattr(module, "predict_step", lambda batch, batch_idx: steps.append(batch_idx))
    out = tmp_path / "out"
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[ImageWriter(str(out))], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    n_text = len(dm.tokenizer.encode(" ".join(["a green triangle"] * 80)))
    want = (
        rf"prompts: {long}: 1 prompt\(s\) too long for the model's context max_seq_len=256, which must hold <eos>, "
        rf"the prompt's text tokens, <break> and 64 image tokens \(at most 190 text tokens\): line 3 \({n_text} "
        r"text tokens\)$"
    )
    with pytest.raises(ValueError, match=want):
        trainer.predict(module, datamodule=dm)
    assert steps == [] and not out.exists()
    # 190 text tokens fit exactly: <eos> + 190 + <break> + 64 = 256.
    dm.dataset.ids[1] = [dm.vocab.n_text - 1] * 190
    dm.check_lengths(256)
    dm.dataset.ids[1] = [dm.vocab.n_text - 1] * 191
    with pytest.raises(ValueError, match=r"line 3 \(191 text tokens\)$"):
        dm.check_lengths(256)

    # predict_step itself still names the prompt, for a data module that does not check.
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict())
    batch = {"index": [4], "prompt": ["a green triangle " * 80], "ids": [dm.dataset.ids[1]], "seed": [None]}
    with pytest.raises(ValueError, match=r"prompt 4 \('a green triangle a green.*max_seq_len=256"):
        module.predict_step(batch, 0)


def test_writer_refuses_an_output_dir_with_earlier_outputs_unless_overwrite(assets, tmp_path):
    """A second run into the same directory overwrote the files it wrote and left the rest: a run with fewer prompts
    or candidates left the earlier ones' PNGs and codes beside a predictions.jsonl that no longer listed them (and
    a stopped run left an old predictions.jsonl describing files it had replaced). Now it refuses before decoding,
    and overwrite=True deletes the earlier outputs first."""
    out = tmp_path / "out"
    predict(assets, out, batch_size=2, vqgan=False)  # 3 prompts
    (out / "config.yaml").write_text("x: 1\n")  # LightningCLI's, with --trainer.default_root_dir out/: not ours
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 7
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("a big red square\n")

    def run(overwrite: bool) -> None:
        dm = PromptDataModule(str(fewer), str(assets / "tok"), str(assets / "model.ckpt"), 1)
        module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
        trainer = L.Trainer(
            accelerator="cpu", logger=False, callbacks=[ImageWriter(str(out), overwrite=overwrite)],
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        )  # fmt: skip
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))

    want = (
        rf"ImageWriter output_dir: {out} already holds 5 files of an earlier predict run \(000000-codes.npy, "
        r"000001-codes.npy, 000002-codes.npy \.\.\.\); give a new or empty directory, overwrite=True .* or resume=True"
    )
    with pytest.raises(ValueError, match=want):
        run(overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost

    run(overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "000000-codes.npy",
        "config.yaml",
        "notes.txt",
        "predict_settings.json",
        "predictions.jsonl",
    ]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, "a big red square")]


def test_resume_decodes_only_the_prompts_a_stopped_run_did_not_finish(assets, tmp_path):
    """A stopped predict run (hours into 30k COCO prompts) could only start again from scratch (overwrite) or in a
    new directory. ``resume`` keeps the prompts with a JSON line and decodes the rest: the files and lines equal an
    uninterrupted run's."""
    full = tmp_path / "full"
    predict(assets, full, batch_size=1)

    class Stop(ImageWriter):
        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, *args):
            if batch_idx == 1:  # killed while decoding prompt 1: a PNG of it and half its line are on disk
                (self.output_dir / "000001-0.png").write_bytes(b"partial")
                with open(self._part, "a", encoding="utf-8") as f:
                    f.write('{"index": 1, "prompt": "a bl')
                raise RuntimeError("stopped")
            super().write_on_batch_end(trainer, pl_module, prediction, batch_indices, batch, batch_idx, *args)

    out = tmp_path / "out"
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[Stop(str(out), str(assets / "vqgan"))], **quiet)
    with pytest.raises(RuntimeError, match="stopped"):
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    assert not (out / "predictions.jsonl").exists() and (out / "predictions.rank0.jsonl").is_file()

    batches = predict(assets, out, batch_size=2, resume=True)
    assert [i for b in batches for i in b["index"]] == [1, 2]  # prompt 0 is not decoded again
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
    for path in full.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name

    assert not predict(assets, out, batch_size=2, resume=True)  # all done: nothing decoded, nothing changed
    for path in full.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name

    other = tmp_path / "other.txt"
    other.write_text("a red square\na yellow star\n")
    dm = PromptDataModule(str(other), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    writer = ImageWriter(str(out), str(assets / "vqgan"), resume=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], **quiet)
    want = r"resume: .*predictions.jsonl holds prompt 1 'a blue circle', but .*other.txt has 'a yellow star': the"
    with pytest.raises(ValueError, match=want + " earlier run read another prompts file"):
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    # the same prompts without the jsonl's seed for prompt 1: this run would give it seed 5 + 1, a mix of two seedings
    same = tmp_path / "same.txt"
    same.write_text("a red square\na blue circle\na green triangle\n")
    full_lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(full_lines[:2]))
    dm = PromptDataModule(str(same), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ImageWriter(str(out), resume=True)], **quiet)
    want = (
        r"resume: .*predictions.jsonl decoded prompt 1 with seed 123, but .*same.txt gives it no seed, so this run "
        r"would use 6 \(generation.seed 5 \+ index\): the earlier run read another file's seeds"
    )
    with pytest.raises(ValueError, match=want):
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    (out / "predictions.jsonl").write_text("".join(full_lines))
    with pytest.raises(ValueError, match="give overwrite .* or resume .*, not both"):
        ImageWriter(str(out), overwrite=True, resume=True)
    # other settings than the earlier run's would mix two runs' images in one directory (say, for one FID); with
    # prompt 2 left to decode (with none left, nothing runs and nothing is checked)
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]))
    hotter = CM3LeonModule(
        preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**{**SETTINGS, "cfg": 5.0})
    )
    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    writer = ImageWriter(str(out), str(assets / "vqgan"), clip=None, resume=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], **quiet)
    want = r"settings differ from the earlier run's \(.*predict_settings.json\): generation.cfg: 2.0 -> 5.0; the"
    with pytest.raises(ValueError, match=want + " finished prompts' images would not be this run's"):
        trainer.predict(hotter, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    # another checkpoint too (Lightning loads it after the callbacks' setup: the model was not recorded at all)
    ckpt = torch.load(assets / "model.ckpt", weights_only=True)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "other.ckpt")
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ImageWriter(str(out), str(assets / "vqgan"),
                                                                                 resume=True)], **quiet)  # fmt: skip
    with pytest.raises(ValueError, match=r"settings differ from the earlier run's \(.*\): model: '[0-9a-f]{64}' -> "):
        trainer.predict(module, datamodule=dm, ckpt_path=str(tmp_path / "other.ckpt"))
    recorded = json.loads((out / "predict_settings.json").read_text())
    assert recorded["model_source"] == str(assets / "model.ckpt") and len(recorded["model"]) == 64


def test_a_resumed_run_whose_merge_fails_keeps_the_earlier_runs_lines(assets, tmp_path, monkeypatch):
    """A resumed run keeps the earlier run's lines in ``predictions.jsonl`` (not in a part file); the final merge
    rewrote that file in place, so a write that failed (a full disk) or was killed truncated it and lost them. It is
    now replaced whole: the earlier lines stay, the new ones stay in the part file, and a rerun completes it."""
    out = tmp_path / "out"
    predict(assets, out, batch_size=1, vqgan=False)
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]))  # a run stopped before prompt 2

    def full_disk(write):
        def wrapped(self, data, *args, **kwargs):
            if self.name.endswith("predictions.jsonl") or self.name.startswith(".predictions.jsonl"):
                write(self, data[: len(data) // 3], *args, **kwargs)
                raise OSError(28, "No space left on device")
            return write(self, data, *args, **kwargs)

        return wrapped

    class FullDisk(ImageWriter):
        def on_predict_end(self, trainer, pl_module):
            with monkeypatch.context() as m:
                m.setattr(Path, "write_text", full_disk(Path.write_text))
                m.setattr(Path, "write_bytes", full_disk(Path.write_bytes))
                super().on_predict_end(trainer, pl_module)

    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[FullDisk(str(out), resume=True)], **quiet)
    with pytest.raises(OSError, match="No space left"):
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    assert (out / "predictions.jsonl").read_text() == "".join(lines[:2])  # the earlier run's lines, whole
    assert (out / "predictions.rank0.jsonl").read_text() == lines[2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not predict(assets, out, batch_size=1, vqgan=False, resume=True)  # nothing left to decode
    assert (out / "predictions.jsonl").read_text() == "".join(lines)


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(assets, tmp_path):
    """It failed in on_predict_start, with the checkpoint loaded, as ``FileExistsError: [Errno 17] File exists``
    naming no argument."""
    (tmp_path / "out").write_text("notes")
    with pytest.raises(ValueError, match=f"^ImageWriter output_dir: {tmp_path / 'out'} is a file, not a directory$"):
        predict(assets, tmp_path / "out", batch_size=1, vqgan=False)
    assert (tmp_path / "out").read_text() == "notes"


def test_resume_decodes_a_damaged_line_again(assets, tmp_path):
    """A line holding bytes that are not UTF-8 (a damaged disk, a stray editor) stopped the resumed run with a
    UnicodeDecodeError naming no file; like a line cut short, it is no prompt's: that prompt is decoded again."""
    out = tmp_path / "out"
    predict(assets, out, batch_size=1, vqgan=False)
    lines = (out / "predictions.jsonl").read_bytes().split(b"\n")
    (out / "predictions.jsonl").write_bytes(b"\n".join([lines[0], lines[1].replace(b"blue", b"bl\xffe"), *lines[2:]]))
    batches = predict(assets, out, batch_size=1, vqgan=False, resume=True)
    assert [i for b in batches for i in b["index"]] == [1]
    assert (out / "predictions.jsonl").read_bytes().split(b"\n") == lines


# ------------------------------------------------------------------------------------------------ the CLI
def test_cm3leon_predict_on_two_processes_after_cm3leon_fit(tmp_path):
    """The documented command: the fit's saved config, its last.ckpt, two CPU processes (DDP, gloo)."""
    data = write_eval_data(tmp_path / "data", n_train=8, n_val=2)
    fit = {
        "seed_everything": 0,
        "data": {"class_path": "cm3leon_lightning.data.datamodule.CM3LeonDataModule", "init_args": {
            "train_data": data["train"], "seq_len": 128, "batch_size": 4, "num_workers": 0, "max_retrieved": 0}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"), "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(tmp_path / "run" / "ckpt"), "save_last": True}}]},
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    cm3leon_main(["fit", "--config", str(ROOT / "configs/model/tiny.yaml"), "--config", str(tmp_path / "fit.yaml")])
    config, ckpt = tmp_path / "run" / "config.yaml", tmp_path / "run" / "ckpt" / "last.ckpt"
    assert config.is_file() and ckpt.is_file()

    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow circle", "a red circle"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "cm3leon_lightning", "predict", "--config", str(config), "--ckpt_path", str(ckpt),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(out),
        "--return_predictions", "false",
        "--data", "cm3leon_lightning.generation.predict.PromptDataModule", "--data.prompts", "prompts.txt",
        "--data.tokenizer", data["tokenizer"], "--data.vocab_from", str(ckpt), "--data.batch_size", "2",
        "--trainer.callbacks+=cm3leon_lightning.generation.predict.ImageWriter",
        "--trainer.callbacks.output_dir", str(out), "--trainer.callbacks.vqgan", data["vqgan"],
        "--model.init_args.generation.num_samples", "2", "--model.init_args.generation.seed", "7",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"], r["seed"]) for r in rows] == [(i, p, 7 + i) for i, p in enumerate(prompts)]
    settings = {**GenerationSettings().__dict__, "num_samples": 2}
    want = reference_codes(ckpt, Path(data["tokenizer"]), prompts, [7 + i for i in range(5)], settings)
    for i, r in enumerate(rows):  # split over two ranks, yet equal to single-process decoding
        np.testing.assert_array_equal(np.load(out / r["codes"]), want[i])
        assert [Image.open(out / f).size for f in r["files"]] == [(16, 16)] * 2 and (out / r["grid"]).is_file()
    assert not list(out.glob("predictions.rank*.jsonl"))
    assert config.read_text().count("ImageWriter") == 0  # the fit config was not overwritten

    # a stopped run: prompts 1 and 3 have no line (and 3 a stray PNG); resumed on two processes, only they decode
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("".join(line + "\n" for i, line in enumerate(lines) if i not in (1, 3)))
    for path in [*out.glob("000001-*"), *out.glob("000003-*")]:
        path.unlink()
    (out / "000003-0.png").write_bytes(b"partial")
    again = [*cmd, "--trainer.callbacks.resume", "true"]  # the documented command, resumed
    proc = subprocess.run(again, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "predictions.jsonl").read_text().splitlines() == lines
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(np.load(out / r["codes"]), want[i])
        assert [Image.open(out / f).size for f in r["files"]] == [(16, 16)] * 2
    assert not list(out.glob("predictions.rank*.jsonl"))


def test_fewer_prompts_than_devices_give_every_device_one(assets, tmp_path, monkeypatch):
    """Found in review: a prompts file (or a resumed run's remainder) with fewer prompts than devices stopped the run
    on two processes: Lightning's sampler gave a rank no prompt, which failed with "DataLoader within local rank has
    zero length" (or its sampler's assertion) while the others waited for it. The dataset is padded with repeats up to
    one per device, flagged so that the writer leaves them to the rank that owns the prompt."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    one = tmp_path / "one.txt"
    one.write_text("a red square\n")
    dm = PromptDataModule(str(one), str(assets / "tok"), str(assets / "model.ckpt"), 2)
    dm.trainer = type("ThreeDevices", (), {"world_size": 3, "lightning_module": None})()
    dataset = dm.predict_dataloader().dataset
    per_rank = [list(UnrepeatedDistributedSampler(dataset, num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert per_rank == [[0], [1], [2]]  # every rank gets an item (it got none: [[0], [], []] and an assertion)
    assert [(dataset[i]["index"], dataset[i]["repeat"]) for i in range(3)] == [(0, False), (0, True), (0, True)]
    assert collate_prompts([dataset[0], dataset[1]])["repeat"] == [False, True]

    # The writer skips the fillers: in one process (world size faked), predictions.jsonl holds the prompt once.
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    dm = PromptDataModule(str(one), str(assets / "tok"), str(assets / "model.ckpt"), 2)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    out = tmp_path / "out"
    trainer = writer_trainer(out, tmp_path)
    batches = trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    assert [b["index"] for b in batches] == [[0, 0]]  # the prompt and its filler were decoded
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, "a red square")]
    assert sorted(p.name for p in out.iterdir()) == ["000000-codes.npy", "predict_settings.json", "predictions.jsonl"]


def test_resume_with_another_precision_is_refused(assets, tmp_path):
    """Found in review: ``predict_settings.json`` did not record the trainer's precision; ``bf16-mixed`` keeps the
    float32 weights (same fingerprint) but draws other samples, so a resume with it mixed two runs' images in one
    directory. It is recorded and compared now; a file of an earlier version, without it, still resumes."""
    out = tmp_path / "out"
    predict(assets, out, batch_size=1, vqgan=False)
    assert json.loads((out / "predict_settings.json").read_text())["precision"] == "32-true"
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]))  # prompt 2 left to decode

    dm = PromptDataModule(str(assets / "prompts.jsonl"), str(assets / "tok"), str(assets / "model.ckpt"), 1)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(**SETTINGS))
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", logger=False, callbacks=[ImageWriter(str(out), resume=True)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    want = r"settings differ from the earlier run's \(.*predict_settings.json\): precision: '32-true' -> 'bf16-mixed'"
    with pytest.raises(ValueError, match=want):
        trainer.predict(module, datamodule=dm, ckpt_path=str(assets / "model.ckpt"))
    assert (out / "predictions.jsonl").read_text() == "".join(lines[:2])  # nothing lost

    recorded = json.loads((out / "predict_settings.json").read_text())
    del recorded["precision"]  # as an earlier version wrote it
    (out / "predict_settings.json").write_text(json.dumps(recorded))
    batches = predict(assets, out, batch_size=1, vqgan=False, resume=True)
    assert [i for b in batches for i in b["index"]] == [2]
    assert (out / "predictions.jsonl").read_text() == "".join(lines)
