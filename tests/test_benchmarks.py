"""The decoding benchmarks run on a tiny model and report what they promise (their timings are not tested)."""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_generation_benchmark_rows_and_equal_codes_across_attention(tmp_path):
    """Every (attention, images) row is written, and FlexAttention decodes the very codes SDPA does."""
    args = ["--device", "cpu", "--presets", "tiny", "--image-tokens", "4", "--reference-tokens", "2"]
    stdout = run("generation.py", *args, "--attention", "sdpa,flex", "--json", "g.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [(r["mode"], r["attention"], r["images"]) for r in rows] == [
        ("eager", "sdpa", 1), ("eager", "sdpa", 8), ("eager", "flex", 1), ("eager", "flex", 8), ("reference", "sdpa", 1)
    ]  # fmt: skip
    assert all(r["same_codes"] == 1.0 for r in rows[:4])
    assert all(r["seconds"] > 0 and r["tokens"] == (2 if r["mode"] == "reference" else 4) for r in rows)
    assert "wrote g.json" in stdout


def test_a_failing_mode_is_recorded_and_the_rows_after_it_still_run(tmp_path):
    """A mode that raises (here the fused step on a CPU without Triton's interpreter) becomes a FAILED row naming the
    error, and the modes and reference after it are still measured; the JSON holds every row and the run exits
    non-zero naming the failed rows."""
    args = ["--device", "cpu", "--presets", "tiny", "--image-tokens", "4", "--reference-tokens", "2", "--candidates",
            "2", "--modes", "fused,eager", "--json", "g.json"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.returncode == 1 and "2 rows failed (marked FAILED above): fused, fused" in out.stderr, out.stderr[-2000:]
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [(r["mode"], r["images"], "error" in r) for r in rows] == [
        ("fused", 1, True), ("fused", 2, True), ("eager", 1, False), ("eager", 2, False), ("reference", 1, False)
    ]  # fmt: skip
    assert rows[0]["error"].startswith("ValueError: compile='fused'") and "TRITON_INTERPRET=1" in rows[0]["error"]
    assert all(r["seconds"] > 0 for r in rows[2:])
    assert out.stdout.count(" FAILED ValueError: compile='fused'") == 2


def test_generation_benchmark_runs_the_fused_modes_once_per_set_of_launch_options(tmp_path):
    """Under Triton's interpreter (the fused kernels on CPU): one row per option set, named by it, each decoding the
    eager codes; an unknown option is refused naming the flag."""
    pytest.importorskip("triton")
    args = ["--device", "cpu", "--presets", "tiny", "--image-tokens", "4", "--reference-tokens", "0"]
    args += ["--candidates", "2", "--modes", "eager,fused", "--json", "g.json"]
    env = {"TRITON_INTERPRET": "1"}
    run("generation.py", *args, "--fused-options", "base,pdl+prefetch", cwd=tmp_path, env=env)
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [(r["mode"], r["images"]) for r in rows] == [
        ("eager", 1), ("eager", 2), ("fused[base]", 1), ("fused[base]", 2), ("fused[pdl+prefetch]", 1),
        ("fused[pdl+prefetch]", 2)
    ]  # fmt: skip
    assert all(r["same_codes"] == 1.0 for r in rows)
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generation.py"), *args, "--fused-options", "base,graphs"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--fused-options: fused options: unknown ['graphs']" in bad.stderr


def test_decode_profile_names_the_ops_of_a_step(tmp_path):
    args = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--image-tokens",
        "16",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rows",
        "200",
    ]
    stdout = run("decode_profile.py", *args, "--modes", "eager", "--out", "prof", cwd=tmp_path)
    table = (tmp_path / "prof" / "eager-sdpa.txt").read_text()
    assert table.startswith("== eager / sdpa:") and "ms per step (2 streams, 2 layers)" in table
    assert "aten::mm" in table and "aten::index_put_" in table  # the matmuls and the KV-cache writes
    assert table.strip() in stdout


def test_decode_floor_times_every_piece_and_the_real_step(tmp_path):
    args = ["--device", "cpu", "--preset", "tiny", "--image-tokens", "16", "--steps", "2", "--candidates", "2"]
    stdout = run("decode_floor.py", *args, "--json", "floor.json", cwd=tmp_path)
    data = json.loads((tmp_path / "floor.json").read_text())
    pieces = ["bound", "gemms", "+pointwise", "+cache", "+sdpa", "step eager / sdpa"]
    assert [(r["piece"], r["rows"]) for r in data["results"]] == [(p, n) for n in (2, 4) for p in pieces]
    assert all(r["ms_per_step"] > 0 for r in data["results"])
    for r in data["results"]:  # 16 tokens an image; at 4 rows the decode is of 2 images (it said s/image for both)
        assert r["seconds"] == pytest.approx(r["ms_per_step"] * 16 / 1e3, rel=1e-12)
        assert r["sec_per_image"] == pytest.approx(r["seconds"] / (r["rows"] // 2), rel=1e-12)
    assert "ms/step   s total   s/image" in stdout
    assert data["meta"]["slots"] == 64 and data["meta"]["dtype"] == "torch.float32"
    assert "wrote floor.json" in stdout


def test_decode_floor_attention_pieces_compute_the_same_attention():
    """The +sdpa and +flex pieces are the same computation, so their timings compare like for like."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode_floor
        from generation import build
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model, vocab = build("tiny", 16, "cpu", torch.float32)
    for block in model.blocks:  # the model zero-initialises its output layers: give attention a visible effect
        torch.nn.init.normal_(block.attn.out_proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.fc_out.weight, std=0.05)
    outs = {}
    for stage in decode_floor.STAGES:
        torch.manual_seed(0)
        with torch.no_grad():
            outs[stage] = decode_floor.piece(model, stage, rows=3, slots=64, lo=vocab.n_text, hi=vocab.size)()
        assert outs[stage].shape == (3, 1, vocab.size - vocab.n_text)
    torch.testing.assert_close(outs["+flex"], outs["+sdpa"])
    assert not torch.allclose(outs["+sdpa"], outs["+cache"])  # attention over the written cache changes the result


def test_fused_linear_benchmark_checks_and_times_every_launch_and_configuration(tmp_path):
    """Under Triton's interpreter (tiny preset, float32): each launch of a fused step under the chosen
    configurations (one whole-K, one split-K where the shape allows it), each checked against torch, beside cuBLAS
    and the bandwidth bound; chained over two copies of each weight (``--prefetch`` is a no-op on a CPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--preset", "tiny", "--rows", "3", "--head", "256", "--steps", "1", "--chain", "2",
            "--configs", "0,6", "--prefetch", "--json", "fl.json"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fused_linear.py"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "fl.json").read_text())["results"]
    whole, split = "block_n=16/block_k=128", "block_n=16/block_k=128/split_k=2"
    expected = []
    for launch, n, k in (("qkv", 192, 64), ("out", 64, 64), ("up", 256, 64), ("down", 64, 256), ("head", 256, 64)):
        configs = [whole, split] if k >= 256 else [whole]  # 64 columns of K: one 128-wide tile, nothing to split
        expected += [
            (launch, n, k, c) for c in configs + ["cublas (F.linear alone)", "bound (weights / copy bandwidth)"]
        ]
    assert [(r["launch"], r["n"], r["k"], r["config"]) for r in rows] == expected
    assert all(r["correct"] for r in rows if "correct" in r) and sum("correct" in r for r in rows) == 6
    assert all(r["us"] > 0 for r in rows)


WRONG_OUT = """
import math, sys
sys.path.insert(0, sys.argv[1])
import fused_linear
real = fused_linear.launch
def launch(name, *args, **kwargs):  # the out-projection's expected result made wrong: its kernel now "computes wrongly"
    run, written, expected, weights = real(name, *args, **kwargs)
    return run, written, expected + (name == "out"), weights
fused_linear.launch = launch
sys.argv = ["fused_linear.py", *sys.argv[2:]]
fused_linear.main()
"""


def test_fused_linear_benchmark_does_not_time_a_wrong_configuration(tmp_path):
    """A configuration whose result is wrong is reported WRONG and not timed, as the docstring says (it was timed,
    on a GPU a kernel that may read or write out of bounds); the run ends with an error naming the count."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--preset", "tiny", "--rows", "3", "--head", "64", "--steps", "1", "--chain", "1",
            "--configs", "0", "--json", "fl.json"]  # fmt: skip
    cmd = [sys.executable, "-c", WRONG_OUT, str(ROOT / "benchmarks"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "1 configuration(s) computed wrong results" in out.stderr, out.stderr[-3000:]
    rows = [r for r in json.loads((tmp_path / "fl.json").read_text())["results"] if "correct" in r]
    launches = ("qkv", "out", "up", "down", "head")
    assert [(r["launch"], r["correct"]) for r in rows] == [(n, n != "out") for n in launches]
    assert all((r["us"] > 0) == r["correct"] and math.isnan(r["us"]) != r["correct"] for r in rows)
    assert "block_n=16/block_k=128 WRONG" in out.stdout


def test_fused_attention_benchmark_checks_and_times_every_split(tmp_path):
    """Under Triton's interpreter (tiny heads, float32): a row per (slot, splits), each checked against SDPA, and the
    bandwidth bound; at slot 140 (two 128-slot tiles) 3 splits leave a run idle and still compute right."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--preset", "tiny", "--rows", "3", "--slots", "5,140", "--splits", "1,3", "--steps",
            "1", "--chain", "2", "--prefetch", "--json", "fa.json"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fused_attention.py"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "fa.json").read_text())["results"]
    assert [(r["rows"], r["slot"], r["splits"]) for r in rows] == [
        (3, 5, 1), (3, 5, 3), (3, 5, "bound"), (3, 140, 1), (3, 140, 3), (3, 140, "bound")
    ]  # fmt: skip
    assert all(r["correct"] for r in rows if "correct" in r) and all(r["us"] > 0 for r in rows)
    bad = subprocess.run(cmd[:2] + ["--device", "cpu", "--splits", "0"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "--splits must be at least 1" in bad.stderr


WRONG_SPLIT = """
import sys
sys.path.insert(0, sys.argv[1])
import fused_attention
real = fused_attention.decode_attention
def decode_attention(*args, splits, **kwargs):  # the 3-way split made wrong: its kernel now "computes wrongly"
    return real(*args, splits=splits, **kwargs) + (splits == 3)
fused_attention.decode_attention = decode_attention
sys.argv = ["fused_attention.py", *sys.argv[2:]]
fused_attention.main()
"""


def test_fused_attention_benchmark_does_not_time_a_wrong_split(tmp_path):
    """A split whose result is wrong is reported WRONG and not timed, as in fused_linear.py (it was timed: on a GPU
    a kernel that may read or write out of bounds, replayed in a graph); the run ends with an error naming the
    count."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--preset", "tiny", "--rows", "3", "--slots", "5", "--splits", "1,3", "--steps", "1",
            "--chain", "1", "--json", "fa.json"]  # fmt: skip
    cmd = [sys.executable, "-c", WRONG_SPLIT, str(ROOT / "benchmarks"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "1 call(s) computed wrong results" in out.stderr, out.stderr[-3000:]
    rows = [r for r in json.loads((tmp_path / "fa.json").read_text())["results"] if "correct" in r]
    assert [(r["splits"], r["correct"]) for r in rows] == [(1, True), (3, False)]
    assert rows[0]["us"] > 0 and math.isnan(rows[1]["us"]) and math.isnan(rows[1]["gbps"])
    assert re.search(r"^   3     5  3 WRONG +nan +nan$", out.stdout, re.MULTILINE), out.stdout


def test_persistent_step_benchmark_checks_every_tiling_against_the_kernels(tmp_path):
    """Under Triton's interpreter (tiny preset, float32): per row count the bound, the fused step's kernels one by
    one, and each tiling of the persistent step, checked against the kernels' logits (the programs it launched
    named); a malformed --tiles entry is an argparse error naming it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    args = ["--device", "cpu", "--preset", "tiny", "--rows", "3", "--slot", "20", "--tiles", "16/2/auto/0,32/3/2/0",
            "--steps", "1", "--json", "ps.json"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "benchmarks" / "persistent_step.py"), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "ps.json").read_text())["results"]
    assert [(r["step"], r["rows"]) for r in rows] == [
        ("bound", 3), ("kernels", 3), ("persistent 16/2/auto/0", 3), ("persistent 32/3/2/0", 3)
    ]  # fmt: skip
    assert all(r["ms_per_step"] > 0 for r in rows) and all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert [r["programs"] for r in rows[2:]] == [2, 2]  # the interpreter's two programs
    assert "ms/step  s total" in out.stdout  # a 1024-token decode of all the rows (it said s/image)
    bad = subprocess.run(cmd[:2] + ["--device", "cpu", "--tiles", "16/4"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "--tiles: '16/4' is not block_n/down_split/per_sm/sleep_ns" in bad.stderr


def test_decode_scripts_name_a_bad_list_value(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for script, flag, good in (("decode_floor.py", "--attention", "sdpa"), ("decode_profile.py", "--modes", "eager")):
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", flag, f"{good},warp"]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 2 and f"{flag}: unknown value 'warp'" in out.stderr, out.stderr[-500:]


def selected_tests(block: str) -> set[str]:
    """The tests one part of the GPU script runs: its files, filtered by its -k expression if any."""
    files = re.findall(r"tests/\S+\.py", block)
    assert files and all((ROOT / f).is_file() for f in files), files
    k = re.search(r'-k "([^"]+)"', block)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files]
    out = subprocess.run(cmd + (["-k", k.group(1)] if k else []), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    return {line.split("::")[0] + "::" + line.split("::")[1].split("[")[0] for line in out.stdout.splitlines()
            if "::" in line}  # fmt: skip


def test_gpu_decode_script_selects_the_kernel_tests():
    """The GPU script's kernel part (first half) runs every test of the fused kernels and its test part (second half)
    the decode modes' GPU tests, from existing files (a renamed file or test would otherwise drop out of the only run
    on a GPU without anyone noticing); max-autotune's test has its own part."""
    script = (ROOT / "benchmarks" / "gpu_decode.sh").read_text()
    kernels = selected_tests(script[script.index("part kernels") : script.index("part generation")])
    for path in ("tests/model/test_fused_decode.py", "tests/model/test_persistent_decode.py",
                 "tests/generation/test_sampling_kernel.py", "tests/model/test_fused_launch.py"):  # fmt: skip
        module = ast.parse((ROOT / path).read_text())
        tests = [f"{path}::{n.name}" for n in module.body if getattr(n, "name", "").startswith("test_")]
        assert tests and set(tests) <= kernels, sorted(set(tests) - kernels)
    modes = selected_tests(script[script.index("part tests") : script.index("part tune_tests")])
    assert "tests/generation/test_generate.py::test_autotuned_and_flex_decoding_equal_eager_sdpa" in modes
    assert not any("max" in t.split("::")[1] and "autotuned" in t for t in modes)  # max-autotune: its own part


def test_gpu_decode_script_compares_valid_launch_options():
    """The option sets the GPU script times (a typo would only show on the GPU, after minutes of device time)."""
    from cm3leon_lightning.model.fused_launch import FusedOptions

    script = (ROOT / "benchmarks" / "gpu_decode.sh").read_text()
    labels = re.search(r"FUSED_OPTIONS=\$\{FUSED_OPTIONS:-([^}]*)\}", script).group(1).split(",")
    options = [FusedOptions.parse(label) for label in labels]
    assert options[0] == FusedOptions() and len(set(options)) == len(options) >= 4
    assert '--fused-options "$FUSED_OPTIONS"' in script


def test_serving_benchmark_batches_requests_and_keeps_their_codes(tmp_path):
    """Both rows are written, the batched decode holds every request's guidance streams, and (greedy) each request's
    codes equal its one-at-a-time codes."""
    args = ["--device", "cpu", "--preset", "tiny", "--image-tokens", "4", "--requests", "3", "--method", "greedy"]
    out = run_bad("serving.py", *args, "--json", "s.json", cwd=tmp_path)
    stdout = out.stdout
    assert out.returncode == 0 and "cannot be checked" not in out.stderr, out.stderr[-2000:]  # its own tokenizer
    rows = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [(r["mode"], r["rows_per_decode"], r["same_codes"]) for r in rows] == [
        ("one at a time", 2, 1.0), ("batched", 6, 1.0)
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["requests"] == 3 for r in rows)
    assert "batching speed-up" in stdout and "wrote s.json" in stdout


def test_serving_benchmark_batches_infill_requests_and_keeps_their_texts(tmp_path):
    """--kind infill: one row per sample, all requests' samples in one decode, and (greedy) the same fillings."""
    args = ["--device", "cpu", "--preset", "tiny", "--kind", "infill", "--span-tokens", "3", "--requests", "3",
            "--num-samples", "2", "--method", "greedy"]  # fmt: skip
    stdout = run("serving.py", *args, "--json", "s.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [(r["kind"], r["mode"], r["rows_per_decode"], r["same_codes"]) for r in rows] == [
        ("infill", "one at a time", 2, 1.0), ("infill", "batched", 6, 1.0)
    ]  # fmt: skip
    assert "same texts: 100%" in stdout


def run_bad(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script`` run with arguments it should refuse (the caller checks the exit status and message)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)


def test_generation_benchmark_refuses_bad_counts_and_presets_before_measuring(tmp_path, monkeypatch, capsys):
    """A count of 0 or below (which fell back to the default, or timed nothing as `inf` s) and an unknown preset
    (which crashed after the presets before it had run) are argparse errors naming the flag; --candidates 1 gives one
    row per mode, not the same row twice."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)
    import generation

    base = ["generation.py", "--device", "cpu", "--presets", "tiny", "--image-tokens", "4", "--reference-tokens", "0"]
    for flag, value, message in (
        ("--repeats", "0", "argument --repeats: must be an integer >= 1, got '0'"),
        ("--image-tokens", "-4", "argument --image-tokens: must be an integer >= 1, got '-4'"),
        ("--reference-tokens", "-1", "argument --reference-tokens: must be an integer >= 0, got '-1'"),
        ("--presets", "tiny,tiyn", "--presets: unknown value 'tiyn'"),
    ):
        monkeypatch.setattr(sys, "argv", [*base, flag, value])
        with pytest.raises(SystemExit) as exit:
            generation.main()
        assert exit.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "generation_benchmark.json").exists()
    monkeypatch.setattr(sys, "argv", [*base, "--candidates", "1", "--json", "g.json"])
    generation.main()
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [(r["mode"], r["images"]) for r in rows] == [("eager", 1)]


def test_decode_floor_times_the_real_step_around_the_middle_of_the_image(monkeypatch):
    """The real step's timed steps are centred on the image's middle, where the pieces' cache and the bound are
    filled (attention over the filled slots only, fused or flex, is cheaper early in an image): after the warm-up,
    untimed steps up to there."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import decode_floor
    from generation import build

    from cm3leon_lightning.generation.decoder import Decoder

    slots, real_step = [], Decoder.step

    def step(self, feed):
        slots.append(int(self.input_pos) - self.prompt_len)
        return real_step(self, feed)

    monkeypatch.setattr(Decoder, "step", step)
    model, vocab = build("tiny", 64, "cpu", torch.float32)
    with torch.no_grad():
        assert decode_floor.step_ms(model, vocab, 2, "eager", "sdpa", steps=10, warmup=8) > 0
    assert slots == list(range(37))  # warm-up 8 and 19 more untimed, then the 10 timed: image tokens 27..36 of 64


def fake_compile(modes: list[str], skips: int = 0):
    """A stand-in for ``torch.compile`` (keeps the tests short): records the mode, counts ``skips`` CUDA-graph skips
    as torch.compile does when it cannot use them, and returns the model itself."""
    from torch._dynamo.utils import counters

    def compile(model, mode, **kwargs):
        modes.append(mode)
        counters["inductor"]["cudagraph_skips"] += skips
        return model

    return compile


def test_model_forward_benchmark_names_how_it_decoded(tmp_path, monkeypatch, capsys):
    """The three figures, and the decode line says which step it timed: with --cuda-graph the step is compiled in
    mode reduce-overhead (it said compile=False), and how often torch.compile skipped the CUDA graphs (a decode no
    faster than eager was left unexplained); torch.compile is replaced here to keep the test short."""
    from torch._dynamo.utils import counters

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 0)  # restored after the test
    import model_forward

    modes = []
    monkeypatch.setattr(torch, "compile", fake_compile(modes, skips=2))
    for flags in ([], ["--cuda-graph"], ["--compile"]):
        monkeypatch.setattr(sys, "argv", ["model_forward.py", "--batch", "1", "--seq", "8", "--decode-steps", "2",
                                          "--repeats", "1", *flags])  # fmt: skip
        model_forward.main()
    lines = capsys.readouterr().out.splitlines()
    assert modes == ["reduce-overhead", "default"]
    head = "preset=tiny params=0.1M device=cpu dtype=torch.float32 batch=1 seq=8"
    assert [line.split(":")[0] for line in lines] == [head, "train fwd+bwd", "prefill", "decode"] * 3
    assert [line.split("(")[-1] for line in lines[3::4]] == [
        "eager)", "torch.compile mode=reduce-overhead, CUDA graphs skipped: 2)", "torch.compile mode=default)"
    ]  # fmt: skip


def test_gpu_model_check_compares_the_cached_decode_and_fails_when_cuda_graphs_were_skipped(monkeypatch, capsys):
    """The check's comparison run on the CPU (torch.compile replaced by a stand-in): the cached decode equals the
    full forward; when torch.compile skipped the CUDA graphs the check fails, since the decode it checked was then
    not a CUDA graph's (it passed, printing "cuda-graph decode")."""
    from torch._dynamo.utils import counters

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 0)
    import gpu_model_check

    for skips, status in ((0, 0), (1, 1)):
        modes = []
        monkeypatch.setattr(torch, "compile", fake_compile(modes, skips))
        assert gpu_model_check.check("cpu") == status and modes == ["reduce-overhead"]
        out = capsys.readouterr().out
        assert float(re.search(r"fp32: max abs err (\S+)\n", out).group(1)) < 1e-5
        assert f"\nCUDA graphs skipped by torch.compile: {skips}\nbf16 autocast logits finite: True\n" in out


@pytest.mark.parametrize(
    ("script", "args", "lines"),
    [
        ("cm3_infill.py", ["--examples", "5"], [r"examples: 5, mean length \d+ tokens, rate 1\.0",
                                                r"cm3_infill : +\d+ examples/s", r"cm3_restore: +\d+ examples/s"]),
        ("dataloader.py", ["--samples", "16", "--per-shard", "8", "--batch-size", "4"],
         [r"wrote 16 samples in 2 shards", r"one worker, end to end: [\d.]+ sequences/s \([\d.]+s for 16 sequences\)",
          r"  per sequence: read\+sha256\+tar [\d.]+ ms, decode\+validate [\d.]+ ms, "
          r"retrieve\+fit\+serialize [\d.]+ ms, CM3 masking -?[\d.]+ ms"]),
        ("vqgan.py", ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--iters", "1"],
         [r"VQGAN tiny 32x32 -> \(8, 8\) codes, float32, batch 2, cpu", r"encode: +[\d.]+ images/s",
          r"decode: +[\d.]+ images/s"]),
        ("gpu_model_check.py", [], [r"no CUDA device; nothing to check"]),
    ],
)  # fmt: skip
def test_throughput_benchmarks_run_and_print_their_figures(tmp_path, script, args, lines):
    """The benchmarks without a test of their own run at tiny sizes and print the lines their docstrings promise."""
    if script == "gpu_model_check.py" and torch.cuda.is_available():
        pytest.skip("on a GPU this is the real check (benchmarks/gpu_suite.sh)")
    stdout = run(script, *args, cwd=tmp_path)
    for line in lines:
        assert re.search(f"^{line}", stdout, re.MULTILINE), (line, stdout)


def test_train_step_benchmark_times_steps_after_the_warm_up(tmp_path, monkeypatch, capsys):
    """One JSON line per preset; fewer than 3 steps (2 warm-up, which were then timed silently) are refused; no
    warning that the learning-rate warm-up outlasts the run (it told to lower --model.init_args.warmup_steps, which
    the benchmark does not have)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_step

    monkeypatch.setattr(sys, "argv", ["train_step.py", "--steps", "2"])
    with pytest.raises(SystemExit) as exit:
        train_step.main()
    message = "--steps must be at least 3 (the first two are warm-up, not timed), got 2"
    assert exit.value.code == 2 and message in capsys.readouterr().err
    out = tmp_path / "t.json"
    argv = ["train_step.py", "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step.main()
    assert [str(w.message) for w in caught if "warmup" in str(w.message)] == []
    (row,) = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    assert (row["preset"], row["batch_size"], row["seq_len"], row["precision"]) == ("tiny", 2, 16, "32-true")
    assert row["step_s"] > 0 and row["tokens_per_s"] > 0


def test_retrieval_benchmark_names_recall_by_its_k(tmp_path):
    """A row per (index, search setting), its recall named by --k (it said recall@10 whatever --k was)."""
    pytest.importorskip("faiss")
    args = ["--sizes", "600", "--queries", "20", "--dim", "16", "--clusters", "8", "--nlist", "8", "--train-size",
            "600", "--factories", "Flat", "IVF{nlist},Flat", "--nprobe", "2", "--k", "5", "--json",
            "r.json"]  # fmt: skip
    stdout = run("retrieval.py", *args, cwd=tmp_path)
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["index"], r["search"]) for r in rows] == [("Flat", "-"), ("IVF8,Flat", "nprobe=2")]
    assert rows[0]["recall@5"] == 1.0 and 0 < rows[1]["recall@5"] <= 1 and not any("recall@10" in r for r in rows)
    assert stdout.count("recall@5 ") == 2


def gpu_script(name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/<name>`` from the repository root with this Python, results under ``cwd``."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(cwd / "out"), **env}
    return subprocess.run(["bash", f"benchmarks/{name}"], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["gpu_suite.sh", "gpu_decode.sh"])
def test_gpu_scripts_stop_at_once_without_a_gpu(tmp_path, name):
    """Without a CUDA device the script says so and exits 2 before any part (it ran them all on the CPU for up to
    20 minutes, then exited 0)."""
    out = gpu_script(name, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 2, out.stdout[-1000:] + out.stderr[-1000:]
    assert f"benchmarks/{name}: no CUDA device visible to {sys.executable}" in out.stderr
    assert "===" not in out.stdout and list((tmp_path / "out").iterdir()) == []


DRY_RUN = """
import argparse, runpy, sys
real = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    parsed = real(self, args, namespace)  # an unknown flag or a bad value exits 2 here
    print("parsed", sys.argv[0], "json=" + str(getattr(parsed, "json", "-")))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
sys.argv = sys.argv[1:]
sys.path[0] = sys.argv[0].rpartition("/")[0]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name", ["gpu_suite.sh", "gpu_decode.sh"])
def test_gpu_scripts_call_the_benchmarks_with_arguments_they_take(tmp_path, name):
    """A dry run (a fake GPU; pytest and the CUDA probes answered by a stub): every benchmark the script runs parses
    the arguments the script gives it (a renamed flag would otherwise only show on the GPU, after minutes of its
    time), and each that can write a JSON table writes it to $OUT (fused_attention.py wrote none: its figures were
    only in the log). The tests' selection is checked by test_gpu_decode_script_selects_the_kernel_tests."""
    (tmp_path / "dry.py").write_text(DRY_RUN)
    stub = tmp_path / "py"
    stub.write_text(
        f'#!/bin/bash\ncase "$1" in -c | -m) exit 0 ;; esac\nexec {sys.executable} {tmp_path}/dry.py "$@"\n'
    )
    (tmp_path / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: stub'\n")
    for f in (stub, tmp_path / "nvidia-smi"):
        f.chmod(0o755)
    out = gpu_script(name, tmp_path, PY=str(stub), PATH=f"{tmp_path}:{os.environ['PATH']}")
    calls = re.findall(r"\$PY (benchmarks/\S+\.py)", (ROOT / "benchmarks" / name).read_text())
    with_flags = [c for c in calls if "parse_args" in (ROOT / c).read_text()]  # gpu_model_check.py takes none
    parsed = re.findall(r"^parsed (\S+) json=(\S+)$", out.stdout, re.MULTILINE)
    assert len(with_flags) >= 4 and [script for script, _ in parsed] == with_flags, out.stdout[-2000:]
    assert all(j == "-" or Path(j).parent == tmp_path / "out" for _, j in parsed), parsed
    assert out.returncode == 0 and "=== every part passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.parametrize("name", ["gpu_suite.sh", "gpu_decode.sh"])
def test_gpu_scripts_refuse_an_unknown_half(tmp_path, name):
    """HALF other than 1, 2 or all ran no part and reported "every part passed" (exit 0)."""
    out = gpu_script(name, tmp_path, HALF="3")
    assert out.returncode == 2 and f"{name}: HALF=3: use 1, 2 or all" in out.stderr, out.stderr
    assert out.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gpu_suite.sh", "gpu_decode.sh"])
def test_each_half_of_a_gpu_script_fits_one_device_command(tmp_path, name):
    """A device command may run 600 s: each half's part limits add up to at most 570 s (start-up and the wheel install
    take the rest). gpu_suite.sh's limits added up to 1170 s in one run, gpu_decode.sh's second half to 600 s."""
    text = (ROOT / "benchmarks" / name).read_text()
    halves = re.split(r"^(?:if first; then|if second; then|if \[ \"\$HALF\" != [12] \]; then)$", text, flags=re.M)
    assert len(halves) == 3, f"{name}: expected two HALF blocks"
    for half, block in zip((1, 2), halves[1:]):
        block = block.split("\nfi\n")[0]
        limits = [int(m) for m in re.findall(r'^\s*(?:TAIL=\d+ )?part \w+ "\$\{\w+:-(\d+)\}"', block, flags=re.M)]
        parts = re.findall(r"^\s*(?:TAIL=\d+ )?part ", block, flags=re.M)
        assert len(limits) == len(parts) >= 3, (name, half, block)  # every part's limit can be overridden
        assert sum(limits) <= 570, f"{name} HALF={half}: part limits add up to {sum(limits)} s"
    for half in ("1", "2"):  # the dry run of each half alone runs only its parts
        assert gpu_script(name, tmp_path / half, HALF=half, CUDA_VISIBLE_DEVICES="").returncode == 2


def test_gpu_script_parts_log_and_the_run_fails_when_one_did(tmp_path):
    """``part`` logs each part and goes on after a failure or a timeout; ``finish`` names those and exits 1 (the
    scripts exited 0 whatever failed), or 0 when every part passed; both GPU scripts end with it."""
    script = (
        "source benchmarks/gpu_common.sh; part ok 5 echo fine; part bad 5 bash -c 'exit 3'; part slow 1 sleep 5; "
        "part off 0 false; finish"
    )
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "=== 2 part(s) failed: bad (exit 3), slow (exit 124, out of time); logs in" in out.stderr
    assert "=== ok: exit 0" in out.stdout and "=== off: skipped" in out.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad.log", "ok.log", "slow.log"]
    assert (tmp_path / "out" / "ok.log").read_text() == "fine\n"
    good = subprocess.run(["bash", "-c", "source benchmarks/gpu_common.sh; part ok 5 true; finish"], cwd=ROOT,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert good.returncode == 0 and "=== every part passed" in good.stdout
    for name in ("gpu_suite.sh", "gpu_decode.sh"):
        lines = (ROOT / "benchmarks" / name).read_text().splitlines()
        assert lines[lines.index('source "$(dirname "$0")/gpu_common.sh"') + 1] == "need_gpu" and lines[-1] == "finish"


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("serving.py", ["--repeats", "-1"], "argument --repeats: must be an integer >= 1, got '-1'"),  # was inf s
        ("serving.py", ["--image-tokens", "0"], "argument --image-tokens: must be an integer >= 1, got '0'"),
        ("vqgan.py", ["--iters", "0"], "argument --iters: must be an integer >= 1, got '0'"),
        ("fused_linear.py", ["--rows", "2,x"], "argument --rows: must be comma-separated integers >= 1, got '2,x'"),
        ("persistent_step.py", ["--rows", "0"], "argument --rows: must be comma-separated integers >= 1, got '0'"),
        ("persistent_step.py", ["--chain", "4"], "unrecognized arguments: --chain 4"),  # was accepted and ignored
    ],
)
def test_serving_vqgan_and_kernel_benchmarks_refuse_bad_counts(tmp_path, script, args, message):
    """Counts that were silent defaults, ``inf`` timings or tracebacks are one-line argparse errors naming the flag."""
    out = run_bad(script, *args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_vqgan_benchmark_on_a_missing_cuda_device_is_a_one_line_error(tmp_path):
    out = run_bad("vqgan.py", "--device", "cuda", cwd=tmp_path)
    assert out.returncode == 2 and "--device cuda: torch sees no CUDA device here" in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the graph mode decodes")
def test_serving_benchmark_does_not_time_rejected_decodes(tmp_path):
    """A decode the API answers with a rejection (here a CUDA-only mode on a CPU) ends the run naming it, with no
    figures and no JSON (it timed the fast rejections and printed "batching speed-up: 10.39x")."""
    args = ["--device", "cpu", "--preset", "tiny", "--image-tokens", "4", "--requests", "2", "--compile", "graph",
            "--json", "s.json"]  # fmt: skip
    out = run_bad("serving.py", *args, cwd=tmp_path)
    message = "one at a time: 2 of 2 requests rejected, nothing measured: 400 compile='graph' needs a CUDA device"
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
    assert "speed-up" not in out.stdout and not (tmp_path / "s.json").exists()


CUDA_FLAG = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("model_forward", ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),  # IndexError
        ("model_forward", ["--decode-steps", "0"], "argument --decode-steps: must be an integer >= 1, got '0'"),
        ("model_forward", ["--decode-steps", "256"], "--decode-steps must be below the tiny context of 256 tokens"),
        ("model_forward", ["--preset", "tiyn"], "argument --preset: invalid choice: 'tiyn'"),
        pytest.param("model_forward", ["--device", "cuda"], "--device cuda: torch sees no CUDA device here",
                     marks=CUDA_FLAG),  # a traceback from torch's CUDA initialisation
        pytest.param("generation", ["--device", "cuda:1"], "--device cuda:1: torch sees no CUDA device here",
                     marks=CUDA_FLAG),
        pytest.param("fused_attention", ["--device", "cuda"], "--device cuda: torch sees no CUDA device here",
                     marks=CUDA_FLAG),
        ("decode_floor", ["--device", "cpu", "--preset", "tiyn"], "argument --preset: invalid choice: 'tiyn'"),
        ("train_step", ["--presets", "tiny", "tiyn"], "argument --presets: invalid choice: 'tiyn'"),
        ("cm3_infill", ["--examples", "0"], "argument --examples: must be an integer >= 1, got '0'"),  # 1/0
        ("dataloader", ["--samples", "0"], "argument --samples: must be an integer >= 1, got '0'"),  # 1/0
        ("export_memory", ["--preset", "tiny", "--whole", "0"], "argument --whole: expected an integer >= 1, got '0'"),
        ("serving", ["--device", "cpu", "--image-tokens", "4", "--requests", "1", "--compile", "warp"],
         "argument --compile: invalid choice: 'warp'"),  # accepted: every decode was rejected, and timed
        ("retrieval", ["--sizes", "50", "--dim", "8", "--clusters", "2", "--factories", "Flat", "--queries", "0"],
         "argument --queries: must be >= 1, got 0"),  # recall nan at 0 q/s, exit 0
        ("retrieval", ["--sizes", "5", "--dim", "8", "--clusters", "2", "--factories", "Flat"],
         "argument --sizes: every bank needs at least --k 10 vectors, got [5]"),  # a numpy traceback
    ],
)  # fmt: skip
def test_benchmarks_refuse_bad_arguments_naming_the_flag(tmp_path, monkeypatch, capsys, script, args, message):
    """Counts that crashed later (a traceback, a division by zero), ran on as nonsense (``--whole 0``: the "whole"
    rows measured the chunked export), or a preset, mode or device that failed deep inside are argparse errors
    naming the flag, before anything runs."""
    if script == "retrieval":
        pytest.importorskip("faiss")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were: not into the repository
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit:
        module.main()
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_decode_floor_with_one_candidate_times_each_piece_once(tmp_path, monkeypatch):
    """--candidates 1: the 2-row pieces once (they were all timed twice, as 2 and as 2 x 1 rows)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import decode_floor

    out = tmp_path / "floor.json"
    argv = ["decode_floor.py", "--device", "cpu", "--preset", "tiny", "--image-tokens", "4", "--steps", "1",
            "--candidates", "1", "--stages", "gemms", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    decode_floor.main()
    rows = json.loads(out.read_text())["results"]
    assert [(r["piece"], r["rows"]) for r in rows] == [("bound", 2), ("gemms", 2), ("step eager / sdpa", 2)]


def test_generation_benchmark_help_names_every_launch_option(monkeypatch, capsys):
    """--fused-options' help lists every option FusedOptions.parse takes and its environment variable (it left out
    persistent, which gpu_decode.sh times)."""
    from cm3leon_lightning.model.fused_launch import OPTION_ENV

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import generation

    monkeypatch.setattr(sys, "argv", ["generation.py", "--help"])
    with pytest.raises(SystemExit):
        generation.main()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "of pdl, splits, prefetch, persistent joined by +" in help_text
    assert all(env in help_text for env in OPTION_ENV.values())
