"""Peak resident memory of processes, read from /proc (Linux); used by the benchmark tools."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of `pid` in MiB, or None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pids_with_argument(argument: str) -> list[int]:
    """Processes whose command line contains `argument` as one of its words."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_text().split("\0")
        except OSError:
            continue
        if argument in words:
            found.append(int(entry.name))
    return sorted(found)


def child_roles(pid: int) -> dict[int, str]:
    """The pytgi processes `pid` started, by pid: "router", or "shard rank N"."""
    roles = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            words = (entry / "cmdline").read_text().split("\0")
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == pid else []
        except OSError:
            continue
        if parent != pid:
            continue
        if "router.cli" in words:
            roles[int(entry.name)] = "router"
        elif "shard.cli" in words:
            rank = next((v[5:].decode() for v in environ if v.startswith(b"RANK=")), "0")
            roles[int(entry.name)] = f"shard rank {rank}"
    return roles
