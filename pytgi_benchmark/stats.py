"""Summary statistics and tables; plain Python."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "avg": statistics.fmean(values) if values else float("nan"),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def table(title: str, rows: list[tuple[str, dict[str, float]]], unit: str) -> str:
    columns = ["avg", "min", "max", "p50", "p90", "p99"]
    header = f"| {title} ({unit}) | " + " | ".join(columns) + " |"
    lines = [header, "|---" + "|---:" * len(columns) + "|"]
    for name, stats in rows:
        lines.append(f"| {name} | " + " | ".join(f"{stats[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)
