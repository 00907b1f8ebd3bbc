"""The README's query examples run against a real server (set-up and test commands run in CI;
the launcher commands in tests/test_launcher.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
QUERY = README.split("## Query", 1)[1].split("### Routes", 1)[0]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", QUERY, re.S)


def test_curl_examples(server):
    commands = [
        c.replace("\\\n", " ")
        for block in _blocks("sh")
        for c in block.replace("\\\n", " ").splitlines()
        if c.strip()
    ]
    assert len(commands) == 4
    for command in commands:
        command = command.replace("localhost:3000", server.url.removeprefix("http://"))
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and '"error"' not in result.stdout and result.stdout, command


def test_python_examples(server):
    blocks = _blocks("python")
    assert len(blocks) == 2
    for code in blocks:
        code = code.replace("http://127.0.0.1:3000", server.url)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()


def test_bench_script_runs_small(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "shard_vs_transformers.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--batch-sizes",
            "1,2",
            "--steps",
            "2",
            "--prefill-prompt",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for row in ("decode ms/step, batch 1", "decode ms/step, batch 2", "prefill tokens/s"):
        assert row in result.stdout
