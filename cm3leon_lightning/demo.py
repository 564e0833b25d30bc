"""``cm3leon demo`` (what ``make demo`` runs): the whole CM3Leon recipe, end to end, on synthetic shapes, on a CPU.

Stages (each cached in ``<out>/<stage>/stage.json`` with a hash of its settings, its config files and the stages
before it, so a rerun reuses every finished stage; a stage that runs again reruns the stages after it; ``--fresh``
starts over)::

    data       seeded shapes pairs (data/shapes.py) written as an image folder with caption sidecars
    tokenizer  byte-level BPE on the training captions (TextTokenizer)
    vqgan      a small VQGAN: cm3leon fit --config configs/demo/vqgan.yaml, exported with save_pretrained
    clip       a tiny CLIP retriever: cm3leon fit --config configs/demo/clip.yaml (ClipModule)
    prepare    cm3leon prepare on the image folder: BPE + VQ codes + CLIP retrieval -> shards
    train      cm3leon fit --config configs/experiments/demo_shapes.yaml (CM3LeonModule on the shards)
    evaluate   text-to-image (no guidance, CFG, CD-K, CFG + CLIP re-ranking), captioning, retrieval loss, FID
    report     samples.png, metrics.json and report.md in <out>

The three ``fit`` stages run the same LightningCLI a user runs (in this process, ``CM3LeonCLI(args=[...])``) on the
YAML files named above; the demo only overrides paths and, for ``--size mini``, sizes. This module runs and caches
the stages; the stages themselves and their registry (order, dependencies, settings) are in
:mod:`cm3leon_lightning.demo_stages`, the command line in :mod:`cm3leon_lightning.demo_cli`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cm3leon_lightning.demo_stages import DEPENDS, PREPARE_SETTINGS, STAGE_FIELDS, STAGE_FILES, STAGE_FUNCS, STAGES
from cm3leon_lightning.files import make_output_dir, write_text_whole

MARKER = "stage.json"
RUN_FILE = "demo.json"
REPORT_FILES = ("samples.png", "metrics.json", "report.md")  # the report stage's outputs, at the top of the run
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MAX_SEED = 2**32 - 1  # the largest seed Lightning's seed_everything (the fit stages' --seed_everything) takes


class StageInterrupted(Exception):
    """A stage stopped by Ctrl-C or SIGTERM (not a failure): the stages before it are kept, a rerun resumes there.

    Attributes:
        stage: the stage that was running.
        status: the exit status ``cm3leon demo`` returns (128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, stage: str, how: str, status: int) -> None:
        super().__init__(f"stopped by {how} in the {stage} stage; the finished stages are kept: rerun the same "
                         "command to resume")  # fmt: skip
        self.stage, self.status = stage, status


class Terminated(SystemExit):
    """SIGTERM, raised by the handler ``cm3leon demo`` installs (:func:`cm3leon_lightning.demo_cli.sigterm_raises`):
    Python's default ends the process at once, with no word of the stage it stopped."""

    def __init__(self) -> None:
        super().__init__(143)


def _stop_signal(error: BaseException) -> tuple[str, int] | None:
    """How a stage was stopped, if it was: Ctrl-C (KeyboardInterrupt, or Lightning's ``sys.exit(1)`` after it) or
    SIGTERM (:class:`Terminated`, or Lightning's ``SIGTERMException``, a ``SystemExit`` with no code: the run would
    otherwise exit with 0)."""
    if isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
        return "Ctrl-C", 130
    if isinstance(error, Terminated) or type(error).__name__ == "SIGTERMException":  # lightning.pytorch.utilities
        return "SIGTERM", 143
    return None


@dataclass(frozen=True)
class DemoSize:
    """How big a demo run is. ``default`` is the real demo; ``mini`` runs in seconds (tests).

    Attributes:
        n_train: training image-caption pairs generated (seen colour-shape combinations only).
        n_heldout: held-out pairs generated (every one uses a colour-shape pair never seen in training).
        image_size: image side in pixels.
        tokenizer_vocab: target BPE vocabulary size (captions and instruction texts need fewer merges than this).
        vqgan_steps: VQGAN training steps (``None``: the config file's ``max_steps``).
        clip_steps: CLIP training steps (``None``: the config file's).
        train_steps: CM3Leon training steps (``None``: the config file's).
        batch_overrides: extra ``--key=value`` arguments for the three fits (the mini size shrinks batches).
        samples_per_shard: documents per prepared shard.
        val_fraction: share of the training pairs held out as validation documents (retrieval loss, FID).
        eval_prompts: prompts per split (seen / held-out combinations) for text-to-image.
        samples_per_prompt: images generated per prompt and method (re-ranking picks one of them).
        caption_images: images captioned per split (validation / held-out combinations).
        loss_docs: validation documents scored with and without retrieved documents.
        grid_prompts: prompts shown in the sample grid: ``grid_prompts // 2`` (at least one) from each split.
    """

    n_train: int = 8000
    n_heldout: int = 400
    image_size: int = 32
    tokenizer_vocab: int = 512
    vqgan_steps: int | None = None
    clip_steps: int | None = None
    train_steps: int | None = None
    batch_overrides: tuple[str, ...] = ()
    samples_per_shard: int = 1000
    val_fraction: float = 0.05
    eval_prompts: int = 40
    samples_per_prompt: int = 8
    caption_images: int = 100
    loss_docs: int = 200
    grid_prompts: int = 8

    def __post_init__(self) -> None:
        """Reject sizes no stage can run with, naming the field (a bad size would otherwise fail minutes later)."""
        for name, value in vars(self).items():
            steps, other = name.endswith("_steps"), name in ("batch_overrides", "val_fraction")
            if not other and not (steps and value is None) and not _is_count(value):
                raise ValueError(f"DemoSize.{name} must be {'None or ' * steps}an integer >= 1, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DemoSize.val_fraction must lie in (0, 1), got {self.val_fraction!r}")


def _is_count(value: Any) -> bool:
    """Whether ``value`` is an int >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(),
    "mini": DemoSize(
        n_train=96, n_heldout=16, tokenizer_vocab=320, vqgan_steps=2, clip_steps=2, train_steps=2,
        batch_overrides=("--data.init_args.batch_size=4",), samples_per_shard=48, val_fraction=0.2, eval_prompts=3,
        samples_per_prompt=2, caption_images=4, loss_docs=4, grid_prompts=3,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ stage cache
def settings_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Context:
    """What every stage sees: the run directory, the size, the config directory and the finished stages' results."""

    out: Path
    size: DemoSize
    configs: Path
    seed: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # stage -> hash of its marker: which run of it made its outputs
    verbose: bool = True
    progress: bool = True
    fit_callbacks: list[Any] = field(default_factory=list)  # extra callbacks for this process's next fit

    def stage_dir(self, name: str) -> Path:
        """The directory of stage ``name``."""
        return self.out / name

    def log(self, message: str) -> None:
        """Print a progress line."""
        if self.verbose:
            print(message, flush=True)


def stage_key(ctx: Context, name: str) -> str:
    """The hash that decides whether stage ``name`` must rerun (its settings and its dependencies' hashes)."""
    deps = {d: ctx.hashes[d] for d in DEPENDS[name]}
    return settings_hash({"stage": name, "settings": stage_settings(ctx, name), "upstream": deps})


def upstream_runs(ctx: Context, name: str) -> dict[str, str]:
    """Which runs of the stages ``name`` reads made their outputs (the hashes of their markers)."""
    return {d: ctx.runs[d] for d in DEPENDS[name]}


def load_cached(ctx: Context, name: str) -> dict[str, Any] | None:
    """The saved marker of stage ``name`` if it is complete, its hash is current and the stages it reads have not run
    again since (their outputs may differ: a VQGAN trained again gives other codes than the prepared shards hold),
    else None. A marker written before ``upstream`` was recorded is trusted unless one of theirs is newer."""
    marker = ctx.stage_dir(name) / MARKER
    if not marker.is_file():
        return None
    try:
        saved = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):  # a marker cut short: the stage reruns
        return None
    if not isinstance(saved, dict) or saved.get("hash") != stage_key(ctx, name):
        return None
    if "upstream" not in saved:  # a marker of an older version: a stage before it whose marker is newer ran since
        mtime = marker.stat().st_mtime_ns
        if any((ctx.stage_dir(d) / MARKER).stat().st_mtime_ns > mtime for d in DEPENDS[name]):
            return None
    elif saved["upstream"] != upstream_runs(ctx, name):
        return None
    result = saved.get("result") if isinstance(saved.get("result"), dict) else {}
    recorded = [v for v in result.values() if isinstance(v, str) and os.path.isabs(v)]  # its outputs' paths
    # one deleted (report.md...), or one in another directory (a copied run's marker names the original's files,
    # which a rerun there may replace): the stage reruns
    return saved if all(Path(v).exists() and Path(v).is_relative_to(ctx.out) for v in recorded) else None


def run_stage(ctx: Context, name: str, announce_cached: bool = True) -> dict[str, Any]:
    """Run stage ``name`` unless its marker holds the current hash; record its result and hash in ``ctx``.

    The stage's directory is emptied first and the marker written last, so a killed stage reruns from scratch; the
    top-level report files go too, so a run that stops before its report stage leaves none that describe old stages.
    The marker records which runs of the stages before it it read (:func:`upstream_runs`).
    """
    title = f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name:<9}"
    key = stage_key(ctx, name)
    saved = load_cached(ctx, name)
    if saved is not None:
        if announce_cached:
            ctx.log(f"{title} cached ({saved['seconds']:.1f}s when it ran)")
    else:
        for stale in REPORT_FILES:  # the report of the stages being replaced: written again by the report stage
            (ctx.out / stale).unlink(missing_ok=True)
        directory = ctx.stage_dir(name)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        ctx.log(f"{title} running ...")
        t0 = time.perf_counter()
        try:
            result = STAGE_FUNCS[name](ctx, directory)
        except (SystemExit, KeyboardInterrupt) as e:  # stopped, or cm3leon fit refused its config (its error names
            stopped = _stop_signal(e)  # the key, not the file)
            if stopped is not None:
                raise StageInterrupted(name, *stopped) from e
            if isinstance(e, KeyboardInterrupt) or e.code in (0, None):
                raise
            files = ", ".join(str(f) for f in stage_configs(ctx, name)) or "its settings"
            raise RuntimeError(f"the {name} stage failed: cm3leon fit exited with status {e.code} (its error is "
                               f"above) on {files}") from e  # fmt: skip
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(f"cm3leon demo: the {name} stage failed (its partial output: {directory})")
            raise
        seconds, upstream = time.perf_counter() - t0, upstream_runs(ctx, name)
        saved = {"hash": key, "seconds": seconds, "result": result, "upstream": upstream}
        text = json.dumps(saved, indent=1, sort_keys=True)
        write_atomic(directory / MARKER, text)
        saved = json.loads(text)  # as a later run reads it (its hash names this run of the stage)
        ctx.log(f"{title} done in {saved['seconds']:.1f}s")
    ctx.results[name], ctx.hashes[name], ctx.runs[name] = saved["result"], key, settings_hash(saved)
    return saved["result"]


def exit_with_parent() -> None:
    """In a child process, exit (status 1) as soon as the parent process is gone, from a daemon thread: a parent
    killed outright (SIGKILL, or SIGTERM before Lightning's handler is installed) runs no clean-up, and a background
    stage outliving it would race the rerun that resumes the demo for the same files."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _background_stage(ctx: Context, name: str) -> None:
    """Child-process entry: run one stage on one thread, without progress bars (the parent shows its own); it ends
    with the parent (:func:`exit_with_parent`)."""
    import torch

    exit_with_parent()
    torch.set_num_threads(1)
    try:
        run_stage(replace(ctx, progress=False), name)
    except StageInterrupted as e:  # Ctrl-C reaches both processes: the parent says it once
        sys.exit(e.status)


# ------------------------------------------------------------------------------------------------ stage settings
def stage_configs(ctx: Context, name: str) -> list[Path]:
    """The config files (under ``ctx.configs``) stage ``name`` runs ``cm3leon fit`` with (:data:`STAGE_FILES`)."""
    return [ctx.configs / spec[len("configs:") :] for spec in STAGE_FILES.get(name, ()) if spec.startswith("configs:")]


def stage_settings(ctx: Context, name: str) -> dict[str, Any]:
    """What decides a stage's output: the size fields it reads, the seed, and the bytes of its config/code files."""
    sizes = {f: getattr(ctx.size, f) for f in STAGE_FIELDS[name]}
    files = {}
    for spec in STAGE_FILES.get(name, ()):
        where, rel = spec.split(":", 1)
        files[rel] = file_hash((ctx.configs if where == "configs" else Path(__file__).parent) / rel)
    extra = {"prepare": PREPARE_SETTINGS}.get(name, {})
    return {"size": sizes, "seed": ctx.seed, "files": files, "extra": extra}


# ------------------------------------------------------------------------------------------------ helpers
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a killed write leaves the old file or none."""
    write_text_whole(path, text)


def run_pair_in_parallel(ctx: Context, here: str, there: str) -> None:
    """Run two independent stages at once: ``there`` in a child process on one thread, ``here`` in this process.

    The small conv nets of the VQGAN and CLIP stages use a CPU core far better each on its own thread than together
    on two (the per-operation thread synchronisation costs more than the work).
    """
    import multiprocessing as mp

    import torch

    from cm3leon_lightning.callbacks.threads import ThreadsWhenFree

    child = None
    if load_cached(ctx, there) is None:
        child = mp.get_context("spawn").Process(target=_background_stage, args=(ctx, there), name=f"demo-{there}")
        child.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if child is not None else threads)
    if child is not None:  # take the child's core back when it ends (CLIP takes a tenth of the VQGAN's time)
        ctx.fit_callbacks = [ThreadsWhenFree(child, threads)]
    try:
        run_stage(ctx, here)
    finally:
        ctx.fit_callbacks = []
        torch.set_num_threads(threads)
        if child is not None:
            child.join()
    if child is not None and child.exitcode != 0:
        raise RuntimeError(f"the {there} stage failed in its process (exit code {child.exitcode}); see the log above")
    run_stage(ctx, there, announce_cached=child is None)  # reads the marker the child wrote


def is_demo_run(out: Path) -> bool:
    """Whether ``out`` holds the ``demo.json`` a demo run writes (a JSON object with ``size`` and ``argv``), not just
    some file of that name (a web project's ``demo.json``: ``--fresh`` would delete the project)."""
    try:
        recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(recorded, dict) and {"size", "argv"} <= recorded.keys()


def prepare_out(out: Path, fresh: bool, size: str, seed: int = 0) -> None:
    """Create the run directory; with ``fresh`` delete it first. Either way it must be new, empty or a demo run
    (:func:`is_demo_run`), else ValueError: the stages empty their subdirectories (``data``, ``train``, ...) before
    they run.
    """
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out: {out} is a file, not a directory")
        if any(out.iterdir()) and not is_demo_run(out):
            flag = "--fresh" if fresh else "--out"
            raise ValueError(f"{flag}: {out} is not empty and holds no {RUN_FILE} of cm3leon demo (not a demo run); "
                             "refusing to write into or delete it: give a new or empty directory")  # fmt: skip
        if fresh:
            shutil.rmtree(out)
    make_output_dir(out)  # a file on its path, no permission: named, not a traceback
    write_atomic(out / RUN_FILE, json.dumps({"size": size, "seed": seed, "argv": sys.argv[1:]}, indent=1))


def refuse_other_run(ctx: Context, size: str) -> None:
    """ValueError (naming ``--out``) if ``ctx.out`` holds a demo run whose data stage was made with other settings
    (another size or seed): every stage would be redone and the run lost; ``--fresh`` says to replace it."""
    try:
        saved = json.loads((ctx.stage_dir("data") / MARKER).read_text())
        recorded = json.loads((ctx.out / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # no finished data stage: nothing to lose
        return
    if not isinstance(saved, dict) or saved.get("hash") == stage_key(ctx, "data"):
        return
    was = f"size {recorded.get('size')!r}, seed {recorded.get('seed')}" if isinstance(recorded, dict) else "?"
    raise ValueError(f"--out: {ctx.out} holds a demo run of other data ({was}; asked for: size {size!r}, seed "
                     f"{ctx.seed}; or data/shapes.py changed): rerunning would replace every stage of it. Pass --fresh "
                     "to start over, or give another --out")  # fmt: skip


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a batch job's share, not the machine's ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run(
    out: str | os.PathLike = "runs/demo",
    size: str | DemoSize = "default",
    fresh: bool = False,
    seed: int = 0,
    threads: int | None = None,
    configs: str | os.PathLike = CONFIG_DIR,
    verbose: bool = True,
    train_steps: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the demo; returns the report stage's result (paths of the written files and the metrics).
    ``train_steps`` (``--train-steps``) replaces the size's CM3Leon training steps; ``demo.json`` still names the
    size."""
    import torch

    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
        size_name, size = size, SIZES[size]
    else:
        size_name = "custom"
    if train_steps is not None:
        if not _is_count(train_steps):
            raise ValueError(f"--train-steps must be an integer >= 1, got {train_steps!r}")
        size = replace(size, train_steps=train_steps)
    configs = Path(configs)
    for f in ("demo/vqgan.yaml", "demo/clip.yaml", "experiments/demo_shapes.yaml"):
        if not (configs / f).is_file():
            raise FileNotFoundError(
                f"--configs: {configs / f} not found (pass --configs <repository>/configs: a pip-installed package "
                "has no configs/)"
            )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if threads is not None and not _is_count(threads):
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    threads = threads or available_cpus()
    torch.set_num_threads(threads)
    out = Path(out).resolve()  # stage results record paths: absolute ones stay right from any working directory
    ctx = Context(out=out, size=size, configs=configs, seed=seed, verbose=verbose)
    if not fresh:
        refuse_other_run(ctx, size_name)
    prepare_out(out, fresh, size_name, seed)
    t0 = time.perf_counter()
    for name in STAGES:
        if name == "vqgan" and threads > 1:
            run_pair_in_parallel(ctx, "vqgan", "clip")
        elif name != "clip" or "clip" not in ctx.results:
            run_stage(ctx, name)
    ctx.log(f"demo finished in {time.perf_counter() - t0:.0f}s: {out / 'report.md'}")
    return ctx.results["report"]
