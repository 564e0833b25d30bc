"""``cm3leon generate``: the files it promises, and one-line errors for a bad checkpoint path, a vocabulary
mismatch between checkpoint and tokenizer, and a prompt longer than the context."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from support.checkpoint_setup import CORPUS, write_checkpoint_assets

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.generation.cli import load_checkpoint, main, resolve_dtype
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer, a micro VQGAN (16 px, 8x8 codes), a CM3LeonModule checkpoint built for both and a picture."""
    root = write_checkpoint_assets(tmp_path_factory.mktemp("gen"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "x.png")
    return root


def base(root, out):
    return ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan"),
            "--out", str(out), "--no-compile"]  # fmt: skip


def test_text_to_image_writes_samples_grid_and_codes(assets, tmp_path):
    argv = ["generate", *base(assets, tmp_path), "--prompt", "a red circle", "--num-samples", "3", "--cfg", "3"]
    assert cm3leon_main(argv) == 0  # through the cm3leon console entry point
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (3, 64) and codes.min() >= 0 and codes.max() < 32
    for i in range(3):
        assert Image.open(tmp_path / f"sample-{i}.png").size == (16, 16)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 16 and grid.height > 16
    model, vocab = load_checkpoint(assets / "model.ckpt")
    assert vocab.image_tokens == 64 and model.config.max_seq_len == 128
    # --attention flex decodes the same codes (greedy, so float rounding cannot flip a sample)
    greedy = [*base(assets, tmp_path), "--prompt", "a red circle", "--num-samples", "2", "--method", "greedy"]
    assert main([*greedy, "--out", str(tmp_path / "sdpa")]) == 0
    assert main([*greedy, "--out", str(tmp_path / "flex"), "--attention", "flex"]) == 0
    assert np.array_equal(np.load(tmp_path / "sdpa" / "codes.npy"), np.load(tmp_path / "flex" / "codes.npy"))


def test_file_helpers_stay_importable_from_the_cli_module():
    """cli_files was split out of cli; serve, predict and user code import these names from their old home."""
    from cm3leon_lightning.generation import cli, cli_files

    names = ["OUTPUT_NAME", "previous_outputs", "check_out", "start_writing", "to_pil", "save_grid", "load_image",
             "square_image", "write_images"]  # fmt: skip
    for name in names:
        assert getattr(cli, name) is getattr(cli_files, name), name


def test_dtype_loads_the_transformer_in_that_precision(assets, tmp_path):
    """--dtype bfloat16 decodes with bf16 weights and cache (on CPU too) and still writes only image codes; auto is
    float32 on CPU."""
    model, _ = load_checkpoint(assets / "model.ckpt", dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("int8", "cpu")
    argv = [*base(assets, tmp_path), "--prompt", "a red circle", "--num-samples", "2", "--dtype", "bfloat16"]
    assert main(argv) == 0
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (2, 64) and codes.min() >= 0 and codes.max() < 32
    assert Image.open(tmp_path / "sample-1.png").size == (16, 16)
    argv = [*base(assets, tmp_path / "t"), "--image", str(assets / "x.png"), "--dtype", "bfloat16"]
    assert main(argv + ["--max-new-tokens", "3"]) == 0 and (tmp_path / "t" / "answer.txt").is_file()


def test_image_to_text_writes_the_answer(assets, tmp_path, capsys):
    argv = [*base(assets, tmp_path), "--image", str(assets / "x.png"), "--instruction", "Describe the given picture."]
    assert main(argv + ["--max-new-tokens", "5"]) == 0
    answer = (tmp_path / "answer.txt").read_bytes().decode()  # bytes: read_text would turn a \r into \n
    assert answer.endswith("\n") and answer.strip() == capsys.readouterr().out.strip()


def test_image_to_text_in_the_image_first_layout(assets, tmp_path, capsys):
    """--layout image_first answers after '<eos> image <break> instruction', as generate_text does."""
    from cm3leon_lightning.generation import generate_text
    from cm3leon_lightning.generation.cli import load_image

    question = "Question: what is red? Answer:"
    argv = [*base(assets, tmp_path), "--image", str(assets / "x.png"), "--instruction", question, "--method", "greedy",
            "--overwrite"]  # fmt: skip
    answers = {}
    for layout in ("infill", "image_first"):
        assert main([*argv, "--max-new-tokens", "6", "--layout", layout]) == 0
        answers[layout] = (tmp_path / "answer.txt").read_bytes().decode().strip()
    capsys.readouterr()
    model, vocab = load_checkpoint(assets / "model.ckpt")
    vqgan = VQGAN.from_pretrained(assets / "vqgan").eval()
    tok = TextTokenizer.load(assets / "tok")
    codes = vqgan.encode(load_image(str(assets / "x.png"), vqgan))
    want = generate_text(model, vocab, codes, tok.encode(question), max_new_tokens=6, layout="image_first")[0]
    assert answers["image_first"] == tok.decode(want).strip() and answers["image_first"] != answers["infill"]


def test_edit_writes_the_edited_candidates(assets, tmp_path, capsys):
    """--edit decodes edit_image's three guidance streams from the picture's codes, the instruction and the SFT edit
    template's prefix, and writes the candidates as text-to-image does; misuse is a one-line error."""
    from cm3leon_lightning.generation import edit_image
    from cm3leon_lightning.generation.cli import load_image
    from cm3leon_lightning.generation.tasks import EDIT_PREFIX, task_prefix

    # prefix, source image, instruction and 64 new codes need more than the shared checkpoint's 128 positions
    model, vocab = load_checkpoint(assets / "model.ckpt")
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=256)
    module.configure_model()
    ckpt = tmp_path / "long.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    argv = [*base(assets, tmp_path), "--ckpt", str(ckpt), "--image", str(assets / "x.png"), "--edit", "make it blue",
            "--overwrite"]  # fmt: skip
    assert main([*argv, "--num-samples", "2", "--seed", "3", "--text-cfg", "4", "--image-cfg", "1.2"]) == 0
    model, vocab = load_checkpoint(ckpt)
    vqgan = VQGAN.from_pretrained(assets / "vqgan").eval()
    tok = TextTokenizer.load(assets / "tok")
    codes = vqgan.encode(load_image(str(assets / "x.png"), vqgan))
    want = edit_image(model, vocab, codes, [tok.encode("make it blue")], tok.encode(EDIT_PREFIX), text_cfg=4.0,
                      image_cfg=1.2, num_samples=2, seed=3)  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), want.codes[0].numpy())
    assert Image.open(tmp_path / "sample-1.png").size == (16, 16) and (tmp_path / "grid.png").is_file()
    # grounded generation: the task's prefix and, by default, the paper's single CFG 3
    assert main([*argv, "--task", "edge_to_image", "--num-samples", "1", "--seed", "3"]) == 0
    want = edit_image(model, vocab, codes, [tok.encode("make it blue")], tok.encode(task_prefix("edge_to_image")),
                      text_cfg=3.0, image_cfg=3.0, num_samples=1, seed=3)  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), want.codes[0].numpy())
    for extra, message in ((["--instruction", "x"], "give --image, and no --instruction"),
                           (["--method", "cd_k"], "--edit samples with greedy, temperature or top_p")):  # fmt: skip
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    prompt = [a if a != "--image" else "--prompt" for a in argv]
    assert main(prompt) == 2 and "--edit edits the picture of --image" in capsys.readouterr().err


def test_infill_fills_text_masks_and_redraws_image_rows(assets, tmp_path, capsys):
    """--infill with --infill-rows: the document '<eos> a <mask:0> circle <break> image with rows 2-4 as <mask:1>'
    filled as infill() fills it; the rows outside stay the picture's codes."""
    from cm3leon_lightning.generation import infill_batch
    from cm3leon_lightning.generation.cli import load_image
    from cm3leon_lightning.generation.masking import infill_document

    model, vocab = load_checkpoint(assets / "model.ckpt")
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=256)  # image + spans: > 128 positions
    module.configure_model()
    ckpt = tmp_path / "long.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    argv = [*base(assets, tmp_path), "--ckpt", str(ckpt), "--image", str(assets / "x.png"), "--infill",
            "a <mask> circle", "--infill-rows", "2:4", "--num-samples", "2", "--method", "top_p",
            "--seed", "5"]  # fmt: skip
    assert main(argv) == 0
    answers = json.loads((tmp_path / "answers.json").read_text(encoding="utf-8"))
    assert len(answers) == 2 and (tmp_path / "answer.txt").read_bytes().decode() == answers[0] + "\n"  # a \r stays
    assert capsys.readouterr().out.startswith("\n".join(answers) + "\nwrote 2 samples and grid.png")
    model, vocab = load_checkpoint(ckpt)
    vqgan = VQGAN.from_pretrained(assets / "vqgan").eval()
    tok = TextTokenizer.load(assets / "tok")
    codes = vqgan.encode(load_image(str(assets / "x.png"), vqgan))[0]
    ids, kinds = infill_document(tok.encode, vocab, "a <mask> circle", codes.tolist(), (2, 4))
    written = np.load(tmp_path / "codes.npy")
    both = infill_batch(model, vocab, [ids, ids], span_kinds=[kinds, kinds], method="top_p", seed=5)
    for i, result in enumerate(both):  # the samples decode together, under --seed
        doc = vocab.ids_to_document(result.ids)
        assert answers[i] == tok.decode(list(doc[0].tokens))
        assert written[i].tolist() == list(doc[1].tokens)
    outside = np.r_[0:16, 32:64]  # rows 0-1 and 4-7 of the 8x8 grid
    assert (written[:, outside] == codes.numpy()[outside]).all()
    assert Image.open(tmp_path / "sample-1.png").size == (16, 16)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --prompt (text-to-image), --image (image-to-text, --edit) or --infill"),
        (["--infill", "a <mask>", "--prompt", "x"], "--infill fills a document of its own"),
        (["--infill-rows", "0:2", "--prompt", "x"], "--infill-rows needs --infill"),
        (["--infill", "a red circle"], "nothing to fill: put <mask> in the text or give --infill-rows"),
        (["--infill", "a <mask>", "--infill-rows", "0:2"], "--infill-rows redraws part of an image: give --image"),
        # --rerank and --retrieve were ignored outside text-to-image (loading a CLIP model for nothing)
        (["--infill", "a <mask>", "--rerank"], "--rerank orders the images of --prompt (text-to-image)"),
        (["--image", "x.png", "--rerank"], "--rerank orders the images of --prompt (text-to-image)"),
        (["--infill", "a <mask>", "--retrieve", "b", "--shards", "s"], "it cannot be used with --image or --infill"),
    ],
)
def test_infill_misuse_is_one_line(assets, tmp_path, capsys, extra, message):
    assert main([*base(assets, tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--infill", "a <mask>", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),  # was: no documents
        (["--infill", "a <mask>", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "x", "--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be finite and >= 0 (0 = greedy), got -1.0"),
        (["--prompt", "x", "--cdk-k", "0"], "--cdk-k must be >= 1, got 0"),
        (["--prompt", "x", "--cdk-alpha", "2"], "--cdk-alpha must lie in [0, 1], got 2.0"),
        (["--prompt", "x", "--cfg", "nan"], "--cfg must be finite, got nan"),
        (["--image", "x.png", "--edit", "x", "--text-cfg", "inf"], "--text-cfg must be finite, got inf"),  # was: cfg
        (["--prompt", "x", "--retrieve", "bank", "--shards", "s", "--k", "0"], "--k must be >= 1, got 0"),
        # torch's generator failed after the checkpoint was read: "Overflow when unpacking long long"
        (["--prompt", "x", "--seed", str(2**64)], f"--seed must lie in [0, 2**63), got {2**64}"),
        (["--prompt", "x", "--seed", "-1"], "--seed must lie in [0, 2**63), got -1"),
    ],
)
def test_numeric_arguments_are_checked_by_flag_before_loading(assets, tmp_path, capsys, extra, message):
    """A bad number named its decoder parameter (top_p, cfg for --text-cfg, 'infill: no documents given' for
    --num-samples 0) after the checkpoint was read; the flag is named now, with a checkpoint that is never read."""
    argv = [*base(assets, tmp_path / "new"), *extra]
    argv[argv.index("--ckpt") + 1] = str(assets / "x.png")  # reading it would fail with another message
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"cm3leon generate: error: {message}\n"
    assert not (tmp_path / "new").exists()


def test_clear_errors(assets, tmp_path, capsys):
    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    args = base(assets, tmp_path)
    (tmp_path / "fake.png").write_text("not an image")  # was a PIL.UnidentifiedImageError traceback
    fake = error([*base(assets, tmp_path / "new"), "--image", str(tmp_path / "fake.png")])
    assert fake.startswith("cm3leon generate: error: --image: ") and "fake.png is not an image" in fake
    assert not (tmp_path / "new").exists()  # the failed run's new --out folder is removed
    missing = [*args[:1], str(tmp_path / "nope.ckpt"), *args[2:], "--prompt", "a red circle"]
    assert "checkpoint file not found" in error(missing) and "nope.ckpt" in error(missing)
    other = TextTokenizer.train(CORPUS, vocab_size=280)
    other.save(tmp_path / "other")
    mismatch = [*args[:3], str(tmp_path / "other"), *args[4:], "--prompt", "a red circle"]
    msg = error(mismatch)
    assert "vocabulary mismatch" in msg and f"vocab_size={other.vocab_size}" in msg
    long = " ".join(["two green triangles"] * 20)
    assert "max_seq_len=128" in error([*args, "--prompt", long])
    msg = error([*args[:1], str(assets / "x.png"), *args[2:], "--prompt", "a red circle"])
    assert "cannot be read as a Lightning checkpoint" in msg and msg.count("\n") == 1  # one line, no torch essay
    assert "weights_only" not in msg
    if not torch.cuda.is_available():
        eager = args.index("--no-compile")
        msg = error([*args[:eager], *args[eager + 1 :], "--prompt", "red", "--compile", "graph", "--device", "cpu"])
        assert "compile='graph' needs a CUDA device" in msg


def test_a_16_bit_grey_image_is_read_as_prepare_reads_it():
    """`convert("RGB")` clipped 16-bit grey (depth maps for depth_to_image) to near-white; it is now scaled to 8 bits,
    as cm3leon prepare does for training images, and a transparent pixel becomes white."""
    from cm3leon_lightning.generation.cli import square_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I")
    got = square_image(img, 8)  # (3, 8, 8), same size: no resampling
    want = np.round(ramp.astype(np.float64) / 257).astype(np.uint8)  # as viewers show it, not stretched
    assert torch.equal(got, torch.from_numpy(np.stack([want] * 3)))
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (square_image(clear, 4) == 255).all()


class Stop(Exception):
    """Raised by a spy once it has seen what the model would read (no decoding needed)."""


def test_texts_are_tokenized_as_the_training_captions(assets, tmp_path, monkeypatch, capsys):
    """--prompt, --instruction, --edit and --infill were tokenized as given: a trailing newline or tab, or a doubled
    space, added tokens the model never saw (``cm3leon prepare`` cleans every training caption and SFT segment of
    them); now each reads as its cleaned text, and text that cleans to nothing is refused naming its flag."""
    from cm3leon_lightning.generation import cli

    tok = TextTokenizer.load(assets / "tok")
    seen = {}

    def spy(name, index):
        def record(*args, **kwargs):
            seen[name] = args[index]
            raise Stop

        monkeypatch.setattr(cli, name, record)

    for name, index in (("generate_image", 2), ("generate_text", 3), ("edit_image", 3), ("infill_batch", 2)):
        spy(name, index)
    image = ["--image", str(assets / "x.png")]
    for extra in (["--prompt", "a red  circle\t\n"], [*image, "--instruction", "Question: what is\nred?  Answer: "],
                  [*image, "--edit", "make it\tblue\r\n"], [*image, "--infill", " a  <mask> circle\n"]):  # fmt: skip
        with pytest.raises(Stop):
            main([*base(assets, tmp_path), *extra])
    assert seen["generate_image"] == [tok.encode("a red circle")] == [[77, 278, 274, 289, 284]]
    assert tok.encode("a red  circle\t\n") != tok.encode("a red circle")  # the ids the model read before
    assert seen["generate_text"] == tok.encode("Question: what is red? Answer:")
    assert seen["edit_image"] == [tok.encode("make it blue")]
    _, vocab = load_checkpoint(assets / "model.ckpt")
    want = [vocab.eos_id, *tok.encode("a"), vocab.sentinel_id(0), *tok.encode(" circle"), vocab.break_id]
    ids = seen["infill_batch"]  # <eos> a <mask:0> circle <break> image, for each of the 8 samples
    assert len(ids) == 8 and all(row == ids[0] for row in ids) and ids[0][: len(want)] == want
    assert len(ids[0]) == len(want) + vocab.image_tokens

    for extra, message in (
        (["--prompt", " \n\t"], "--prompt: the prompt holds no text (only whitespace or control characters)"),
        ([*image, "--instruction", "\x00 "], "--instruction: the instruction holds no text"),
        ([*image, "--edit", "\r\n"], "--edit: the edit holds no text"),
        (["--infill", "  "], "--infill: the caption holds no text"),
        (["--prompt", "a \udcff circle"], "--prompt: the prompt holds an unpaired UTF-16"),  # argv's bad bytes
    ):
        argv = [*base(assets, tmp_path / "new"), *extra]
        argv[argv.index("--ckpt") + 1] = str(assets / "x.png")  # refused before the checkpoint is read
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(f"cm3leon generate: error: {message}")
        assert not (tmp_path / "new").exists()


def test_an_out_holding_an_earlier_run_is_refused_unless_overwrite(assets, tmp_path, capsys):
    """A second run into the same --out with fewer samples left the first run's sample-2.png beside its own (and
    replaced grid.png and codes.npy), exit 0. It is refused now, before the checkpoint is read, naming the folder and
    its files; --overwrite deletes exactly generate's files, and only once the run is about to write its own."""
    out = tmp_path / "gen1"
    first = [*base(assets, out), "--prompt", "a red circle", "--method", "greedy"]
    assert main([*first, "--num-samples", "3"]) == 0
    (out / "notes.txt").write_text("mine")  # files of the user
    (out / "sample-best.png").write_bytes(b"mine too")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    second = [*base(assets, out), "--prompt", "a red circle", "--method", "greedy", "--num-samples", "2"]
    unread = list(second)
    unread[unread.index("--ckpt") + 1] = str(assets / "x.png")  # reading it would fail with another message
    to_text = [a if a != "--prompt" else "--image" for a in unread]
    to_text[to_text.index("--image") + 1] = str(assets / "x.png")
    for argv in (unread, to_text):  # an image-to-text run's answer.txt would mix in too
        assert main(argv) == 2
        assert capsys.readouterr().err == (
            f"cm3leon generate: error: --out: {out} already holds 5 files of an earlier generate run (codes.npy, "
            "grid.png, sample-0.png, sample-1.png ...); give a new or empty directory, or --overwrite to delete them "
            "first\n"
        )
    # --overwrite with a run that fails before writing anything: the earlier outputs are still there
    assert main([*unread, "--overwrite"]) == 2
    assert "cannot be read as a Lightning checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert main([*second, "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["codes.npy", "grid.png", "notes.txt", "sample-0.png", "sample-1.png", "sample-best.png"]
    assert np.load(out / "codes.npy").shape == (2, 64)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sample-best.png").read_bytes() == b"mine too"
    assert main([*base(assets, tmp_path / "other"), "--image", str(assets / "x.png"), "--max-new-tokens", "2"]) == 0
    assert main([*base(assets, tmp_path / "other"), "--image", str(assets / "x.png"), "--overwrite"]) == 0  # answer.txt


@pytest.mark.parametrize(
    "device, available, count, message",
    [
        ("cuda", False, 0, "--device cuda: CUDA is not available on this machine (no GPU or driver); use cpu"),
        ("cuda:0", False, 0, "--device cuda:0: CUDA is not available on this machine (no GPU or driver); use cpu"),
        ("cuda:2", True, 2, "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
        ("gpu", False, 0, "--device: 'gpu' is not a device (cpu, cuda, cuda:1, mps ...)"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line(assets, tmp_path, capsys, monkeypatch, device, available, count,
                                                 message):  # fmt: skip
    """--device cuda without a GPU failed with a 24-line "Found no NVIDIA driver" traceback while loading; a device
    this machine lacks is refused now, naming the flag, before the checkpoint is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    argv = [*base(assets, tmp_path / "new"), "--prompt", "a red circle", "--device", device]
    argv[argv.index("--ckpt") + 1] = str(assets / "x.png")  # reading it would fail with another message
    assert main(argv) == 2
    assert capsys.readouterr().err == f"cm3leon generate: error: {message}\n"
    assert not (tmp_path / "new").exists()


def test_method_help_says_what_image_answers_and_infill_do(assets, tmp_path, monkeypatch):
    """The help said "--image answers and --infill decode greedily", but both sample with --method (top_p by
    default); only cd_k falls back to greedy there."""
    from cm3leon_lightning.generation import cli
    from cm3leon_lightning.generation.cli_args import build_parser

    method = next(a for a in build_parser()._actions if "--method" in a.option_strings)
    assert method.default == "top_p"
    assert " ".join(method.help.split()) == (
        "sampling rule, also of --image answers and --infill (cd_k: for --prompt; --edit refuses it, --image answers "
        "and --infill decode greedily with it)"
    )
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["method"])
        raise Stop

    monkeypatch.setattr(cli, "infill_batch", spy)
    monkeypatch.setattr(cli, "generate_text", spy)
    image = ["--image", str(assets / "x.png")]
    for extra in ([], ["--method", "cd_k"]):
        for mode in (["--infill", "a <mask> circle"], []):
            with pytest.raises(Stop):
                main([*base(assets, tmp_path), *image, *mode, *extra])
    assert seen == ["top_p", "top_p", "greedy", "greedy"]


CFG_IGNORED = (
    "--cfg 5.0 applies to --prompt with greedy, temperature or top_p only; this run would ignore it (--method cd_k "
    "guides by --cdk-k/--cdk-alpha, --edit by --text-cfg/--image-cfg)"
)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--instruction", "Describe it."], "--instruction 'Describe it.' applies to --image answers"),
        (["--prompt", "x", "--text-cfg", "5"], "--text-cfg 5.0 applies to --edit only"),
        (["--image", "x.png", "--image-cfg", "2"], "--image-cfg 2.0 applies to --edit only"),
        (["--prompt", "x", "--task", "edge_to_image"], "--task 'edge_to_image' applies to --edit only"),
        (["--prompt", "x", "--layout", "image_first"], "--layout 'image_first' applies to --image answers"),
        (["--image", "x.png", "--edit", "blue", "--cfg", "5"], CFG_IGNORED),
        (["--image", "x.png", "--cfg", "5"], CFG_IGNORED),
        (["--prompt", "x", "--method", "cd_k", "--cfg", "5"], CFG_IGNORED),
        (["--prompt", "x", "--cdk-k", "4"], "--cdk-k 4 applies to --method cd_k with --prompt only"),
        (["--image", "x.png", "--num-samples", "3"], "--num-samples 3 applies to --prompt, --edit and --infill"),
        (["--prompt", "x", "--max-new-tokens", "9"], "--max-new-tokens 9 applies to --image answers and --infill"),
        (["--prompt", "x", "--shards", "data/"], "--shards 'data/' applies to --retrieve only"),
        (["--prompt", "x", "--k", "4"], "--k 4 applies to --retrieve only"),
        (["--prompt", "x", "--clip-pretrained", "c.pt"], "--clip-pretrained 'c.pt' applies to --rerank and --retrieve"),
        (["--prompt", "x", "--method", "greedy", "--temperature", "0.7"], "--temperature 0.7 applies to sampling"),
        (["--image", "x.png", "--method", "cd_k", "--temperature", "0.7"], "--temperature 0.7 applies to sampling"),
        (["--prompt", "x", "--method", "temperature", "--top-p", "0.5"], "--top-p 0.5 applies to --method top_p"),
        (["--prompt", "x", "--method", "greedy", "--top-p", "0.5"], "--top-p 0.5 applies to --method top_p"),
    ],
)
def test_a_flag_the_task_ignores_is_refused(assets, tmp_path, capsys, extra, message):
    """Found in review: ``--prompt ... --instruction``, ``--text-cfg`` without ``--edit``, ``--shards`` without
    ``--retrieve`` and the like decoded as if the flag had not been given, exit 0. Refused now, naming it, before
    the checkpoint is read."""
    argv = [*base(assets, tmp_path / "new"), *extra]
    argv[argv.index("--ckpt") + 1] = str(assets / "x.png")  # reading it would fail with another message
    argv = [str(assets / "x.png") if a == "x.png" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cm3leon generate: error: {message}") and "; this run would ignore it" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_the_flags_each_task_uses_are_accepted(assets, tmp_path):
    """The flags of each task are still taken (their defaults too, given explicitly)."""
    image = ["--image", str(assets / "x.png")]
    for i, extra in enumerate((
        ["--prompt", "x", "--cfg", "3", "--method", "cd_k", "--cdk-k", "2", "--cdk-alpha", "0.3", "--k", "2",
         "--num-samples", "1", "--max-new-tokens", "32", "--layout", "infill", "--task", "edit", "--instruction", ""],
        [*image, "--instruction", "Describe it.", "--layout", "image_first", "--max-new-tokens", "2"],
        ["--prompt", "x", "--cfg", "2", "--num-samples", "1", "--method", "greedy"],
        ["--prompt", "x", "--num-samples", "1", "--method", "cd_k", "--temperature", "0.7"],
        ["--prompt", "x", "--num-samples", "1", "--method", "temperature", "--temperature", "0.7"],
        [*image, "--max-new-tokens", "2", "--temperature", "0.7", "--top-p", "0.5"],
    )):  # fmt: skip
        assert main([*base(assets, tmp_path / str(i)), *extra]) == 0, extra


def test_an_out_that_is_a_file_is_one_line(assets, tmp_path, capsys):
    """Found in review: ``--out`` naming a file failed with a ``FileExistsError`` traceback once the model had been
    loaded; it is refused before, naming the flag, and the file is kept."""
    (tmp_path / "out").write_text("notes")
    argv = [*base(assets, tmp_path / "out"), "--prompt", "a red circle"]
    argv[argv.index("--ckpt") + 1] = str(assets / "x.png")  # reading it would fail with another message
    assert main(argv) == 2
    assert capsys.readouterr().err == f"cm3leon generate: error: --out: {tmp_path / 'out'} is a file, not a directory\n"
    assert (tmp_path / "out").read_text() == "notes"


def test_the_grid_caption_is_one_line_in_any_default_font(tmp_path, monkeypatch):
    """Found in review: where PIL's default font is its Latin-1 bitmap font (Pillow 10.0, the oldest allowed, or a
    build without FreeType), a prompt with another character raised UnicodeEncodeError after every sample had been
    decoded (predict: mid-run); such characters show as '?' now. A prompt's newline (a .jsonl prompt of predict)
    drew a second line over the tiles; it is drawn as a space."""
    from PIL import ImageDraw, ImageFont

    from cm3leon_lightning.generation.cli_files import save_grid

    drawn: list[str] = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: drawn.append(t) or text(self, xy, t, *a, **k)
    )
    save_grid(torch.zeros(2, 3, 8, 8), "a red\ncircle", tmp_path / "a.png")
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow has no separate bitmap default font")
    monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
    grid = save_grid(torch.zeros(2, 3, 8, 8), "a caf\u00e9 \u732b", tmp_path / "b.png")
    assert drawn == ["a red circle", "a caf\u00e9 ?"] and grid.size == (2 * (8 + 4) + 4, 8 + 2 * 4 + 14)


def test_a_k_above_the_bank_s_documents_is_refused_naming_its_size(tmp_path, capsys):
    """The bank's 12 documents came back for --k 13, silently (``cm3leon serve`` refuses it at start too)."""
    from support.retrieval_setup import write_retrieval_assets

    root = write_retrieval_assets(tmp_path / "assets")["root"]
    argv = ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "out"),
            "--no-compile", "--prompt", "a blue circle", "--retrieve", str(root / "bank"), "--shards",
            str(root / "shards"), "--clip", "cm3leon-clip-tiny", "--clip-pretrained", str(root / "clip.safetensors"),
            "--k", "13"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"cm3leon generate: error: --k 13: the memory bank {root / 'bank'} (--retrieve) holds 12 documents; "
        "retrieve at most 12\n"
    )
    assert not (tmp_path / "out").exists()  # the folder the run made is removed again
