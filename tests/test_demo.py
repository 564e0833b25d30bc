"""``cm3leon demo`` at the miniature size: every output file and metric key exists, reruns are reused."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from cm3leon_lightning.demo import CONFIG_DIR, MARKER, SIZES, STAGES, Context, DemoSize, run, stage_key
from cm3leon_lightning.demo_cli import main

GEN_SPLITS = ("seen", "heldout")
GEN_METHODS = ("no_guidance", "cfg", "cd_k", "cfg_rerank", "cfg_mask", "chance")
ATTRS = {"all", "colour", "shape", "size", "position", "count"}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    parent = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(parent)  # a relative --out, as `make demo` gives: what the stages record must not depend on the cwd
    try:
        result = run("run", "mini", threads=1, verbose=False)
    finally:
        os.chdir(cwd)
    return parent / "run", result


def test_every_output_file_is_written(mini_run: tuple[Path, dict]) -> None:
    out, result = mini_run
    for name in ("samples.png", "metrics.json", "report.md", "demo.json"):
        assert (out / name).is_file(), name
    assert Path(result["samples"]) == out / "samples.png"
    for stage in STAGES:
        assert (out / stage / "stage.json").is_file(), stage
    assert (out / "vqgan" / "model" / "config.json").is_file()
    assert (out / "clip" / "clip.safetensors").is_file()
    assert (out / "prepare" / "train" / "manifest.json").is_file()
    assert (out / "prepare" / "val" / "manifest.json").is_file()
    assert (out / "train" / "cm3leon.ckpt").is_file()
    grid = Image.open(out / "samples.png")
    assert grid.width > 5 * 96 and grid.height > 96  # five image columns of 3x-upscaled 32px images, with text
    assert json.loads((out / "demo.json").read_text())["seed"] == 0


def test_train_logs_stay_in_the_run_directory(mini_run: tuple[Path, dict]) -> None:
    """The experiment's CSVLogger names runs/demo/train in the YAML; the demo points it at the run's train stage."""
    out, _ = mini_run
    versions = sorted(p.name for p in (out / "train" / "logs").iterdir())
    assert versions == ["version_0"] and (out / "train" / "logs" / "version_0" / "hparams.yaml").is_file()
    assert not (out.parent / "runs").exists()  # nothing under the working directory the demo ran in


def test_every_metric_key_is_present(mini_run: tuple[Path, dict]) -> None:
    out, _ = mini_run
    m = json.loads((out / "metrics.json").read_text())
    gen = m["evaluate"]["generation"]
    for split in GEN_SPLITS:
        assert gen[split]["prompts"] == 3 and gen[split]["samples_per_prompt"] == 2
        for method in GEN_METHODS:
            assert set(gen[split][method]) == ATTRS, (split, method)
            assert all(0.0 <= v <= 1.0 for v in gen[split][method].values())
    for split in ("validation", "heldout"):
        cap = m["evaluate"]["captioning"][split]
        assert cap["images"] == 4
        assert {"colour_and_shape", "colour", "shape", "cider"} <= set(cap)
        assert {"colour_and_shape", "colour", "shape", "cider"} <= set(cap["chance"])
    loss = m["evaluate"]["retrieval_loss"]
    for k in ("with_retrieval", "without_retrieval"):
        assert set(loss[k]) == {"all", "text", "image"} and loss[k]["all"] > 0
    fid = m["evaluate"]["fid"]
    assert "CLIP image tower" in fid["feature_extractor"]
    assert {"no_guidance", "cfg", "cd_k", "reference_renders", "reference_vqgan_reconstructions"} <= set(fid)
    assert set(m["vqgan"]["reconstruction"]) == {"renders", "reconstructions", "l1", "n"}
    assert m["vqgan"]["reconstruction"]["renders"]["all"] == 1.0  # the checker on clean renders
    assert m["train"]["steps"] == 2
    assert len(m["targets"]) == 6 and all(isinstance(t["met"], bool) for t in m["targets"])
    assert set(m["seconds"]) == set(STAGES) - {"report"}


def test_report_states_targets_and_chance(mini_run: tuple[Path, dict]) -> None:
    out, _ = mini_run
    text = (out / "report.md").read_text()
    for needle in ("## Targets", "chance", "CIDEr-D", "with retrieval", "without retrieval", "FID", "samples.png"):
        assert needle in text, needle


def test_rerun_reuses_every_stage_and_fresh_refuses_foreign_dirs(
    mini_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, _ = mini_run
    before = {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}
    main(["--out", str(out), "--size", "mini", "--threads", "1"])
    assert "running" not in capsys.readouterr().out
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES} == before
    foreign = tmp_path / "not_a_demo"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"--fresh: .* \(not a demo run\); refusing"):
        run(foreign, "mini", fresh=True, verbose=False)
    assert (foreign / "precious.txt").is_file()


def test_a_foreign_directory_is_never_written_into(tmp_path: Path) -> None:
    """Without --fresh too: the data stage would empty a user's own data/ subdirectory before writing its pairs."""
    foreign = tmp_path / "project"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="--out: .* holds no demo.json"):
        run(foreign, "mini", verbose=False)
    assert (foreign / "data" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["data"]  # no demo.json written either
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--out: .* is a file"):
        run(a_file, "mini", verbose=False)


def test_the_command_names_a_foreign_out_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path), "--size", "mini", "--threads", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cm3leon demo: error: --out: ") and "holds no demo.json" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_cut_short_marker_reruns_its_stage(mini_run: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    """A stage.json cut short (the process killed while writing it) makes that stage rerun, not crash the rerun."""
    out, _ = mini_run
    marker = out / "report" / MARKER
    good = json.loads(marker.read_text())
    marker.write_text(marker.read_text()[:20])
    main(["--out", str(out), "--size", "mini", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "running" in line]
    assert len(lines) == 1 and "report" in lines[0]
    assert json.loads(marker.read_text())["hash"] == good["hash"]
    assert not list((out / "report").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("argv", "flag"), [(["--threads", "0"], "--threads"), (["--train-steps", "-1"], "--train-steps"),
                       (["--threads", "two"], "--threads"), (["--seed", "-1"], "--seed")],
)  # fmt: skip
def test_bad_flags_are_named(argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--train-steps -1 would be Lightning's 'no step limit' (max_epochs 1000); --threads 0 silently all cores."""
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), "--size", "mini", *argv])
    low = 0 if flag == "--seed" else 1  # a negative seed failed inside the data stage and left demo.json behind
    assert e.value.code == 2 and f"argument {flag}: expected an integer >= {low}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--threads must be an integer >= 1, got 0"):
        run(tmp_path / "run", "mini", threads=0, verbose=False)


def test_a_seed_the_fits_refuse_is_named_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--seed 4294967296 ran the data and tokenizer stages, then failed in the vqgan stage with a traceback from
    Lightning's seed_everything ("4294967296 is not in bounds") that named no flag."""
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), "--size", "mini", "--seed", "4294967296"])
    message = "argument --seed: expected an integer <= 4294967295 (what Lightning's seed_everything takes), got "
    assert e.value.code == 2 and f"{message}'4294967296'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=re.escape("--seed must be an integer in [0, 4294967295], got 4294967296")):
        run(tmp_path / "run", "mini", seed=2**32, threads=1, verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("eval_prompts", 0), ("n_train", -5), ("train_steps", 0), ("val_fraction", 1.0)]
)
def test_demo_size_rejects_sizes_no_stage_can_run(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"DemoSize.{field} must"):
        DemoSize(**{field: value})


def test_data_stage_follows_the_shapes_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data stage writes what data/shapes.py draws and renders: a change there must rerun it (and what follows)."""
    import cm3leon_lightning.demo as demo

    ctx = Context(out=tmp_path, size=SIZES["mini"], configs=CONFIG_DIR)
    before = stage_key(ctx, "data")
    real = demo.file_hash
    monkeypatch.setattr(demo, "file_hash", lambda p: "edited" if Path(p).name == "shapes.py" else real(p))
    assert stage_key(ctx, "data") != before


def test_chance_is_other_prompts_scenes_and_none_without_any() -> None:
    """Chance: every render against the scenes of other prompts; with one prompt there is none (not its own scene)."""
    import numpy as np

    from cm3leon_lightning.data.shapes import generate_pairs
    from cm3leon_lightning.demo_eval import ATTRIBUTES, attribute_scores, chance_scores

    pairs = list(generate_pairs(3, "train", 32, seed=3))
    images, scenes = np.stack([p.image for p in pairs]), [p.scene for p in pairs]
    assert chance_scores(images[:1], scenes[:1]) == {a: None for a in ATTRIBUTES}
    assert chance_scores(images[:2], scenes[:2]) == attribute_scores(images[:2], [scenes[1], scenes[0]])
    one = attribute_scores(images, [scenes[1], scenes[2], scenes[0]])
    two = attribute_scores(images, [scenes[2], scenes[0], scenes[1]])
    assert chance_scores(images, scenes) == pytest.approx({a: (one[a] + two[a]) / 2 for a in ATTRIBUTES})


def test_decoding_sweep_example_scores_every_setting(mini_run: tuple[Path, dict], capsys, monkeypatch) -> None:
    """examples/demo_decoding_sweep.py runs on a finished run and prints one line per (CFG, top-p) setting."""
    import runpy

    out, _ = mini_run
    script = Path(__file__).resolve().parents[1] / "examples" / "demo_decoding_sweep.py"
    argv = [str(script), str(out), "--prompts", "2", "--samples", "1", "--cfg", "1.0", "2.0", "--top-p", "0.6"]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cfg ")]
    assert [line.split()[1] for line in lines] == ["1.0", "2.0"]
    assert all(line.split()[4] == "all" and 0.0 <= float(line.split()[5]) <= 1.0 for line in lines)
    sweep = runpy.run_path(str(script))["main"]
    results = sweep([str(out), "--prompts", "2", "--samples", "1", "--cfg", "1.0", "--top-p", "0.6"])
    assert list(results) == [(1.0, 0.6)] and f"{results[(1.0, 0.6)]['all']:.3f}" == lines[0].split()[5]


@pytest.mark.parametrize(
    ("args", "message"), [(["--seed", "1"], "--seed 1: the run's training pairs use seed 0 and its report's prompts "
                           "seed 1"), (["--seed", "0"], "--seed 0"), (["--prompts", "0"], "argument --prompts")],
)  # fmt: skip
def test_decoding_sweep_refuses_the_runs_own_prompts(
    mini_run: tuple[Path, dict], args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    """The sweep promises prompts apart from the report's and the training pairs: their seeds are refused."""
    import runpy

    out, _ = mini_run
    sweep = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "demo_decoding_sweep.py"))["main"]
    with pytest.raises(SystemExit) as e:
        sweep([str(out), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_decoding_sweep_names_an_unfinished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import runpy

    sweep = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "demo_decoding_sweep.py"))["main"]
    with pytest.raises(SystemExit):
        sweep([str(tmp_path)])
    assert "tokenizer/stage.json not found: run `make demo`" in capsys.readouterr().err


def test_sft_example_fine_tunes_the_demo_checkpoint(mini_run: tuple[Path, dict], tmp_path: Path) -> None:
    """examples/sft_shapes.py on the miniature run: SFT data balanced, a fit from the demo's weights, both scored."""
    import runpy

    import torch

    from cm3leon_lightning.data.sft import balanced_counts

    script = Path(__file__).resolve().parents[1] / "examples" / "sft_shapes.py"
    example_main = runpy.run_path(str(script))["main"]
    out, _ = mini_run
    args = [str(out), "--out", str(tmp_path), "--pairs", "30", "--steps", "2", "--warmup", "1", "--eval", "3"]
    report = example_main([*args, "--fit-arg=--data.init_args.batch_size=2"])
    lines = report["sft_lines"]
    assert lines["captions"] == 30 and lines["vqa"] % 4 == 0 and lines["vqa"] > 0
    assert lines["edits"] == lines["vqa"] // 4  # one recolouring per one-shape scene
    sizes = {"caption": lines["captions"], "vqa": lines["vqa"], "edit": lines["edits"]}
    drawn = balanced_counts(sizes)
    assert report["mixture"] == {k: {"examples": n, "drawn": drawn[k]} for k, n in sorted(sizes.items())}
    assert report["steps"] == 2
    for when in ("edits_before", "edits_after"):
        assert {"edited", "unedited_source", "target_reconstruction"} <= set(report[when])
        assert report[when]["unedited_source"]["colour"] == 0.0  # the source never has the colour asked for
    for when in ("before", "after"):
        for split in ("seen", "heldout"):
            r = report[when][f"{split}/image_first"]
            assert {"vqa_all", "vqa_colour", "caption", "caption_instructed"} <= set(r)
            assert len(r["examples"]["colour"]) == 3
    first = torch.load(out / "train" / "cm3leon.ckpt", weights_only=True)["state_dict"]
    tuned = torch.load(tmp_path / "train" / "sft.ckpt", weights_only=True)["state_dict"]
    assert first.keys() == tuned.keys() and any(not torch.equal(first[k], tuned[k]) for k in first)


def test_serve_example_queries_the_demo_model_over_http(mini_run: tuple[Path, dict], tmp_path: Path) -> None:
    """examples/serve_shapes.py on the miniature run: two real servers, every way of asking judged and timed."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "examples" / "serve_shapes.py"
    example_main = runpy.run_path(str(script))["main"]
    out, result = mini_run
    report = example_main([str(out), "--out", str(tmp_path), "--requests", "3", "--max-batch-size", "3"])
    k = json.loads((out / "train" / "stage.json").read_text())["result"]["max_retrieved"]
    assert report["requests"] == 3 and report["retrieved_documents"] == k
    ways = ("prompt", "retrieve", "rerank") if k else ("prompt", "rerank")
    for way in ways:
        assert set(report[way]) == {"seconds", "retrieved_example", *ATTRS}
        assert all(0.0 <= report[way][a] <= 1.0 for a in ATTRS) and report[way]["seconds"] > 0
    if k:
        assert len(report["retrieve"]["retrieved_example"]) == k  # bank keys of the training documents placed first
    assert report["prompt"]["retrieved_example"] == [] and report["prompt_one_at_a_time_seconds"] > 0
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    side = 3 * json.loads((out / "vqgan" / "model" / "config.json").read_text())["config"]["resolution"]  # 3x
    assert Image.open(tmp_path / "grid.png").size == (3 * side, len(ways) * side)  # a row of 3 images per way
    # the server read the exported model directory, whose tokenizers are the demo's
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer", "vqgan",
    ]  # fmt: skip


def test_stage_results_name_the_missing_stage(mini_run: tuple[Path, dict], tmp_path: Path) -> None:
    """The examples read a finished run's stage results; an unfinished run names its marker and the command."""
    from cm3leon_lightning.demo_report import stage_results

    out, _ = mini_run
    results = stage_results(out, ("clip", "train"))
    assert set(results) == {"clip", "train"} and results["clip"]["model"] == "cm3leon-clip-tiny"
    # the run was made with a relative --out from another working directory: its recorded paths still hold
    assert Path(results["train"]["checkpoint"]) == out / "train" / "cm3leon.ckpt"
    assert Path(results["train"]["checkpoint"]).is_file()
    with pytest.raises(FileNotFoundError, match=r"tokenizer/stage.json not found: run `make demo`"):
        stage_results(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "stage.json").write_text('{"hash": "ab')  # killed while writing (older runs)
    with pytest.raises(FileNotFoundError, match=r"tokenizer/stage.json is unreadable .* cut short\? run `make demo`"):
        stage_results(tmp_path)


def test_a_deleted_report_file_is_written_again(mini_run: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    """A stage whose recorded outputs are gone reruns: the demo said 'finished: report.md' with no report.md."""
    out, _ = mini_run
    (out / "report.md").unlink()
    assert main(["--out", str(out), "--size", "mini", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "running" in line]
    assert len(lines) == 1 and "report" in lines[0]
    assert (out / "report.md").read_text().startswith("# CM3Leon demo report")


def test_a_run_of_other_data_is_refused_not_replaced(
    mini_run: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    """`cm3leon demo --size mini` after `make demo` (same default --out) would have redone every stage over it."""
    import cm3leon_lightning.demo as demo

    out, _ = mini_run
    before = {p: p.stat().st_mtime_ns for p in [out / "demo.json", *(out / s / MARKER for s in STAGES)]}
    assert main(["--out", str(out), "--size", "mini", "--seed", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    head = f"cm3leon demo: error: --out: {out} holds a demo run of other data (size 'mini', seed 0; asked for: size"
    assert err.startswith(f"{head} 'mini', seed 1;") and "Pass --fresh" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in before} == before
    steps = Context(out=out, size=replace(SIZES["mini"], train_steps=3), configs=CONFIG_DIR)
    demo.refuse_other_run(steps, "custom")  # more training steps reuse the run's data: no refusal


def test_a_failed_rerun_leaves_no_report_of_the_replaced_stages(
    mini_run: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage reruns and fails: report.md, metrics.json and samples.png of the stages it replaced must not stay."""
    import shutil

    import cm3leon_lightning.demo as demo

    out, _ = mini_run
    shutil.copytree(out / "evaluate", tmp_path / "evaluate")
    (out / "evaluate" / MARKER).write_text("{")  # cut short: the evaluate stage reruns

    def broken(ctx: Context, directory: Path) -> dict:
        raise RuntimeError("evaluation failed")

    monkeypatch.setitem(demo.STAGE_FUNCS, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(out, "mini", threads=1, verbose=False)
    report_files = ("samples.png", "metrics.json", "report.md")
    assert [f for f in report_files if (out / f).exists()] == []
    monkeypatch.undo()
    shutil.rmtree(out / "evaluate")
    shutil.copytree(tmp_path / "evaluate", out / "evaluate")
    run(out, "mini", threads=1, verbose=False)  # the report stage alone writes them again
    assert all((out / f).is_file() for f in report_files)


def test_fid_references_have_as_many_images_as_each_method(mini_run: tuple[Path, dict]) -> None:
    """FID shrinks as a set grows (same distribution: 0.17 with 40 images, 0.036 with 320): the reference rows had
    one render per prompt against samples_per_prompt generated images per prompt."""
    import numpy as np

    from cm3leon_lightning.data.shapes import check_image, generate_pairs

    out, _ = mini_run
    fid = json.loads((out / "metrics.json").read_text())["evaluate"]["fid"]
    assert fid["reference_images"] == fid["generated_images"] == 3 * 2
    assert "and 6 renders of the same prompts' scenes for the references" in (out / "report.md").read_text()
    from cm3leon_lightning.demo_eval import scene_renders

    scenes = [p.scene for p in generate_pairs(2, "train", 32, seed=5)]
    renders = scene_renders(scenes, 3, 32, seed=1)
    assert renders.shape == (6, 32, 32, 3) and renders.dtype == np.uint8
    assert [check_image(r, scenes[i // 3])["all"] for i, r in enumerate(renders)] == [True] * 6
    assert np.array_equal(renders, scene_renders(scenes, 3, 32, seed=1)) and len({r.tobytes() for r in renders}) > 2


def _fake_stages(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Stages that write one file naming how many times they ran, and record what they read upstream."""
    import cm3leon_lightning.demo as demo

    def stage(name: str):
        def func(ctx: Context, directory: Path) -> dict:
            calls.append(name)
            path = directory / "out.txt"
            read = [Path(ctx.results[d]["path"]).read_text() for d in demo.DEPENDS[name]]
            path.write_text(f"{name} run {calls.count(name)} from {read}")
            return {"path": str(path)}

        return func

    for name in STAGES:
        monkeypatch.setitem(demo.STAGE_FUNCS, name, stage(name))


def _run_stages(out: Path, names: tuple[str, ...] = STAGES) -> Context:
    from cm3leon_lightning.demo import run_stage

    ctx = Context(out=out, size=SIZES["mini"], configs=CONFIG_DIR, verbose=False)
    for name in names:
        run_stage(ctx, name)
    return ctx


def test_a_stage_run_again_reruns_the_stages_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its hash is unchanged but its outputs are new (a VQGAN trained again on other threads gives other codes): the
    prepared shards, the model and the report made from the old ones were kept, and the report described them."""
    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    _run_stages(tmp_path)
    assert calls == list(STAGES)
    (tmp_path / "train" / "out.txt").unlink()  # the checkpoint deleted: train runs again
    ctx = _run_stages(tmp_path)
    assert calls[len(STAGES) :] == ["train", "evaluate", "report"]
    assert Path(ctx.results["evaluate"]["path"]).read_text().startswith("evaluate run 2 from ['train run 2 from ")
    _run_stages(tmp_path)  # and then every stage is reused
    assert len(calls) == len(STAGES) + 3
    for name in STAGES:  # markers of runs made before they recorded the runs they read: the newer marker decides
        marker = tmp_path / name / MARKER
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "upstream"}))
        os.utime(marker, ns=(10**18, 10**18 + STAGES.index(name)))
    _run_stages(tmp_path)
    assert len(calls) == len(STAGES) + 3
    (tmp_path / "train" / "out.txt").unlink()
    _run_stages(tmp_path)
    assert calls[len(STAGES) + 3 :] == ["train", "evaluate", "report"]


def test_a_copied_run_never_reads_the_originals_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp -r runs/demo runs/exp`: the copy's markers name runs/demo's files; a rerun of runs/demo (--fresh --seed 1)
    would have changed what runs/exp trains and reports on. The copy's stages run again in the copy."""
    import shutil

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    _run_stages(tmp_path / "original", ("data", "tokenizer"))
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    ctx = _run_stages(tmp_path / "copy", ("data", "tokenizer"))
    assert calls == ["data", "tokenizer", "data", "tokenizer"]
    assert ctx.results["tokenizer"]["path"] == str(tmp_path / "copy" / "tokenizer" / "out.txt")


def test_a_foreign_demo_json_is_not_a_demo_run(tmp_path: Path) -> None:
    """Any file named demo.json made a directory a demo run: `--fresh` deleted a web project holding one."""
    project = tmp_path / "webapp"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.js").write_text("keep me")
    (project / "demo.json").write_text('{"name": "my-app", "version": "1.0.0"}')
    for fresh, flag in ((True, "--fresh"), (False, "--out")):
        with pytest.raises(ValueError, match=f"{flag}: .* holds no demo.json of cm3leon demo"):
            run(project, "mini", fresh=fresh, verbose=False)
    assert (project / "src" / "app.js").read_text() == "keep me"
    assert sorted(p.name for p in project.iterdir()) == ["demo.json", "src"]
    old = tmp_path / "old_run"  # the demo.json of runs made before the seed was recorded is still a run's
    old.mkdir()
    (old / "demo.json").write_text('{"size": "mini", "argv": []}')
    (old / "data").mkdir()
    from cm3leon_lightning.demo import prepare_out

    prepare_out(old, fresh=True, size="mini")
    assert sorted(p.name for p in old.iterdir()) == ["demo.json"]


def test_threads_default_to_the_cpus_this_process_may_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch job given 1 of 8 cores ran 8 threads (and a second process beside them) on it."""
    import torch

    threads: list[int] = []

    class Stop(Exception):
        pass

    def record(n: int) -> None:
        threads.append(n)
        raise Stop

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", record)
    with pytest.raises(Stop):
        run(tmp_path / "run", "mini", verbose=False)
    assert threads == [1] and not (tmp_path / "run").exists()


def test_a_refused_fit_config_names_the_stage_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """cm3leon fit's own error names the bad key only (and exits): the demo names the stage and the YAML file."""
    import shutil

    import cm3leon_lightning.demo as demo
    from cm3leon_lightning.demo import run_stage

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    yaml_file = configs / "demo" / "vqgan.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("max_steps:", "max_stepz:", 1))
    monkeypatch.setitem(demo.STAGE_FUNCS, "data", lambda ctx, directory: {"train": str(directory)})
    ctx = Context(out=tmp_path / "run", size=SIZES["mini"], configs=configs, verbose=False)
    run_stage(ctx, "data")  # the fit refuses its config before it reads any image
    message = f"the vqgan stage failed: cm3leon fit exited with status 2 (its error is above) on {yaml_file}"
    with pytest.raises(RuntimeError, match=re.escape(message) + "$"):
        run_stage(ctx, "vqgan")
    assert "max_stepz" in capsys.readouterr().err
    assert not (ctx.stage_dir("vqgan") / MARKER).exists()

    def missing(ctx: Context, directory: Path) -> dict:
        raise FileNotFoundError("captions.txt")

    monkeypatch.setitem(demo.STAGE_FUNCS, "tokenizer", missing)
    with pytest.raises(FileNotFoundError) as error:
        run_stage(ctx, "tokenizer")
    if sys.version_info >= (3, 11):  # exception notes
        notes = [f"cm3leon demo: the tokenizer stage failed (its partial output: {ctx.stage_dir('tokenizer')})"]
        assert error.value.__notes__ == notes


def _sigterm(ctx: Context, directory: Path) -> dict:
    """A stage stopped by SIGTERM as Lightning stops a fit: its SIGTERMException, a SystemExit with no code."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raise SIGTERMException


def _ctrl_c(ctx: Context, directory: Path) -> dict:
    """A stage stopped by Ctrl-C as Lightning stops a fit: ``sys.exit(1)`` while handling the KeyboardInterrupt."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


@pytest.mark.parametrize(("stage", "how", "status"), [(_sigterm, "SIGTERM", 143), (_ctrl_c, "Ctrl-C", 130)])
def test_a_stopped_run_says_so_and_fails(
    stage: object, how: str, status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`kill PID` during a fit exited with status 0 and no word (no report written); Ctrl-C blamed the stage's config
    file ("cm3leon fit exited with status 1 ... on configs/demo/vqgan.yaml"). Both now say where the run stopped."""
    import cm3leon_lightning.demo as demo

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    monkeypatch.setitem(demo.STAGE_FUNCS, "tokenizer", stage)
    assert main(["--out", str(tmp_path / "run"), "--size", "mini", "--threads", "1", "--quiet"]) == status
    message = (f"cm3leon demo: stopped by {how} in the tokenizer stage; the finished stages are kept: rerun the same "
               "command to resume\n")  # fmt: skip
    assert capsys.readouterr().err == message and calls == ["data"]
    assert (tmp_path / "run" / "data" / MARKER).is_file() and not (tmp_path / "run" / "tokenizer" / MARKER).exists()


def test_an_out_that_cannot_be_made_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An --out below a file was a NotADirectoryError traceback naming neither the flag nor the file."""
    (tmp_path / "file.txt").write_text("mine")
    assert main(["--out", str(tmp_path / "file.txt" / "run"), "--size", "mini", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"cm3leon demo: error: --out: cannot create {tmp_path / 'file.txt' / 'run'}: Not a directory\n"
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_a_background_stage_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """The CLIP stage's process outlived a demo killed outright (SIGKILL) and raced the rerun for its files; a child
    that calls exit_with_parent ends within seconds of its parent."""
    import signal
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, os, sys, time\n"
        "from cm3leon_lightning.demo import exit_with_parent\n"
        "def child(path):\n"
        "    exit_with_parent()\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    mp.get_context('spawn').Process(target=child, args=(sys.argv[1],)).start()\n"
        "    time.sleep(120)\n"
    )
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and _alive(child):
            time.sleep(0.1)
        alive = _alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, reaped by nobody after its parent died, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# `cm3leon demo` whose tokenizer stage (no fit: Lightning's handler is not installed) receives SIGTERM.
SIGTERM_OUTSIDE_A_FIT = """import os, signal, sys, time
import cm3leon_lightning.demo as demo
from cm3leon_lightning.demo_cli import main
def data(ctx, directory):
    return {"path": str(directory)}
def tokenizer(ctx, directory):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
demo.STAGE_FUNCS.update(data=data, tokenizer=tokenizer)
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_outside_a_fit_says_where_it_stopped(tmp_path: Path) -> None:
    """`kill PID` in a stage that runs no fit (data, tokenizer, prepare, evaluate) ended the process at once, with no
    word (the README promises one line naming the stage, as Ctrl-C gives)."""
    import subprocess

    out = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGTERM_OUTSIDE_A_FIT, "--out", str(out), "--size", "mini", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    message = ("cm3leon demo: stopped by SIGTERM in the tokenizer stage; the finished stages are kept: rerun the same "
               "command to resume\n")  # fmt: skip
    assert (done.returncode, done.stderr) == (143, message)
    assert (out / "data" / MARKER).is_file() and not (out / "tokenizer" / MARKER).exists()


def test_train_steps_keep_the_size_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--train-steps recorded the run as size 'custom' in demo.json, and the refusal of another size then said the
    directory held a 'custom' run (the user never asked for one) instead of naming its size."""
    import signal

    calls: list[str] = []
    _fake_stages(monkeypatch, calls)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["--out", str(out), "--size", "mini", "--threads", "1", "--train-steps", "3", "--quiet"]) == 0
    assert signal.getsignal(signal.SIGTERM) == handler  # main()'s own SIGTERM handler is gone after it
    assert json.loads((out / "demo.json").read_text())["size"] == "mini" and calls == list(STAGES)
    assert main(["--out", str(out), "--threads", "1", "--train-steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cm3leon demo: error: --out: {out} holds a demo run of other data (size 'mini', seed 0; "
                          "asked for: size 'default', seed 0;")  # fmt: skip
    with pytest.raises(ValueError, match="--train-steps must be an integer >= 1, got 0"):
        run(out, "mini", threads=1, verbose=False, train_steps=0)
