"""pytgi-launcher as a benchmark's subject: started, waited for until /health answers, and
stopped with SIGTERM (its exit code and teardown time kept)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO


@dataclass
class Launched:
    process: subprocess.Popen
    url: str
    log: IO[bytes]  # the launcher's stderr: quiet while it serves, shown if it fails to start
    exit_code: int | None = None
    teardown_s: float | None = None


@contextmanager
def launcher(port: int, *flags: str, start_timeout_s: float = 900) -> Iterator[Launched]:
    """`python -m launcher.cli --port PORT FLAGS...` serving, for the with-block."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--port", str(port), *flags], stderr=log
    )
    launched = Launched(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_healthy(launched, start_timeout_s)
        yield launched
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        launched.exit_code = process.wait(timeout=120)
        launched.teardown_s = round(time.monotonic() - started, 2)
        log.close()


def _fail(launched: Launched, why: str) -> None:
    launched.log.seek(0)
    tail = launched.log.read().decode(errors="replace").splitlines()[-30:]
    sys.exit("\n".join([*tail, why]))


def _wait_healthy(launched: Launched, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(launched.url + "/health", timeout=2)
            return
        except OSError:
            if launched.process.poll() is not None:
                _fail(
                    launched,
                    f"pytgi-launcher exited with {launched.process.returncode} at start-up",
                )
            if time.monotonic() > deadline:
                _fail(launched, f"pytgi-launcher not healthy after {timeout_s:.0f} s")
            time.sleep(0.5)
