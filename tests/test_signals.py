"""Signal handlers that raise, when the signal interrupts a ``__del__``: the exception must reach the program, not
be printed and dropped (a SIGTERM during a fit's garbage collection let the run end with status 0)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import pytest

from cm3leon_lightning.demo import Terminated
from cm3leon_lightning.demo_cli import sigterm_raises
from cm3leon_lightning.signals import in_finalizer


class SignalsWhenCollected:
    """An object whose finalizer raises ``signum`` in this process, as a ``kill`` arriving during a collection."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        signal.raise_signal(self.signum)  # the Python handler runs here, in this frame


def wait_for_signal(seconds: float = 5.0) -> None:
    """Run the main thread for up to ``seconds`` (the deferred signal comes within milliseconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


@contextmanager
def dropped_exceptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """The exceptions Python printed and dropped ("Exception ignored in ...") in the block."""
    dropped: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_value))
    yield dropped


def test_in_finalizer_sees_a_del_frame_and_its_callees() -> None:
    frames: dict[str, FrameType] = {}

    def callee() -> None:
        frames["callee"] = sys._getframe()

    class Finalized:
        def __del__(self) -> None:
            frames["del"] = sys._getframe()
            callee()

    Finalized()
    assert in_finalizer(frames["del"]) and in_finalizer(frames["callee"])
    assert not in_finalizer(sys._getframe()) and not in_finalizer(None)


def test_sigterm_in_a_finalizer_raises_terminated_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with dropped_exceptions(monkeypatch) as dropped, pytest.raises(Terminated) as raised, sigterm_raises():
        SignalsWhenCollected(signal.SIGTERM)  # collected at once: its __del__ runs the handler
        wait_for_signal()
    assert raised.value.code == 143 and dropped == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_outside_a_finalizer_raises_at_once() -> None:
    with pytest.raises(Terminated), sigterm_raises():
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("the handler did not raise")


@contextmanager
def restored_handlers(*signums: int) -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_on_a_signal_that_interrupts_a_finalizer(monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    from cm3leon_lightning.serve.cli import stop_on_sigterm

    with restored_handlers(signal.SIGTERM, signal.SIGINT), dropped_exceptions(monkeypatch) as dropped:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            SignalsWhenCollected(signum)
            wait_for_signal()
    assert dropped == []
