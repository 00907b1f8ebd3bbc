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
