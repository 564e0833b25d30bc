"""Serve the demo's model with ``cm3leon serve`` and query it over HTTP, as a client would.

Run after ``make demo``::

    python examples/serve_shapes.py runs/demo --out runs/serve

It exports the demo run's checkpoint with its tokenizer and VQGAN into a model directory (``<out>/model``, what
``cm3leon export`` writes), starts ``cm3leon serve --ckpt <out>/model`` (a real process on a local port) with the
demo's tiny CLIP and memory bank, sends ``--requests`` text-to-image requests at once (captions of fresh one-shape
scenes seen in training) and judges the returned PNGs with the shapes attribute checker, in three ways: the prompt
alone; with the prompt's nearest training document placed before it (``"retrieve"``, as the demo model was
trained); and the best of 4 candidates of the prompt alone by CLIP score (``"rerank"``). Then it starts the server
again with ``--max-batch-size 1`` and sends the first set once more, to time what batching concurrent requests saves.
``report.json`` holds the accuracies and times, ``grid.png`` the first images of each way.

``<out>/args.json`` records the arguments. A rerun into the same ``--out`` with the same arguments exports the model
again over its own ``<out>/model`` and replaces the report; one with other arguments (the demo run, ``--requests``,
``--max-batch-size``, ``--seed``) is refused before it writes anything: give another ``--out``, or ``--fresh`` to
delete the old output first. A non-empty ``--out`` that is not an output of this example is never written into.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from PIL import Image

from cm3leon_lightning import export_model
from cm3leon_lightning.data import shapes
from cm3leon_lightning.demo_cli import positive_int
from cm3leon_lightning.demo_eval import attribute_scores
from cm3leon_lightning.demo_report import stage_results
from cm3leon_lightning.files import ARGS_FILE, check_output_dir, make_output_dir, write_text_whole
from cm3leon_lightning.signals import deferred_from_finalizer


def demo_paths(run: Path) -> dict[str, str]:
    """The files of a finished demo run that the server needs (raises FileNotFoundError naming what is missing)."""
    stages = stage_results(run)
    bank = run / "prepare" / "work" / "bank" / "index"
    if not (bank / "index.faiss").is_file():
        raise FileNotFoundError(f"{bank} holds no memory bank: the demo's prepare stage did not finish")
    files = {
        "ckpt": stages["train"]["checkpoint"], "tokenizer": stages["tokenizer"]["path"],
        "vqgan": stages["vqgan"]["path"], "clip_weights": stages["clip"]["path"], "bank": bank,
        "shards": run / "prepare" / "train",
    }  # fmt: skip
    # The stages record paths relative to where the demo ran (here too); the server runs in --out.
    paths = {name: str(Path(path).resolve()) for name, path in files.items()}
    return {**paths, "clip": stages["clip"]["model"], "k": str(stages["train"]["max_retrieved"])}


SETTINGS = {"run": "run", "requests": "--requests", "max_batch_size": "--max-batch-size", "seed": "--seed"}


def prepare_out(out: Path, settings: dict[str, Any], ckpt: str, fresh: bool) -> None:
    """Check that ``out`` is new, empty, or an output of this example made with the same ``settings`` (the keys of
    :data:`SETTINGS`, recorded under ``"serve"`` in its ``args.json``) whose ``model`` directory, if any, is its export
    of ``ckpt``; with ``fresh``, delete such an output whatever its settings.

    Raises:
        ValueError: naming ``--out`` or ``--fresh``: a file; a non-empty directory without this example's
            ``args.json`` (never written into or deleted); an output of other settings (its report would be
            replaced); a ``model`` directory that is not an export of ``ckpt`` (never replaced).
    """
    check_output_dir(out, "serve", settings, SETTINGS, fresh, "examples/serve_shapes.py", "settings",
                     "its report.json and grid.png")  # fmt: skip
    if fresh or not out.exists():
        return
    model = out / "model"
    try:
        source = json.loads((model / "config.json").read_text(encoding="utf-8"))["source"]["checkpoint"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        source = None
    if model.exists() and source != ckpt:
        raise ValueError(f"--out: {model} is not this example's export of {ckpt}; refusing to replace it: move it "
                         "away, or pass --fresh to delete --out and start over")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn ``signals`` into ``SystemExit(128 + signal)`` in the block, so that its ``finally`` clauses run (Python's
    default for SIGTERM and SIGHUP ends the process at once); the previous handlers are restored after it."""

    def stop(signum: int, frame: FrameType | None) -> None:
        if deferred_from_finalizer(signum, frame):  # raised in a __del__, SystemExit would be dropped: again soon
            return
        for s in signals:  # once: a second signal would cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def server(paths: dict[str, str], log: Path, *extra: str) -> Iterator[str]:
    """Run ``cm3leon serve`` on a free local port until the block ends, or this process is stopped by SIGTERM or
    SIGHUP (the server runs in a session of its own: a terminal's signals never reach it); yields the ``/predict``
    URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "cm3leon_lightning", "serve", "--ckpt", paths["model"], "--clip", paths["clip"],
           "--clip-pretrained",
           paths["clip_weights"], "--retrieve", paths["bank"], "--shards", paths["shards"], "--k", "0",
           "--accelerator", "cpu", "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    with exit_on_signals(), open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, env=os.environ.copy(), start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cm3leon serve did not start; its log:\n{log.read_text()[-3000:]}")
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read() == b"ok":
                        break
                except OSError:
                    time.sleep(0.3)
            yield f"http://127.0.0.1:{port}/predict"
        finally:
            proc.terminate()  # cm3leon serve stops its worker processes on SIGTERM
            with suppress(subprocess.TimeoutExpired):  # a hung server still has its process group killed below
                proc.wait(timeout=60)
            with suppress(ProcessLookupError):  # and should one be left, its process group goes with it
                time.sleep(1)
                os.killpg(proc.pid, signal.SIGKILL)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST one JSON request; the answer as a dict (an HTTP error raises, with the server's detail)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    try:
        return json.loads(urllib.request.urlopen(req, timeout=600).read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{e.code} for {body}: {e.read().decode()}") from e


def send_all(url: str, bodies: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """Send every request at once (one thread each); the answers in order and the seconds until the last arrived."""
    t = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(url, b), bodies))
    return answers, time.perf_counter() - t


def first_image(answer: dict[str, Any]) -> np.ndarray:
    """The answer's first PNG as ``(H, W, 3)`` uint8."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished demo run (runs/demo)")
    p.add_argument("--out", type=Path, default=Path("runs/serve"), help="output directory")
    p.add_argument("--requests", type=positive_int, default=48, help="requests sent at once")
    p.add_argument("--max-batch-size", type=positive_int, default=16, help="the batching server's --max-batch-size")
    p.add_argument("--seed", type=int, default=7, help="seed of the scenes (>= 0)")
    p.add_argument("--fresh", action="store_true", help="delete --out first (an output of this example, holding "
                   f"its {ARGS_FILE}) and start over; without it, a rerun with other arguments is refused")  # fmt: skip
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"argument --seed: expected an integer >= 0, got {args.seed}")
    try:
        paths, out = demo_paths(args.run), args.out
    except FileNotFoundError as e:
        p.error(f"run: {e}")
    settings = {"run": str(args.run.resolve()), **{k: getattr(args, k) for k in SETTINGS if k != "run"}}
    try:
        prepare_out(out, settings, paths["ckpt"], args.fresh)
        make_output_dir(out)  # a file on its path, no permission: named, not a traceback
    except ValueError as e:
        p.error(str(e))
    write_text_whole(out / ARGS_FILE, json.dumps({"serve": settings}, indent=1))
    # One directory to hand to the server: weights (safetensors, no optimizer state) + both tokenizers. Exported
    # again on a rerun (the demo may have trained a new checkpoint since): replacing only this example's own export.
    own_export = (out / "model").exists()  # prepare_out checked that it is the export of this checkpoint
    export_model(paths["ckpt"], out / "model", paths["tokenizer"], paths["vqgan"], force=own_export)
    paths["model"] = str((out / "model").resolve())
    rng = np.random.default_rng(args.seed)
    scenes = [shapes.sample_scene(rng, "train", two_shape_prob=0.0) for _ in range(args.requests)]
    prompts = [shapes.caption(sc, rng) for sc in scenes]
    k = int(paths["k"])
    ways = {
        "prompt": [{"prompt": t, "num_samples": 1} for t in prompts],
        "retrieve": [{"prompt": t, "num_samples": 1, "retrieve": k} for t in prompts] if k else [],
        "rerank": [{"prompt": t, "num_samples": 4, "rerank": True, "keep": 1} for t in prompts],
    }
    demo_settings = ["--cfg", "1.5", "--top-p", "0.6", "--batch-timeout", "0.5"]  # the demo's decoding choice
    report: dict[str, Any] = {"requests": args.requests, "retrieved_documents": k, "prompts": prompts[:4]}
    images = {}
    with server(paths, out / "server.log", *demo_settings, "--max-batch-size", str(args.max_batch_size)) as url:
        post(url, ways["prompt"][0])  # warm-up: the first decode allocates the cache
        for way, bodies in ways.items():
            if not bodies:
                continue
            answers, seconds = send_all(url, bodies)
            images[way] = np.stack([first_image(a) for a in answers])
            report[way] = {"seconds": seconds, **attribute_scores(images[way], scenes)}
            report[way]["retrieved_example"] = answers[0].get("retrieved", [])
    with server(paths, out / "server-1.log", *demo_settings, "--max-batch-size", "1") as url:
        post(url, ways["prompt"][0])
        _, report["prompt_one_at_a_time_seconds"] = send_all(url, ways["prompt"])
    report["batching_speedup"] = report["prompt_one_at_a_time_seconds"] / report["prompt"]["seconds"]
    rows = [np.concatenate(list(v[:8]), axis=1) for v in images.values()]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 3, len(rows) * rows[0].shape[0] * 3),
                                                         Image.NEAREST).save(out / "grid.png")  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for way in ways:
        if way in report:
            print(f"{way:<9} all attributes {report[way]['all']:.1%}  ({args.requests} requests in "
                  f"{report[way]['seconds']:.2f} s)")  # fmt: skip
    print(f"one at a time: {report['prompt_one_at_a_time_seconds']:.2f} s "
          f"(batched: {report['batching_speedup']:.1f}x the speed); wrote {out / 'report.json'}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
