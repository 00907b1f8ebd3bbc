"""A supervised child process: its stderr is forwarded line by line and its tail kept."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One process (`name` like "shard 0" or "router"); dies with the launcher."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str] | None = None, tail: int = 20
    ) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._forward, daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
        sys.stderr.flush()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def last_lines(self) -> str:
        self._reader.join(timeout=2)  # let the last lines arrive
        return "\n".join(self.tail)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """True when the process ended within `timeout`; otherwise it is killed."""
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return False
