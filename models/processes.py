"""Worker processes that end with their parent: a `kill -9` of a receiver or a trainer leaves no orphan behind."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal

LOG = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent process dies, however it dies (call it first in the worker)."""
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        LOG.warning("cannot tie this worker to its parent's life (no prctl)")
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


__all__ = ["die_with_parent"]
