"""`cm3leon fid`: FIDCallback's prompts as a predict prompts file, and the FID of a predict output directory computed
as the callback computes it (same selection, resize, metric and reference cache)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.eval_setup import TinyFeatures, tiny_module, tiny_tokenizer, trainer, val_loader, write_eval_data

from cm3leon_lightning.callbacks import FIDCallback
from cm3leon_lightning.callbacks.base import read_shard_samples
from cm3leon_lightning.callbacks.fid import reference_cache_file
from cm3leon_lightning.cli import main as cm3leon
from cm3leon_lightning.generation.predict import read_prompts
from cm3leon_lightning.metrics import fid as fid_module
from cm3leon_lightning.metrics.fid import fid_resize, make_fid
from cm3leon_lightning.metrics.fid_cli import main

EXTRACTOR = "support.eval_setup:TinyFeatures"
N = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny shards (24 distinct val images with their jpg) and a predict-like output directory for them: prompt i's
    ``files`` are [its reference image, another image (the reference colour-inverted)]."""
    root = tmp_path_factory.mktemp("fid_cli")
    paths = write_eval_data(root, n_train=4, n_val=N)
    refs, _ = read_shard_samples(paths["val"], N, 16)
    gen = root / "generated"
    gen.mkdir()
    rows = []
    for i, s in enumerate(refs):
        image = s.image.permute(1, 2, 0).numpy()
        Image.fromarray(image).save(gen / f"{i:06d}-0.png")
        Image.fromarray(255 - image).save(gen / f"{i:06d}-1.png")
        files = [f"{i:06d}-0.png", f"{i:06d}-1.png"]
        rows.append({"index": i, "prompt": s.references[0], "seed": 7 + i, "files": files, "grid": None})
    (gen / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**paths, "generated": str(gen), "root": root}


def score_args(data: dict, *extra: str) -> list[str]:
    base = ["score", "--generated", data["generated"], "--data", data["val"], "--num-samples", str(N)]
    return [*base, "--image-size", "16", "--feature-extractor", EXTRACTOR, "--device", "cpu", *extra]


def copy_generated(data: dict, dst: Path, rows: list[dict] | None = None) -> Path:
    """``rows`` (default: the generated directory's) as ``dst/predictions.jsonl``, their files made absolute paths
    into the generated directory (the images stay there)."""
    src = Path(data["generated"])
    if rows is None:
        rows = [json.loads(line) for line in (src / "predictions.jsonl").read_text().splitlines()]
    rows = [{**row, "files": [str(src / f) for f in row["files"]]} for row in rows]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def error_of(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cm3leon fid: error: ")
    return err.removeprefix("cm3leon fid: error: ").rstrip("\n")


def with_generated(args: list[str], gen: Path) -> list[str]:
    args[args.index("--generated") + 1] = str(gen)
    return args


def expected_fid(data: dict, candidate: int, image_size: int) -> float:
    """The callback's metric on the same two image sets: make_fid + fid_resize, real = the shards' selection."""
    metric = make_fid(TinyFeatures())
    refs, _ = read_shard_samples(data["val"], N, image_size)
    metric.update(torch.stack([s.image for s in refs]), real=True)
    gen = Path(data["generated"])
    fake = [fid_resize(Image.open(gen / f"{i:06d}-{candidate}.png"), image_size) for i in range(N)]
    metric.update(torch.stack(fake), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------------------ prompts
def write_coco_like(root: Path, data: dict) -> Path:
    """Shards where some images come again with another caption (as COCO's five captions per image)."""
    from cm3leon_lightning.data.shards import Manifest, ShardSample, ShardWriter, read_shard

    manifest = Manifest.load(Path(data["val"]) / "manifest.json")
    base = [s for info in manifest.shards for s in read_shard(Path(data["val"]) / info.name, manifest)][:5]
    dup = [ShardSample(f"dup-{i}", f"another caption {i}", s.text, s.image, jpg=s.jpg) for i, s in enumerate(base)]
    order = [base[0], base[1], dup[0], base[2], dup[1], dup[0], base[3], base[4], dup[3]]
    order = [ShardSample(f"k{i:02d}-{s.key}", s.caption, s.text, s.image, jpg=s.jpg) for i, s in enumerate(order)]
    tok = tiny_tokenizer()
    text_info = {"path": data["tokenizer"], "sha256": tok.sha256, "n_text": tok.vocab_size, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 8, "grid_w": 8, "image_size": 16}
    ShardWriter(root, text_info, image_info, samples_per_shard=4).write_all(order)
    return root


def test_prompts_are_the_callbacks_captions_one_per_image(data: dict, tmp_path: Path, capsys) -> None:
    coco = write_coco_like(tmp_path / "coco", data)
    out = tmp_path / "p" / "prompts.jsonl"
    assert main(["prompts", "--data", str(coco), "--num-samples", "4", "--out", str(out)]) == 0
    # FIDCallback's selection: the first 4 distinct images, each with its first caption (the copies are skipped)
    cb = FIDCallback(data=str(coco), num_samples=4, image_size=16)
    cb.samples, _ = read_shard_samples(cb.data, cb.num_samples, cb.image_size)
    captions = [s.references[0] for s in cb.samples]
    assert [s.key[:3] for s in cb.samples] == ["k00", "k01", "k03", "k06"]
    assert out.read_text() == "".join(json.dumps({"prompt": c}) + "\n" for c in captions)
    assert read_prompts(out) == [(c, None) for c in captions]  # what PromptDataModule reads
    assert capsys.readouterr().out.splitlines()[0] == f"wrote 4 prompts to {out}"


def test_prompts_past_the_end_warn_and_write_all(data: dict, tmp_path: Path, capsys) -> None:
    coco = write_coco_like(tmp_path / "coco", data)
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--data", str(coco), "--num-samples", "30", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 5
    err = capsys.readouterr().err
    assert err == f"cm3leon fid: warning: --num-samples 30 but {coco} holds 5 distinct images; using 5\n"


def test_prompts_refuse_shards_without_source_images(data: dict, tmp_path: Path, capsys) -> None:
    """A training split keeps no jpg: ``prompts`` wrote its first captions (not grouped by image, so COCO's images
    came up to five times), and only ``score``, after the predict run, said that they cannot be scored."""
    from cm3leon_lightning.data.shards import Manifest, ShardSample, ShardWriter, read_shard

    manifest = Manifest.load(Path(data["val"]) / "manifest.json")
    base = [s for info in manifest.shards for s in read_shard(Path(data["val"]) / info.name, manifest)][:3]
    tok = tiny_tokenizer()
    text_info = {"path": data["tokenizer"], "sha256": tok.sha256, "n_text": tok.vocab_size, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 8, "grid_w": 8, "image_size": 16}
    train = tmp_path / "train"
    ShardWriter(train, text_info, image_info).write_all([ShardSample(s.key, s.caption, s.text, s.image) for s in base])
    out = tmp_path / "prompts.jsonl"
    shard = train / Manifest.load(train / "manifest.json").shards[0].name
    assert error_of(["prompts", "--data", str(train), "--num-samples", "3", "--out", str(out)], capsys) == (
        f"--data: {train} keeps no source images ({shard}: sample {base[0].key!r} has no "
        "jpg (only cm3leon prepare's validation split keeps the source images, keep_val_jpg)); FID compares the "
        "generated images with them"
    )
    assert not out.exists()


def test_prompts_refuse_an_existing_out_unless_overwrite(data: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "prompts.jsonl"
    out.write_text("mine\n")
    args = ["prompts", "--data", data["val"], "--num-samples", "3", "--out", str(out)]
    assert error_of(args, capsys) == f"--out: {out} already exists; give --overwrite to replace it"
    assert out.read_text() == "mine\n"
    assert main([*args, "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["prompts", "--data", data["val"], "--num-samples", "3", "--out", str(tmp_path / "p.txt")]) == 2
    assert "must end in .jsonl" in capsys.readouterr().err
    assert not (tmp_path / "p.txt").exists()


# ------------------------------------------------------------------------------------------------ score
def test_score_of_the_reference_images_is_zero_and_of_others_the_metrics_value(
    data: dict, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "r" / "fid.json"
    assert main(score_args(data, "--json", str(out))) == 0
    result = json.loads(out.read_text())
    assert result["fid"] == pytest.approx(0.0, abs=1e-4)
    assert (result["num_samples"], result["candidate"], result["feature"]) == (N, 0, EXTRACTOR)
    assert capsys.readouterr().out.splitlines() == [
        f"FID {result['fid']:.4f} ({EXTRACTOR} features): {N} generated images (files[0] in {data['generated']}) "
        f"vs {N} reference images of {data['val']} at 16x16",
        "reference statistics: computed",
    ]
    refused = error_of(score_args(data, "--candidate", "1", "--json", str(out)), capsys)  # before any work
    assert refused == f"--json: {out} already exists; give --overwrite to replace it"
    assert json.loads(out.read_text()) == result
    for size in (16, 12):  # 12: both sets go through fid_resize (bicubic + centre crop)
        args = score_args(data, "--candidate", "1", "--json", str(out), "--overwrite", "--batch-size", "5")
        args[args.index("--image-size") + 1] = str(size)
        assert main(args) == 0
        value = json.loads(out.read_text())["fid"]
        assert value > 0.1 and value == pytest.approx(expected_fid(data, 1, size), rel=1e-9)


def test_score_equals_fid_callback_and_shares_its_reference_cache(data: dict, tmp_path: Path, capsys) -> None:
    """FIDCallback (validate, its generation returning the candidate-1 images) logs the FID that `score` prints, and
    `score` loads the reference statistics the callback cached."""
    gen = Path(data["generated"])
    fake = [torch.from_numpy(np.array(Image.open(gen / f"{i:06d}-1.png"))).permute(2, 0, 1) for i in range(N)]

    class Given(FIDCallback):
        def generate(self, pl_module, captions, seed):  # seed = 7 + index of the batch's first caption
            return torch.stack([fid_resize(fake[seed - 7 + k], self.image_size) for k in range(len(captions))])

    cache = tmp_path / "cache"
    cb = Given(
        data=data["val"], num_samples=N, image_size=12, samples_per_prompt=1, clip_model=None,
        feature_extractor=TinyFeatures(), text_tokenizer=data["tokenizer"], vqgan=data["vqgan"], batch_size=5,
        seed=7, cache_dir=str(cache),
    )  # fmt: skip
    module = tiny_module(tiny_tokenizer())
    logged = trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)[0]["val/fid"]
    cached = reference_cache_file(cb)
    assert cached is not None and cached.is_file()
    out = tmp_path / "fid.json"
    args = score_args(data, "--candidate", "1", "--cache-dir", str(cache), "--json", str(out))
    args[args.index("--image-size") + 1] = "12"
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["reference_cache"] == str(cached) and result["reference_cache_loaded"] is True
    assert capsys.readouterr().out.splitlines()[-1] == f"reference statistics: loaded from {cached}"
    assert result["fid"] == pytest.approx(logged, rel=1e-5)


def test_score_caches_reference_statistics_and_reuses_them(data: dict, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    first = score_args(data, "--candidate", "1", "--cache-dir", str(cache), "--json", str(tmp_path / "a.json"))
    assert main(first) == 0
    files = list(cache.iterdir())
    assert len(files) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"reference statistics: computed, cached in {files[0]}"
    second = score_args(data, "--candidate", "1", "--cache-dir", str(cache), "--json", str(tmp_path / "b.json"))
    assert main(second) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"reference statistics: loaded from {files[0]}"
    a, b = (json.loads((tmp_path / n).read_text())["fid"] for n in ("a.json", "b.json"))
    assert a == pytest.approx(b, rel=1e-9)


# ------------------------------------------------------------------------------------------------ errors
def test_score_errors_name_the_file_and_index(data: dict, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_of(with_generated(score_args(data), empty), capsys) == (
        f"--generated: no predictions.jsonl in {empty} (the output_dir of a finished cm3leon predict run)"
    )
    rows = [json.loads(line) for line in (Path(data["generated"]) / "predictions.jsonl").read_text().splitlines()]
    short = copy_generated(data, tmp_path / "short", rows[:20])
    assert error_of(with_generated(score_args(data), short), capsys) == (
        f"{short / 'predictions.jsonl'} has no prediction for prompt 20 (it holds 20 lines; 24 are needed): finish "
        "the predict run (--trainer.callbacks.resume true), or lower --num-samples"
    )
    other = [dict(r) for r in rows]
    other[5]["prompt"] = "a purple hexagon"
    bad = copy_generated(data, tmp_path / "bad", other)
    assert error_of(with_generated(score_args(data), bad), capsys) == (
        f"{bad / 'predictions.jsonl'} line 6: prompt 5 is 'a purple hexagon' but reference caption 5 of {data['val']} "
        f"is {rows[5]['prompt']!r}: the predict run read another prompts file (write it with cm3leon fid prompts and "
        "the same --data)"
    )
    assert error_of(score_args(data, "--candidate", "2"), capsys) == (
        f"{Path(data['generated']) / 'predictions.jsonl'} line 1: prompt 0 has 2 image files, no files[2] "
        "(--candidate; a predict run with keep=K writes the best K only, and one without a VQGAN codes only)"
    )
    missing = [dict(r) for r in rows]
    missing[3]["files"] = ["gone.png"]
    gone = copy_generated(data, tmp_path / "gone", missing)
    assert error_of(with_generated(score_args(data), gone), capsys) == (
        f"{gone / 'predictions.jsonl'} line 4: prompt 3's image {Path(data['generated']) / 'gone.png'} is missing"
    )
    garbled = copy_generated(data, tmp_path / "garbled")
    with open(garbled / "predictions.jsonl", "a") as f:
        f.write('{"index": 3, "prompt": "x", "files": []}\n')
    assert error_of(with_generated(score_args(data), garbled), capsys) == (
        f"{garbled / 'predictions.jsonl'} lines 4 and 25 both hold prompt 3"
    )


def test_score_names_a_stopped_run_and_bad_output_paths_before_any_work(data: dict, tmp_path: Path, capsys) -> None:
    """A stopped predict run (part files only) was reported as no predict output at all; a --cache-dir or --json
    that could not be written failed after the whole computation, with an OSError naming no flag."""
    stopped = copy_generated(data, tmp_path / "stopped")
    (stopped / "predictions.jsonl").rename(stopped / "predictions.rank1.jsonl")
    assert error_of(with_generated(score_args(data), stopped), capsys) == (
        f"--generated: {stopped} holds predictions.rank1.jsonl but no predictions.jsonl: its cm3leon predict run "
        "stopped before it finished; run it again with --trainer.callbacks.resume true"
    )
    (tmp_path / "cache").write_text("a file")
    assert error_of(score_args(data, "--cache-dir", str(tmp_path / "cache")), capsys) == (
        f"--cache-dir: {tmp_path / 'cache'} is not a directory"
    )
    assert error_of(score_args(data, "--json", str(tmp_path)), capsys) == (
        f"--json: {tmp_path} is a directory; give the JSON file to write"
    )


def test_score_warns_about_generated_images_of_other_sizes(data: dict, tmp_path: Path, capsys) -> None:
    """Generated images of another size than --image-size (another VQGAN, two runs' images in one directory) were
    resized without a word."""
    gen = tmp_path / "gen"
    shutil.copytree(data["generated"], gen)
    with Image.open(gen / "000003-0.png") as image:
        image.resize((8, 8)).save(gen / "000003-0.png")
    assert main(with_generated(score_args(data), gen)) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cm3leon fid: warning: generated images of 8x8 ({gen / '000003-0.png'}) are not --image-size 16: resized to "
        "it as the reference images are (shorter side, then centre crop); they have 2 sizes: do they come from one run?"
    )
    args = score_args(data)
    args[args.index("--image-size") + 1] = "12"
    assert main(args) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cm3leon fid: warning: generated images of 16x16 ({Path(data['generated']) / '000000-0.png'}) are not "
        "--image-size 12: resized to it as the reference images are (shorter side, then centre crop)"
    )
    assert main(score_args(data)) == 0
    assert "generated images of" not in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_still_gives_the_fid(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    """A full disk while writing the reference statistics stopped the command after the reference set was embedded;
    the cache is only a shortcut: a warning says it is not written and the FID is printed."""

    def full_disk(path, stats):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fid_module, "save_real_stats", full_disk)
    out = tmp_path / "fid.json"
    assert main(score_args(data, "--cache-dir", str(tmp_path / "cache"), "--json", str(out))) == 0
    captured = capsys.readouterr()
    assert re.search(
        rf"cm3leon fid: warning: could not write the reference-statistics cache {tmp_path / 'cache'}/fid-ref-\w+\.pt "
        r"\(\[Errno 28\] No space left on device\); the FID does not need it\n$",
        captured.err,
    )
    assert captured.out.splitlines()[-1] == "reference statistics: computed"
    result = json.loads(out.read_text())
    assert result["reference_cache"] is None and result["fid"] == pytest.approx(0.0, abs=1e-4)


def test_score_errors_on_extractor_and_weights(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    args = score_args(data)
    args[args.index(EXTRACTOR)] = "support.eval_setup:NoSuchThing"
    assert error_of(args, capsys).startswith("--feature-extractor support.eval_setup:NoSuchThing: cannot import it")
    no_extractor = score_args(data)[:-4] + ["--device", "cpu"]  # Inception
    weights = tmp_path / "inception.pth"
    assert error_of([*no_extractor, "--feature-weights", str(weights)], capsys) == (
        f"--feature-weights: no Inception weights file at {weights}"
    )
    torch.save({"a": torch.zeros(1)}, weights)  # a file, not of Inception weights: was blamed on the network
    assert error_of([*no_extractor, "--feature-weights", str(weights)], capsys).startswith(
        f"--feature-weights: {weights} is not torch-fidelity's Inception weights file "
        "(weights-inception-2015-12-05-6726825d.pth): RuntimeError: Error(s) in loading state_dict"
    )

    def offline(*args, **kwargs):
        raise OSError("download failed: no network")

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", offline)
    assert error_of(no_extractor, capsys) == (
        "FID: could not load the Inception weights (OSError: download failed: no network). Without network access, "
        "download torch-fidelity's weights-inception-2015-12-05-6726825d.pth elsewhere and pass "
        "feature_weights_path=<file>, or pass feature_extractor=<nn.Module returning (N, d) features> (here: "
        "--feature-weights FILE or --feature-extractor module:Class)"
    )


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("sub", [[], ["prompts"], ["score"]])
def test_help_of_the_command_and_its_subcommands(sub: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cm3leon(["fid", *sub, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cm3leon fid {' '.join(sub)}".rstrip())
    expected = {(): "{prompts,score}", ("prompts",): "--overwrite", ("score",): "--feature-extractor MODULE:CLASS"}
    assert expected[tuple(sub)] in out


def test_python_m_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cm3leon_lightning", "fid", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: cm3leon fid") and "score" in done.stdout


def test_the_documented_pipeline_parses() -> None:
    """The module docstring's `cm3leon fid` lines (the README's pipeline) parse with the command's own flags."""
    import shlex

    from cm3leon_lightning.metrics import fid_cli

    text = (fid_cli.__doc__ or "").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("cm3leon fid ")]
    assert [line.split()[2] for line in lines] == ["prompts", "score"]
    for line in lines:
        args = fid_cli.build_parser().parse_args(shlex.split(line)[2:])
        assert args.num_samples == 30000 and args.data == "data/coco_val2014_shards"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_device_is_refused(data: dict, capsys) -> None:
    args = score_args(data)
    args[args.index("--device") + 1] = "cuda"
    assert error_of(args, capsys) == "--device cuda: no CUDA device is available"
