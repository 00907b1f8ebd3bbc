"""The launcher's children: started without gRPC's fork handlers, ended with the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from common.lifetime import PARENT_PID_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_children_start_cleanly_beside_a_live_grpc_channel():
    """A launcher that has health-checked a shard over gRPC starts the router next. Started
    through fork() (as any preexec_fn makes Python do), about one child in a hundred was killed
    between fork and exec by gRPC's restarted poller (SIGABRT/SIGSEGV; grpc/grpc#43055)."""
    result = _run(
        """
        from concurrent import futures
        import grpc
        from launcher.process import Child

        server = grpc.server(futures.ThreadPoolExecutor(2))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        codes = []
        for _ in range(500):
            child = Child("true", ["/bin/true"])
            child.proc.wait(timeout=30)
            codes.append(child.returncode)
        print(sorted(set(codes)), sum(code != 0 for code in codes))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "[0] 0", result.stdout + result.stderr[-2000:]


def test_a_child_ends_when_the_launcher_is_killed(tmp_path):
    """SIGKILL to the launcher (no chance to clean up) still ends its children: each asks the
    kernel for SIGTERM at its parent's death (die_with_parent), and its own children do not
    inherit the request's environment entry."""
    pid_file = tmp_path / "child.pid"
    child_script = (
        "import os, time; from common.lifetime import die_with_parent; die_with_parent(); "
        f"assert {PARENT_PID_ENV!r} not in os.environ; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from launcher.process import Child; "
            f"Child('child', [sys.executable, '-c', {child_script!r}]); time.sleep(120)",
        ]
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child_pid):
            assert time.monotonic() < deadline, "the child outlived its launcher"
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait(timeout=10)


def test_a_child_whose_launcher_already_ended_stops_at_once():
    """The parent can end before the child's request: the check after it sends the signal."""
    result = subprocess.run(
        [sys.executable, "-c", "from common.lifetime import die_with_parent; die_with_parent()"],
        env={**os.environ, PARENT_PID_ENV: "1"},  # not this child's parent
        timeout=60,
    )
    assert result.returncode == -signal.SIGTERM


def test_without_the_entry_nothing_changes():
    result = _run(
        """
        import os
        from common.lifetime import die_with_parent, PARENT_PID_ENV
        os.environ.pop(PARENT_PID_ENV, None)
        die_with_parent()
        print("alive")
        """
    )
    assert result.stdout.strip() == "alive"


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's zombie is reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
