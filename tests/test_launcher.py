"""The launcher end to end: serve, stop cleanly, die loudly, refuse bad start-ups."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_http

LAUNCHER = [sys.executable, "-m", "launcher.cli"]
FAST = [
    "--max-batch-prefill-tokens",
    "256",
    "--kv-cache-memory",
    "256MiB",
    "--max-total-tokens",
    "2048",
]


def descendants(pid: int) -> list[int]:
    """Every live process whose ancestry reaches `pid` (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def start(args, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*LAUNCHER, *args], stderr=open(log_path, "w"), stdout=subprocess.DEVNULL
    )


def test_serve_generate_and_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "launcher.log"
    proc = start(["--port", str(port), *FAST], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", [proc], timeout=300)
        children = descendants(proc.pid)
        assert len(children) >= 2  # a shard and the router
        socket_dir = re.search(r"unix://(/\S+)/shard-0", log.read_text()).group(1)
        assert oct(os.stat(socket_dir).st_mode & 0o777) == "0o700"
        reply = httpx.post(
            f"http://127.0.0.1:{port}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["generated_text"]
        chat = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "temperature": 0,
            },
            timeout=60,
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        assert "pytgi serving SmolLM2-135M-Instruct on http://127.0.0.1:" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not [
            p
            for p in children
            if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        ]
        assert not os.path.exists(socket_dir)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_shard_takes_everything_down(tmp_path):
    port = free_port()
    log = tmp_path / "launcher.log"
    uds = str(tmp_path / "sock")
    proc = start(["--port", str(port), "--shard-uds-path", uds, *FAST], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", [proc], timeout=300)
        children = descendants(proc.pid)
        shard_pid = next(
            p for p in children if "shard.cli" in Path(f"/proc/{p}/cmdline").read_text()
        )
        os.kill(shard_pid, signal.SIGKILL)
        started = time.monotonic()
        code = proc.wait(timeout=15)
        assert code != 0 and time.monotonic() - started < 15
        assert "shard 0 exited" in log.read_text()
        time.sleep(0.5)
        assert not [p for p in children if Path(f"/proc/{p}").exists()]
        assert not os.path.exists(uds + "-0")
    finally:
        if proc.poll() is None:
            proc.kill()


def _gpt2_dir(tmp_path: Path) -> Path:
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    return model


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["--model-id", str(t / "nope")], "does not exist"),
        (lambda t: ["--model-id", str(_gpt2_dir(t))], "supported: LlamaForCausalLM"),
        (
            lambda t: ["--max-input-tokens", "4000", "--max-total-tokens", "100"],
            "must be smaller than --max-total-tokens",
        ),
        (
            lambda t: ["--max-total-tokens", "4096", "--max-batch-total-tokens", "100"],
            "--max-batch-total-tokens (100)",
        ),
        (
            lambda t: ["--kv-cache-memory", "2MiB", "--max-total-tokens", "4096"],
            "raise --kv-cache-memory",
        ),
        (lambda t: ["--cuda-graphs", "1,x"], "--cuda-graphs takes batch sizes"),
        (
            lambda t: ["--attention", "flash-attn"],  # not installed on CPU machines
            "attention backend 'flash-attn' cannot be imported",
        ),
    ],
)
def test_startup_errors_are_one_clear_paragraph(tmp_path, make_args, message):
    args = ["--port", str(free_port()), "--max-batch-prefill-tokens", "64", *make_args(tmp_path)]
    started = time.monotonic()
    result = subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr
    assert "start-up failed" in result.stderr
    assert time.monotonic() - started < 60


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*LAUNCHER, "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr


def test_flags_read_from_environment():
    result = subprocess.run(
        [*LAUNCHER, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAX_INPUT_TOKENS": "10", "MAX_TOTAL_TOKENS": "5"},
    )
    assert result.returncode == 1 and "--max-input-tokens (10)" in result.stderr


def test_on_off_flags_read_from_environment():
    from launcher.cli import main

    envvars = {p.name: p.envvar for p in main.params}
    assert envvars["prefix_caching"] == "PREFIX_CACHING" and envvars["cpu_gemv"] == "CPU_GEMV"


def test_help_explains_every_flag():
    result = subprocess.run([*LAUNCHER, "--help"], capture_output=True, text=True, timeout=60)
    for flag in [
        "--model-id",
        "--num-shard",
        "--dtype",
        "--max-input-tokens",
        "--max-total-tokens",
        "--max-batch-prefill-tokens",
        "--max-batch-total-tokens",
        "--max-concurrent-requests",
        "--max-best-of",
        "--max-stop-sequences",
        "--max-top-n-tokens",
        "--waiting-served-ratio",
        "--max-waiting-tokens",
        "--max-batch-size",
        "--hostname",
        "--port",
        "--shard-uds-path",
        "--master-addr",
        "--master-port",
        "--cuda-memory-fraction",
        "--api-key",
        "--cors-allow-origin",
        "--payload-limit",
        "--json-output",
        "--graceful-termination-timeout",
    ]:
        assert flag in result.stdout, flag
