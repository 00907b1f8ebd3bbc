"""Shared fixtures: the real embedded model, and tiny random-weight models built in-process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

if os.environ.get("PYTGI_TEST_DEVICE", "cpu") == "cpu":
    # Triton kernels run on CPU tensors through Triton's interpreter (set before any import
    # of triton); benchmarks/gpu_check.sh sets PYTGI_TEST_DEVICE=cuda to run them compiled.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (once per machine)."""
    from shard.embedded import default_model_dir

    return default_model_dir()


def build_tiny_model(
    target: Path, tokenizer_dir: Path, architecture: str = "llama", **overrides
) -> Path:
    """A random-weight model of the given family with the SmolLM2 tokenizer, as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    settings = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
    )
    settings.update(overrides)
    config = transformers.CONFIG_MAPPING[architecture](**settings)  # by model_type
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases start at zero: random ones, so a dropped bias shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm_dir)


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The first port the kernel hands to bind(0) and to connect()'s own end."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now and stays free until a test binds it.

    Taken below the ephemeral range: a port from bind(0) can be handed again, by the kernel,
    to any socket that connects (gloo's ranks open many), before the process meant for it
    binds it (a router then exits with uvicorn's startup failure, 3). No port twice a run.
    """
    import random
    import socket

    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_http(url: str, procs, timeout: float = 180) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


class Server:
    """A shard and a router as real processes."""

    def __init__(self, model_dir: Path, workdir: Path, router_args=(), shard_args=()) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        uds = str(workdir / "shard")
        self.logs = workdir
        self.metrics_port: int | None = None  # --prometheus-port, when the caller gives one
        self.shard = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shard.cli",
                "serve",
                str(model_dir),
                "--uds-path",
                uds,
                "--kv-cache-memory",
                "256MiB",
                *shard_args,
            ],
            stderr=open(workdir / "shard.log", "w"),
        )
        import os
        import time

        deadline = time.monotonic() + 120
        while not os.path.exists(uds + "-0"):
            if self.shard.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "shard.log").read_text())
            time.sleep(0.2)
        self.router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "--master-shard-uds-path",
                uds,
                "--tokenizer-name",
                str(model_dir),
                "--port",
                str(self.port),
                "--max-batch-prefill-tokens",
                "256",
                "--max-total-tokens",
                "2048",
                "--max-input-tokens",
                "1500",
                *router_args,
            ],
            stderr=open(workdir / "router.log", "w"),
        )
        try:
            wait_http(self.url + "/health", [self.shard, self.router])
        except Exception as exc:
            self.stop()
            logs = (workdir / "router.log").read_text() + (workdir / "shard.log").read_text()
            raise RuntimeError(logs) from exc

    def metric(self, name: str) -> float:
        import httpx

        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        for proc in (self.router, self.shard):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except Exception:
                    proc.kill()


@pytest.fixture(scope="session")
def server(smollm_dir, tmp_path_factory):
    metrics_port = free_port()
    srv = Server(
        smollm_dir,
        tmp_path_factory.mktemp("server"),
        router_args=("--prometheus-port", str(metrics_port)),
    )
    srv.metrics_port = metrics_port
    yield srv
    srv.stop()


class LauncherServer:
    """`pytgi-launcher` as a real process; same interface as Server."""

    def __init__(self, workdir: Path, args=()) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "launcher.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "--port",
                str(self.port),
                "--master-port",
                str(free_port()),
                "--max-batch-prefill-tokens",
                "256",
                "--max-total-tokens",
                "2048",
                "--max-input-tokens",
                "1500",
                "--kv-cache-memory",
                "256MiB",
                *args,
            ],
            stderr=open(self.log, "w"),
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_http(self.url + "/health", [self.proc], timeout=300)
        except Exception as exc:
            self.stop()
            raise RuntimeError(self.log.read_text()) from exc

    metric = Server.metric

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
