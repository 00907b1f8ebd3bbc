"""The /proc readers the benchmark tools use: children by role, peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys

from common.procinfo import child_roles, peak_rss_mib, pids_with_argument

# Says so once the interpreter runs: only then are its command line and its RSS its own
# (a child read right after fork or exec showed 0.46 MiB of peak RSS in CI).
SLEEP = "import time; print('up', flush=True); time.sleep(60)"


def _spawn(*words: str, rank: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if rank is not None:
        env["RANK"] = rank
    return subprocess.Popen(
        [sys.executable, "-c", SLEEP, *words], env=env, stdout=subprocess.PIPE, text=True
    )


def test_child_roles_name_router_and_shard_ranks():
    children = [
        _spawn("router.cli"),
        _spawn("shard.cli", rank="2"),
        _spawn("shard.cli"),  # no RANK: a single shard is rank 0
        _spawn("something.else", rank="5"),
    ]
    ours = {child.pid for child in children}  # other tests' servers may be children too
    try:
        for child in children:
            assert child.stdout.readline() == "up\n"
        roles = {pid: role for pid, role in child_roles(os.getpid()).items() if pid in ours}
        assert roles == {
            children[0].pid: "router",
            children[1].pid: "shard rank 2",
            children[2].pid: "shard rank 0",
        }
        assert pids_with_argument("something.else") == [children[3].pid]
        rss = peak_rss_mib(children[0].pid)
        assert rss is not None and rss > 1
    finally:
        for child in children:
            child.kill()
            child.wait()
            child.stdout.close()
    assert not ours & set(child_roles(os.getpid()))
    assert peak_rss_mib(children[0].pid) is None  # gone
