"""``cm3leon demo``'s command line: flags, their checks and the entry point (the stages are in
:mod:`cm3leon_lightning.demo`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from cm3leon_lightning.demo import CONFIG_DIR, MAX_SEED, SIZES, StageInterrupted, Terminated, run
from cm3leon_lightning.signals import deferred_from_finalizer


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in ``[0, MAX_SEED]`` (the fits' ``seed_everything`` refuses a larger one,
    after the data stage)."""
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer <= {MAX_SEED} (what Lightning's seed_everything "
                                         f"takes), got {text!r}")  # fmt: skip
    return value


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the block, SIGTERM (``kill PID``) raises :class:`~cm3leon_lightning.demo.Terminated`, so a stage outside a
    fit stops with a line naming it too (Python's default ends the process at once, silently; Lightning's handler,
    installed during a fit, calls this one after its own). A SIGTERM that interrupts a ``__del__`` raises once the
    finalizer returned (:mod:`cm3leon_lightning.signals`). The previous handler is restored after the block."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        if not deferred_from_finalizer(signum, frame):  # raised in a __del__, it was dropped and the run went on
            raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    """The ``cm3leon demo`` flags."""
    p = argparse.ArgumentParser(
        prog="cm3leon demo",
        description="Train a small CM3Leon end to end on synthetic shapes (data, tokenizers, CLIP, prepare, fit, "
        "evaluation) and write samples.png, metrics.json and report.md.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="'mini' runs in under a minute (tests)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first and redo every stage")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the data and of every training run")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: the CPUs it may use)")
    p.add_argument("--configs", default=str(CONFIG_DIR), help="the configs/ directory (default: the repository's)")
    p.add_argument("--train-steps", type=positive_int, default=None, help="override the CM3Leon training steps")
    p.add_argument("--quiet", action="store_true", help="no stage lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cm3leon demo``; returns the exit status (2, with a one-line error, for an ``--out`` that is
    not a demo run or a ``--configs`` without the demo's YAML files; 130 or 143, in one line, for a run stopped by
    Ctrl-C or SIGTERM)."""
    args = build_parser().parse_args(argv)
    try:
        with sigterm_raises():
            run(args.out, args.size, args.fresh, args.seed, args.threads, args.configs, not args.quiet,
                args.train_steps)  # fmt: skip
    except StageInterrupted as e:
        print(f"cm3leon demo: {e}", file=sys.stderr)
        return e.status
    except (KeyboardInterrupt, Terminated) as e:  # between stages
        how, status = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        print(f"cm3leon demo: stopped by {how}; the finished stages are kept: rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return status
    except (ValueError, FileNotFoundError) as e:
        if not str(e).startswith(("--out", "--fresh", "--configs", "--threads", "--train-steps", "--seed")):
            raise  # a failing stage: its traceback is what the user needs
        print(f"cm3leon demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
