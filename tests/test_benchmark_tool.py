"""pytgi-benchmark against a real shard process: every table and consistent numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def shard_uds(tiny_model_dir, tmp_path_factory):
    uds = str(tmp_path_factory.mktemp("bench") / "s")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shard.cli",
            "serve",
            str(tiny_model_dir),
            "--uds-path",
            uds,
            "--kv-cache-memory",
            "64MiB",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(uds + "-0"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    yield uds
    proc.terminate()
    proc.wait(timeout=30)


def test_benchmark_tables_and_json(shard_uds, tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytgi_benchmark.cli",
            "--tokenizer-name",
            str(tiny_model_dir),
            "--uds-path",
            shard_uds,
            "-b",
            "1",
            "-b",
            "4",
            "-s",
            "12",
            "-d",
            "5",
            "-r",
            "3",
            "-w",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for title in (
        "prefill latency (ms)",
        "prefill throughput (tokens/s)",
        "decode latency per token (ms)",
        "decode throughput (tokens/s)",
    ):
        assert title in result.stdout
    assert result.stdout.count("| batch 4 |") == 4
    assert "benchmarking" in result.stderr  # the progress bar
    assert "peak RSS of shard pid" in result.stdout
    data = json.loads(out.read_text())
    assert data["peak_rss_mib"] and all(v > 50 for v in data["peak_rss_mib"].values())
    for entry, batch in zip(data["results"], (1, 4), strict=True):
        assert entry["batch_size"] == batch
        assert len(entry["prefill_latency_ms"]) == 3
        assert len(entry["decode_step_latency_ms"]) == 3 * 4  # decode_length - 1 steps per run
        for latency, throughput in zip(
            entry["prefill_latency_ms"], entry["prefill_throughput_tokens_per_s"], strict=True
        ):
            assert latency > 0 and throughput == pytest.approx(batch * 12 / (latency / 1000))
        assert all(v > 0 for v in entry["decode_throughput_tokens_per_s"])


def test_sampling_flags_and_unreachable_shard(shard_uds, tiny_model_dir, tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytgi_benchmark.cli",
            "--tokenizer-name",
            str(tiny_model_dir),
            "--uds-path",
            shard_uds,
            "-b",
            "2",
            "-s",
            "4",
            "-d",
            "3",
            "-r",
            "1",
            "--do-sample",
            "--temperature",
            "0.7",
            "--top-k",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytgi_benchmark.cli",
            "--tokenizer-name",
            "x",
            "--uds-path",
            str(tmp_path / "none"),
            "-b",
            "1",
            "-r",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
