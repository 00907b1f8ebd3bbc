"""A child process that ends with the launcher that started it (Linux).

The launcher spawns its children without a hook run between fork and exec: such a hook makes
Python fork() instead of vfork(), and fork() runs gRPC's fork handlers, which restart its
poller thread in the child; Python then closes that poller's epoll fd before exec and the
thread aborts the child (grpc/grpc#43055). So each child asks for the signal itself."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "PYTGI_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def parent_env() -> dict[str, str]:
    """The environment entry that makes a child started from this process call die_with_parent."""
    return {PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """SIGTERM to this process when the thread that started it ends, if started with parent_env.

    The entry is removed here so this process's own children do not inherit it (their parent is
    not the launcher). When the launcher ended before the request, the signal is sent now."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # orphaned before the request: no signal would come
        os.kill(os.getpid(), signal.SIGTERM)
