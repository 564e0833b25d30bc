"""The examples that need no finished demo run (those that do are in test_demo.py) run as a user runs them; every
example refuses bad arguments and an unfinished run in one line, before it writes anything."""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import cm3leon_lightning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def compose_callbacks_env(tmp_path: Path) -> dict[str, str]:
    """The environment of examples/compose_callbacks.py's runs: its temporary directory in ``tmp_path / "tmp"``
    (torch's compile cache elsewhere: it is not the example's)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}


def compose_callbacks(tmp_path: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run examples/compose_callbacks.py (or ``python -c code`` on it) in :func:`compose_callbacks_env`."""
    script = str(EXAMPLES / "compose_callbacks.py")
    cmd = [sys.executable, script, *args] if code is None else [sys.executable, "-c", code, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=compose_callbacks_env(tmp_path), timeout=600)


def test_compose_callbacks_example(tmp_path: Path) -> None:
    """examples/compose_callbacks.py: a fit with FID, CIDEr, VQA and sample-logging callbacks wired by hand; every
    callback logs its number and the sample logger writes both grids, in --workdir; nothing is left in the
    temporary directory."""
    done = compose_callbacks(tmp_path, "--workdir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.startswith("val/"))
    values = {key: float(value) for key, value in lines.items()}
    assert sorted(values) == ["val/cider", "val/fid", "val/loss", "val/vqa_acc"]
    assert all(math.isfinite(v) for v in values.values())
    assert 0 < values["val/loss"] < math.log(512) + 1 and values["val/fid"] > 0
    assert 0 <= values["val/cider"] <= 10 and 0 <= values["val/vqa_acc"] <= 1
    grids = next(line for line in done.stdout.splitlines() if line.startswith("sample grids:")).split()[2:]
    assert grids == ["samples_image_to_text-step0000008.png", "samples_text_to_image-step0000008.png"]
    run_dir = tmp_path / "work" / "run" / "version_0"
    assert done.stdout.strip().splitlines()[-1] == f"run directory: {run_dir} (kept)"
    assert all((run_dir / "samples" / g).stat().st_size > 0 for g in grids)
    with open(run_dir / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("val/fid")]
    assert len(logged) == 1 and math.isclose(float(logged[0]["val/fid"]), values["val/fid"], rel_tol=1e-3)
    assert sorted((tmp_path / "tmp").iterdir()) == []


# The example run as a script, failing after it made its directory (its tokenizer training raises).
FAIL_AFTER_MKDIR = """import runpy, sys
import cm3leon_lightning
def boom(*args, **kwargs):
    raise RuntimeError("stop here")
cm3leon_lightning.TextTokenizer.train = boom
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_compose_callbacks_deletes_its_temporary_directory(tmp_path: Path) -> None:
    """Without --workdir the example works in a temporary directory, deleted at exit, after a failure too (it left
    a /tmp/cm3leon-callbacks-* behind on every run)."""
    done = compose_callbacks(tmp_path, code=FAIL_AFTER_MKDIR)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == "RuntimeError: stop here"
    assert sorted((tmp_path / "tmp").iterdir()) == []


def test_compose_callbacks_help_and_a_used_workdir(tmp_path: Path) -> None:
    """--help describes the example and exits (it ran the example); a --workdir that holds files is refused, untouched
    (a second run failed after minutes: the VQGAN export refuses to overwrite)."""
    done = compose_callbacks(tmp_path, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: compose_callbacks.py [-h] [--workdir DIR]\n")
    assert "Compose the evaluation callbacks by hand" in done.stdout and "deleted when Python exits" in done.stdout
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    done = compose_callbacks(tmp_path, "--workdir", str(tmp_path / "work"))
    message = f"argument --workdir: {tmp_path / 'work'} is not an empty directory: give a new or empty one"
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == f"compose_callbacks.py: error: {message}"
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["notes.txt"]
    assert sorted((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "running", ["tokenizer", "hparams.yaml"], ids=["before-the-fit", "in-the-fit"]
)  # the path whose creation shows how far the run got: its tokenizer saved, or the fit's logger started
def test_compose_callbacks_stopped_by_sigterm_exits_143(tmp_path: Path, running: str) -> None:
    """`kill PID` while the example ran: in the fit it exited with status 0 (Lightning ends a fit stopped by SIGTERM
    with a SystemExit of no code), before it Python's default ended it at once and left its temporary directory
    behind. Both now exit 143, the directory deleted, no process of the run left."""
    import signal
    import time

    from support.processes import group_alive

    script = str(EXAMPLES / "compose_callbacks.py")
    proc = subprocess.Popen(
        [sys.executable, script], env=compose_callbacks_env(tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "tmp").glob(f"cm3leon-callbacks-*/**/{running}")):
            assert proc.poll() is None and time.monotonic() < deadline, f"the example never wrote {running}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-3000:]
        assert "Traceback" not in err and sorted((tmp_path / "tmp").iterdir()) == []
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(proc.pid), "the example left processes running after SIGTERM"
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_examples_import_the_public_names_from_the_package() -> None:
    """The README imports from ``cm3leon_lightning``; so do the examples, for every name it exports."""
    for script in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cm3leon_lightning."):
                public = [a.name for a in node.names if a.name in cm3leon_lightning.__all__]
                assert not public, f"{script.name}: import {public} from cm3leon_lightning, not {node.module}"


BAD_ARGUMENTS = [
    ("demo_decoding_sweep.py", ["--top-p", "0.6", "0"], "argument --top-p: expected a number in (0, 1], got '0'"),
    ("demo_decoding_sweep.py", ["--top-p", "nan"], "argument --top-p: expected a number in (0, 1], got 'nan'"),
    ("demo_decoding_sweep.py", ["--cfg", "nan"], "argument --cfg: expected a finite number, got 'nan'"),
    ("demo_decoding_sweep.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("serve_shapes.py", ["--requests", "0"], "argument --requests: expected an integer >= 1, got '0'"),
    ("serve_shapes.py", ["--max-batch-size", "0"], "argument --max-batch-size: expected an integer >= 1, got '0'"),
    ("serve_shapes.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    ("sft_shapes.py", ["--pairs", "0"], "argument --pairs: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--eval", "0"], "argument --eval: expected an integer >= 1, got '0'"),
    ("sft_shapes.py", ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    ("sft_shapes.py", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
    ("sft_shapes.py", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    (
        "sft_shapes.py",
        ["--seed", str(2**32)],
        "argument --seed: expected an integer <= 4294967295 (the fit's seed_everything takes no more), got 4294967296",
    ),
    ("sft_shapes.py", ["--image-first", "1.5"], "argument --image-first: expected a number in [0, 1], got 1.5"),
]


@pytest.mark.parametrize(("script", "args", "message"), BAD_ARGUMENTS)
def test_examples_refuse_bad_arguments_before_any_work(
    script: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checked before the run is read (here it does not exist) and before anything is written: the numbers would
    otherwise fail, or be used, after minutes of export, fitting or decoding."""
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    out = ["--out", str(tmp_path / "out")] if script != "demo_decoding_sweep.py" else []
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), *out, *args])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["demo_decoding_sweep.py", "serve_shapes.py", "sft_shapes.py"])
def test_examples_name_an_unfinished_run_in_one_line(
    script: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    out = ["--out", str(tmp_path / "out")] if script != "demo_decoding_sweep.py" else []
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run"), *out])
    marker = tmp_path / "run" / "tokenizer" / "stage.json"
    expected = f": error: run: {marker} not found: run `make demo` (or `cm3leon demo --out {tmp_path / 'run'}`) first"
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(expected)
    assert sorted(tmp_path.iterdir()) == []


class StopBeforePrepare(Exception):
    """Raised in place of ``cm3leon prepare``: the SFT example's data is written, the slow stages not run."""


def fake_demo_run(root: Path) -> Path:
    """A demo run's stage markers as examples/sft_shapes.py reads them: a tiny tokenizer and a micro VQGAN (16 px);
    the CLIP and checkpoint paths are only read after ``prepare``."""
    from cm3leon_lightning import VQGAN, TextTokenizer

    tok = TextTokenizer.train(["a red square", "a blue circle"] * 20, vocab_size=300)
    results = {
        "tokenizer": {"path": str(tok.save(root / "tokenizer" / "tokenizer"))},
        "vqgan": {"path": str(VQGAN.from_name("micro").save_pretrained(root / "vqgan" / "model"))},
        "clip": {"path": str(root / "clip" / "clip.safetensors"), "model": "cm3leon-clip-tiny"},
        "train": {"checkpoint": str(root / "train" / "cm3leon.ckpt")},
    }
    for stage, result in results.items():
        (root / stage).mkdir(parents=True, exist_ok=True)
        (root / stage / "stage.json").write_text(json.dumps({"result": result}))
    return root


@pytest.fixture
def sft_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, object]:
    """A fake demo run in ``tmp_path / "run"`` and examples/sft_shapes.py's main, stopping where ``prepare`` begins."""

    def stop(*args: object, **kwargs: object) -> None:
        raise StopBeforePrepare

    main = runpy.run_path(str(EXAMPLES / "sft_shapes.py"))["main"]
    monkeypatch.setitem(main.__globals__, "prepare", stop)
    return fake_demo_run(tmp_path / "run"), main


def files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its modification time and bytes."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_sft_example_refuses_to_rerun_other_data_into_its_out(
    sft_main: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rerun with other --pairs rewrote the data (the JSON lines replaced, img/ a mix of both runs), then `cm3leon
    prepare` refused the changed input and advised restoring it; now it is refused before anything is written. The
    same data settings with other fit settings rerun; --fresh deletes the old output first."""
    run, main = sft_main
    out = tmp_path / "sft"
    with pytest.raises(StopBeforePrepare):
        main([str(run), "--out", str(out), "--pairs", "4", "--seed", "7"])
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["data"] == {"run": str(run.resolve()), "pairs": 4, "seed": 7, "image_size": 16}
    assert recorded["fit"]["steps"] == 800
    before = files(out)
    assert (out / "data" / "captions.jsonl").read_text().count("\n") == 4
    for args, differ in (
        (["--pairs", "3", "--seed", "7"], "--pairs 4; asked for: --pairs 3"),
        (["--pairs", "3", "--seed", "8"], "--pairs 4, --seed 7; asked for: --pairs 3, --seed 8"),
    ):
        with pytest.raises(SystemExit) as e:
            main([str(run), "--out", str(out), *args])
        message = (f": error: --out: {out} holds the output of other SFT data ({differ}): rerunning would replace its "
                   "data and what was prepared from it. Pass --fresh to delete it and start over, or give another "
                   "--out")  # fmt: skip
        assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
        assert files(out) == before  # nothing rewritten, nothing added
    with pytest.raises(StopBeforePrepare):  # the same data, a longer fit: reused (same bytes), args.json updated
        main([str(run), "--out", str(out), "--pairs", "4", "--seed", "7", "--steps", "5"])
    assert {k: v[1] for k, v in files(out).items() if k != "args.json"} == {
        k: v[1] for k, v in before.items() if k != "args.json"
    }
    assert json.loads((out / "args.json").read_text())["fit"]["steps"] == 5
    with pytest.raises(StopBeforePrepare):
        main([str(run), "--out", str(out), "--pairs", "3", "--seed", "7", "--fresh"])
    assert json.loads((out / "args.json").read_text())["data"]["pairs"] == 3
    named = {json.loads(line)[k] for f in (out / "data").glob("*.jsonl") for line in f.read_text().splitlines()
             for k in ("image", "target") if k in json.loads(line)}  # fmt: skip
    assert (out / "data" / "captions.jsonl").read_text().count("\n") == 3
    assert {f"img/{p.name}" for p in (out / "data" / "img").iterdir()} == named  # none of the old run's images


def test_sft_example_writes_into_no_other_directory(
    sft_main: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A non-empty --out without the example's args.json (another directory, or the demo run itself) is neither
    written into nor deleted by --fresh; a file is refused."""
    run, main = sft_main
    before = files(run)
    for extra, flag in (([], "--out"), (["--fresh"], "--fresh")):
        with pytest.raises(SystemExit) as e:
            main([str(run), "--out", str(run), "--pairs", "2", *extra])
        message = (f": error: {flag}: {run} is not empty and holds no args.json of examples/sft_shapes.py; refusing "
                   "to write into or delete it: give a new or empty --out")  # fmt: skip
        assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
        assert files(run) == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([str(run), "--out", str(tmp_path / "file"), "--pairs", "2"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f": error: --out: {tmp_path / 'file'} is a file, not a directory")
    )
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(SystemExit) as e:  # below a file: a NotADirectoryError traceback
        main([str(run), "--out", str(tmp_path / "file" / "sft"), "--pairs", "2"])
    message = f": error: --out: cannot create {tmp_path / 'file' / 'sft'}: Not a directory"
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)


def _sigterm_fit(*args: object, **kwargs: object) -> None:
    """A fit stopped by SIGTERM as Lightning stops one: its SIGTERMException, a SystemExit with no code."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raise SIGTERMException


def _ctrl_c_fit(*args: object, **kwargs: object) -> None:
    """A fit stopped by Ctrl-C as Lightning stops one: ``sys.exit(1)`` while handling the KeyboardInterrupt."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


@pytest.mark.parametrize(("fit", "how", "status"), [(_sigterm_fit, "SIGTERM", 143), (_ctrl_c_fit, "Ctrl-C", 130)])
def test_sft_example_stopped_in_its_fit_says_so_and_fails(
    fit: object, how: str, status: int, sft_main: tuple[Path, object], tmp_path: Path, monkeypatch, capsys
) -> None:
    """`kill PID` during the fine-tuning exited with status 0 and no word (`... && cat runs/sft/report.json` read the
    report of an earlier run); Ctrl-C exited 1. Both now say so in one line and exit 143 / 130."""
    run, main = sft_main
    monkeypatch.setitem(main.__globals__, "prepare", lambda *args, **kwargs: None)
    monkeypatch.setitem(main.__globals__, "fit_with_cli", fit)
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        main([str(run), "--out", str(out), "--pairs", "2"])
    message = (f"sft_shapes.py: stopped by {how} during the fit; the SFT data and its prepared shards in {out} are "
               "kept: rerun the same command to reuse them\n")  # fmt: skip
    assert e.value.code == status and capsys.readouterr().err == message
    assert not (out / "report.json").exists()


class StopBeforeServe(Exception):
    """Raised in place of ``cm3leon serve``: the serve example's arguments checked and its model exported."""


@pytest.fixture
def serve_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, object, list]:
    """A fake demo run (with a memory bank) in ``tmp_path / "run"``, examples/serve_shapes.py's main stopping where
    the first server starts, and the calls of its ``export_model`` (a stub writing the config.json of an export)."""
    run = fake_demo_run(tmp_path / "run")
    stage = run / "train" / "stage.json"
    stage.write_text(json.dumps({"result": {**json.loads(stage.read_text())["result"], "max_retrieved": 1}}))
    (run / "prepare" / "work" / "bank" / "index").mkdir(parents=True)
    (run / "prepare" / "work" / "bank" / "index" / "index.faiss").write_bytes(b"bank")
    calls = []

    def export(ckpt: str, out: Path, *args: object, force: bool = False) -> None:
        calls.append((Path(out), force))
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps({"source": {"checkpoint": ckpt}}))

    def stop(*args: object, **kwargs: object) -> None:
        raise StopBeforeServe

    main = runpy.run_path(str(EXAMPLES / "serve_shapes.py"))["main"]
    monkeypatch.setitem(main.__globals__, "export_model", export)
    monkeypatch.setitem(main.__globals__, "server", stop)
    return run, main, calls


def test_serve_example_writes_into_no_other_directory(
    serve_main: tuple[Path, object, list], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A non-empty --out without the example's args.json was exported into with force=True: `<out>/model` replaced
    whatever it held (a user's weights.bin gone). Now it is refused, untouched, --fresh too (nor another example's
    args.json); a file is refused."""
    run, main, calls = serve_main
    victim = tmp_path / "victim"
    (victim / "model").mkdir(parents=True)
    (victim / "model" / "weights.bin").write_text("x")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "args.json").write_text(json.dumps({"data": {"seed": 7}, "fit": {}}))
    before = {d: files(d) for d in (victim, run, tmp_path / "sft")}
    for out in before:
        for extra, flag in (([], "--out"), (["--fresh"], "--fresh")):
            with pytest.raises(SystemExit) as e:
                main([str(run), "--out", str(out), "--requests", "2", *extra])
            message = (f": error: {flag}: {out} is not empty and holds no args.json of examples/serve_shapes.py; "
                       "refusing to write into or delete it: give a new or empty --out")  # fmt: skip
            assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert {d: files(d) for d in before} == before and calls == []
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([str(run), "--out", str(tmp_path / "file")])
    message = f": error: --out: {tmp_path / 'file'} is a file, not a directory"
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert (tmp_path / "file").read_text() == "mine" and calls == []
    with pytest.raises(SystemExit) as e:  # below a file: a NotADirectoryError traceback
        main([str(run), "--out", str(tmp_path / "file" / "serve")])
    message = f": error: --out: cannot create {tmp_path / 'file' / 'serve'}: Not a directory"
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert calls == []


def test_serve_example_refuses_to_rerun_other_settings_into_its_out(
    serve_main: tuple[Path, object, list], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rerun with another --seed (or --requests) silently replaced report.json and grid.png; now it is refused,
    naming the settings, before anything is written. The same settings rerun, exporting again over their own
    export only; --fresh deletes the old output first."""
    run, main, calls = serve_main
    out = tmp_path / "serve"
    with pytest.raises(StopBeforeServe):
        main([str(run), "--out", str(out), "--requests", "2", "--seed", "7"])
    assert calls == [(out / "model", False)]
    settings = {"run": str(run.resolve()), "requests": 2, "max_batch_size": 16, "seed": 7}
    assert json.loads((out / "args.json").read_text()) == {"serve": settings}
    (out / "report.json").write_text("{}")  # what the first run went on to write
    (out / "grid.png").write_bytes(b"png")
    before = files(out)
    for args, differ in (
        (["--requests", "2", "--seed", "8"], "--seed 7; asked for: --seed 8"),
        (["--requests", "3", "--seed", "7", "--max-batch-size", "2"],
         "--requests 2, --max-batch-size 16; asked for: --requests 3, --max-batch-size 2"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([str(run), "--out", str(out), *args])
        message = (
            f": error: --out: {out} holds the output of other settings ({differ}): rerunning would replace "
            "its report.json and grid.png. Pass --fresh to delete it and start over, or give another --out"
        )
        assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
        assert files(out) == before and len(calls) == 1  # nothing rewritten, nothing exported
    with pytest.raises(StopBeforeServe):  # the same settings: the example's own export replaced
        main([str(run), "--out", str(out), "--requests", "2", "--seed", "7"])
    assert calls[1:] == [(out / "model", True)]
    assert json.loads((out / "args.json").read_text()) == {"serve": settings}
    (out / "model" / "config.json").write_text(json.dumps({"source": {"checkpoint": "/elsewhere/other.ckpt"}}))
    before = files(out)
    with pytest.raises(SystemExit) as e:  # a model directory that is not its export of the demo checkpoint
        main([str(run), "--out", str(out), "--requests", "2", "--seed", "7"])
    ckpt = (run / "train" / "cm3leon.ckpt").resolve()
    message = (f": error: --out: {out / 'model'} is not this example's export of {ckpt}; refusing to replace it: "
               "move it away, or pass --fresh to delete --out and start over")  # fmt: skip
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert files(out) == before and len(calls) == 2
    with pytest.raises(StopBeforeServe):
        main([str(run), "--out", str(out), "--requests", "2", "--seed", "8", "--fresh"])
    assert calls[2:] == [(out / "model", False)]
    assert json.loads((out / "args.json").read_text()) == {"serve": {**settings, "seed": 8}}
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "model"]  # the old report and grid deleted


# A stand-in for `python -m cm3leon_lightning serve`: answers /health, records its pid, ends on SIGTERM.
FAKE_SERVER = """import http.server, pathlib, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
(pathlib.Path.cwd() / "server.pid").write_text(str(__import__("os").getpid()))
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

# The serve example's server() in a process of its own, held open until the test stops that process.
HOLD_SERVER = """import runpy, sys, time, types
server = runpy.run_path(sys.argv[1])["server"]
server.__wrapped__.__globals__["sys"] = types.SimpleNamespace(executable=sys.argv[2])
keys = ("model", "clip", "clip_weights", "bank", "shards")
with server(dict.fromkeys(keys, "x"), __import__("pathlib").Path(sys.argv[3])):
    print("up", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("signum", [15, 1])  # SIGTERM (kill PID), SIGHUP (the terminal closed)
def test_serve_example_stops_its_server_when_it_is_stopped(signum: int, tmp_path: Path) -> None:
    """`kill PID` of the example left `cm3leon serve` and its workers running (in a session of their own, on the
    example's port, for good): SIGTERM and SIGHUP ended the example without its clean-up."""
    import signal
    import time

    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    fake.chmod(0o755)
    script = str(EXAMPLES / "serve_shapes.py")
    cmd = [sys.executable, "-c", HOLD_SERVER, script, str(fake), str(tmp_path / "server.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        pid = int((tmp_path / "server.pid").read_text())
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # ended and reaped
            os.kill(pid, 0)
    finally:
        proc.kill()
        if (tmp_path / "server.pid").exists():
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(int((tmp_path / "server.pid").read_text()), signal.SIGKILL)
