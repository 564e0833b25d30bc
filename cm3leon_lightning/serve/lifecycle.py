"""How a ``cm3leon serve`` inference worker stops: the first SIGINT or SIGTERM ends it once the requests it holds are
answered, a second at once (:class:`StopWhenIdle`, a mixin of :class:`~cm3leon_lightning.serve.api.CM3LeonAPI`).
This module imports no LitServe.
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any


class StopWhenIdle:
    """Counts the requests a worker holds and, once installed, ends the worker only when it is idle."""

    batch_timeout: float
    _stop_signals: int = 0
    _stop_at: float = 0.0
    _pending: int = 0
    _activity: float = 0.0

    def install_stop_handlers(self) -> None:
        """Route SIGINT and SIGTERM to :meth:`_on_stop_signal` when called in a LitServe inference worker's main
        thread (elsewhere, e.g. the API used in-process, the default handlers stay)."""
        if "LITSERVE_WORKER_ID" in os.environ and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_stop_signal)
            signal.signal(signal.SIGTERM, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        """SIGINT or SIGTERM in an inference worker. Ctrl+C (or ``kill -- -PGID``) signals every process of the
        server at once, and the main process then stops the HTTP server, which waits for the requests in flight,
        and only then this worker (SIGTERM). Dying at once left those requests unanswered for 30 seconds before the
        connection dropped, also those LitServe had taken from the queue for a batch still filling. So the first
        signal ends the worker only once it is idle: no request decoded and not yet answered, and nothing for
        ``batch_timeout`` + 0.5 s since the signal or the last request (a batch still filling is decoded by then);
        a second signal ends it at once, as SIGTERM always did."""
        if self._stop_signals == 0:
            self._stop_signals, self._stop_at = 1, time.monotonic()
            threading.Thread(target=self._exit_when_idle, name="stop-when-idle", daemon=True).start()
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    def _exit_when_idle(self) -> None:
        """End this worker process once idle after the first stop signal (see :meth:`_on_stop_signal`)."""
        grace = float(getattr(self, "batch_timeout", 0.0) or 0.0) + 0.5
        while self._pending > 0 or time.monotonic() - max(self._stop_at, self._activity) < grace:
            time.sleep(0.05)
        logging.shutdown()
        os._exit(0)

    def _touch(self, change: int = 0) -> None:
        """Record activity and ``change`` the count of requests decoded but not yet answered."""
        self._pending = max(0, self._pending + change)
        self._activity = time.monotonic()


def stop_processes(processes: Sequence[Any], timeout: float = 5.0) -> None:
    """Terminate (SIGTERM) each of ``processes`` (``multiprocessing`` processes) still alive, then wait up to
    ``timeout`` seconds for them all and kill those left. ``cm3leon serve`` stopped by Ctrl+C or SIGTERM while its
    inference workers loaded the model (before LitServe's shutdown covers them) waited at exit until they had loaded
    it, minutes for a large model, and they then failed with a traceback."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
