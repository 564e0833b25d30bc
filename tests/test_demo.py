"""``cm3leon demo`` at the miniature size: every output file and metric key exists, reruns are reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cm3leon_lightning.demo import STAGES, main, run

GEN_SPLITS = ("seen", "heldout")
GEN_METHODS = ("no_guidance", "cfg", "cd_k", "cfg_rerank", "cfg_mask", "chance")
ATTRS = {"all", "colour", "shape", "size", "position", "count"}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run(out, "mini", threads=1, verbose=False)
    return out, result


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
    with pytest.raises(ValueError, match="refusing to delete"):
        run(foreign, "mini", fresh=True, verbose=False)
    assert (foreign / "precious.txt").is_file()


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
    assert Path(results["train"]["checkpoint"]).is_file()
    with pytest.raises(FileNotFoundError, match=r"tokenizer/stage.json not found: run `make demo`"):
        stage_results(tmp_path)
