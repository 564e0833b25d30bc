"""A process group left to the interpreter's finalization is destroyed at exit instead.

torch's gloo backend (2.14 here) aborts a process that exits with its default process group still up: "terminate
called without an active exception", SIGABRT, in about half the runs of two spawned CPU processes on a 2-core machine
(pytorch/pytorch#190489). Lightning destroys the group at exit for NCCL only, so every ``ddp_spawn`` fit on the CPU
could end with ``ProcessExitedException`` after its last step, its work done. Importing ``cm3leon_lightning`` (every
spawned worker does, to unpickle its task) registers :func:`destroy_process_group_at_exit` with ``atexit``, which
Python runs before finalization. This module imports no Lightning, and not even torch until the process exits.
"""

from __future__ import annotations

import atexit
import sys

_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default ``torch.distributed`` process group if one is up (a no-op where torch.distributed was
    never imported, or the group was destroyed already, as Lightning does for NCCL)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.destroy_process_group()


def register() -> None:
    """Register :func:`destroy_process_group_at_exit` with ``atexit``, once per process."""
    global _REGISTERED
    if not _REGISTERED:
        atexit.register(destroy_process_group_at_exit)
        _REGISTERED = True
