"""A supervised child process: its stderr is forwarded line by line and its tail kept."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading

from common.lifetime import parent_env


class Child:
    """One process (`name` like "shard 0" or "router"); dies with the launcher.

    No preexec_fn: it would make Python fork() with gRPC's handlers (common/lifetime.py); the
    child calls die_with_parent itself, from the environment entry given here."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str] | None = None, tail: int = 20
    ) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {}), **parent_env()},
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
