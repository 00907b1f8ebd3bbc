"""gpu_check.sh's time-boxed steps: each gets at most its limit and what is left of the
script's budget; a step with too little left is skipped, a step past its time is failed."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, budget: int, spent: int) -> list[str]:
    """Runs `script` after sourcing the steps with `spent` of `budget` seconds gone."""
    prelude = (
        f"cd {ROOT}; START=$(( $(date +%s) - {spent} )); BUDGET={budget}; MIN_STEP=2\n"
        "source benchmarks/gpu_steps.sh\n"
    )
    coda = '\necho "FAILED=${FAILED[*]}"; echo "SKIPPED=${SKIPPED[*]}"'
    result = subprocess.run(
        ["bash", "-c", prelude + script + coda], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_steps_pass_fail_and_skip():
    out = _run("check ok 10 true\ncheck bad 10 false", budget=100, spent=0)
    assert any(line.startswith("=== [") and "ok (limit 10 s)" in line for line in out)
    assert "!!! bad failed (1)" in out
    assert out[-2:] == ["FAILED=bad", "SKIPPED="]


def test_a_step_never_outlasts_the_budget():
    start = time.monotonic()
    out = _run("check slow 60 sleep 30", budget=13, spent=10)  # 3 s left of the budget
    assert time.monotonic() - start < 10
    # whole seconds: 2 when the clock's second turns between the prelude and the step
    assert any(re.search(r"slow \(limit [23] s\)", line) for line in out), out
    assert "!!! slow failed (124)" in out and out[-2] == "FAILED=slow"


def test_a_step_with_too_little_left_is_skipped():
    out = _run("check late 60 touch /nonexistent/x\ncheck later 60 true", budget=11, spent=10)
    assert any("late skipped: 1 s of the 11 s budget left" in line for line in out)
    assert out[-2:] == ["FAILED=", "SKIPPED=late later"]


def test_steps_names_the_only_steps_that_run():
    script = "STEPS='b c'\ncheck a 10 false\ncheck b 10 true\ncheck c 10 false"
    out = _run(script, budget=100, spent=0)
    assert not any(" a " in line or line.endswith(" a") for line in out if line.startswith("==="))
    assert out[-2:] == ["FAILED=c", "SKIPPED="]
