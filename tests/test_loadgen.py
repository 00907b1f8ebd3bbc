"""The load generator against a real server: every metric, consistent token counts, a plot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from loadgen import run_load, summarize  # noqa: E402
from workloads import fixed, shared_prefix, single_token_words, varied  # noqa: E402

from tests.conftest import Server  # noqa: E402


@pytest.fixture(scope="module")
def load_server(tiny_model_dir, tmp_path_factory):
    srv = Server(
        tiny_model_dir,
        tmp_path_factory.mktemp("load"),
        router_args=["--max-total-tokens", "1024", "--max-input-tokens", "600"],
    )
    yield srv
    srv.stop()


def test_workloads_are_seeded_and_sized(tiny_model_dir):
    words = single_token_words(tiny_model_dir)
    assert len(words) > 20
    assert fixed(4, 1, words) == fixed(4, 1, words) and fixed(4, 1, words) != fixed(4, 2, words)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for request in fixed(3, 0, words) + varied(3, 0, words) + shared_prefix(3, 0, words):
        assert (
            len(tokenizer.encode(request.prompt, add_special_tokens=False).ids)
            == request.prompt_tokens
        )
    assert all(
        16 <= r.prompt_tokens <= 512 and 16 <= r.max_new_tokens <= 256 for r in varied(50, 0, words)
    )


@pytest.mark.parametrize("api", ["tgi", "completions", "chat"])
def test_closed_loop_metrics_and_token_counts(load_server, tiny_model_dir, api):
    requests = fixed(12, 0, single_token_words(tiny_model_dir), prompt=16, new=8)
    results, seconds = asyncio.run(run_load(load_server.url, api, requests, 4, None, 60))
    summary = summarize(results, seconds, "concurrency 4")
    assert summary["completed"] == 12 and not summary["failures"]
    assert summary["output_tokens"] == 12 * 8  # the server's own count, EOS ignored
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(summary[key]) == {"mean", "median", "p90", "p99"}
        assert summary[key]["median"] > 0
    assert summary["ttft_s"]["median"] <= summary["e2e_s"]["median"]
    assert (
        summary["request_throughput"] > 0
        and summary["total_token_throughput"] > summary["output_token_throughput"]
    )


def test_open_loop_and_cli_outputs(load_server, tiny_model_dir, tmp_path):
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    result = subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), "--url", load_server.url, "--workload", "varied", "--tokenizer", str(tiny_model_dir),
         "--requests", "8", "--rate", "4", "--concurrency", "2", "--max-seconds", "60", "--json", str(out), "--plot", str(png),
         "--pid", f"router={load_server.router.pid}", "--pid", f"shard={load_server.shard.pid}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| rate 4.0 |" in result.stdout and "| concurrency 2 |" in result.stdout
    report = json.loads(out.read_text())
    summaries = report["summaries"]
    assert report["peak_rss_mib"]["router"] > 20 and report["peak_rss_mib"]["shard"] > 50
    assert "peak RSS of router" in result.stdout
    assert [s["completed"] for s in summaries] == [8, 8]
    assert png.stat().st_size > 1000


def test_failures_are_counted_not_dropped(tiny_model_dir):
    requests = fixed(3, 0, single_token_words(tiny_model_dir), prompt=4, new=2)
    results, seconds = asyncio.run(run_load("http://127.0.0.1:9", "tgi", requests, 2, None, 10))
    summary = summarize(results, seconds, "dead server")
    assert summary["completed"] == 0 and sum(summary["failures"].values()) == 3
