"""Signal handlers that raise: deferred while the signal interrupted a finalizer.

A Python signal handler runs in whatever frame the main thread is executing. When that frame is a ``__del__`` (the
garbage collector runs them at any allocation), an exception raised by the handler is printed ("Exception ignored in
... __del__") and dropped, and the program goes on as if no signal had come: a ``kill PID`` during a fit then ended
it with status 0 through Lightning's own handler (found by ``tests/test_examples.py`` on a CI machine). Handlers that
raise call :func:`deferred_from_finalizer` first. This module imports no Lightning.
"""

from __future__ import annotations

import os
import threading
from types import FrameType

RESEND_AFTER = 0.01
"""Seconds after which a signal that interrupted a finalizer is sent again (finalizers are short)."""


def in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the frame a signal handler interrupted) or a frame that called it is a ``__del__``: an
    exception raised there never reaches the code the finalizer interrupted."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def deferred_from_finalizer(signum: int, frame: FrameType | None, delay: float = RESEND_AFTER) -> bool:
    """In a signal handler: when ``frame`` runs in a finalizer (:func:`in_finalizer`), send ``signum`` to this process
    again after ``delay`` seconds, from a helper thread, and return True: the handler returns without raising and
    raises on the second delivery, outside the finalizer. Else return False (the handler may raise now)."""
    if not in_finalizer(frame):
        return False
    pid = os.getpid()
    timer = threading.Timer(delay, os.kill, (pid, signum))
    timer.daemon = True  # never keeps the process alive
    timer.start()
    return True
