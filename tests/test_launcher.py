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
        assert "pytgi serving SmolLM2-135M-Instruct on http://0.0.0.0:" in log.read_text()
        assert "listening on 0.0.0.0 without --api-key" in log.read_text()
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
        (lambda t: ["--quantize", "marlin"], "--quantize marlin is not supported yet"),
        (lambda t: ["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2 is not supported"),
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
        busy.bind(("0.0.0.0", 0))  # the default --hostname, as TGI's
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*LAUNCHER, "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"cannot listen on 0.0.0.0:{port}" in result.stderr and "--port" in result.stderr


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


# Launcher flags the launcher itself consumes (or hands over by environment), and flags that
# reach a child under another name: (child, the child's parameter).
LAUNCHER_ONLY = {"num_shard", "master_addr", "master_port", "nnodes", "node_rank",
                 "startup_timeout", "shard_secret", "insecure_shard_ports", "model_id",
                 "revision", "huggingface_hub_cache"}  # fmt: skip
RENAMED = {
    "shard_uds_path": [("shard", "uds_path"), ("router", "master_shard_uds_path")],
    "shard_host": [("shard", "grpc_host")],
    "shard_port_base": [("shard", "grpc_port_base")],
    "shard_tls_cert": [("shard", "tls_cert_file")],
    "shard_tls_key": [("shard", "tls_key_file")],
    "shard_tls_ca": [("router", "shard_tls_ca_file")],
    "otlp_service_name": [("router", "otlp_service_name")],  # the shards': see below
    "prefix_caching": [("shard", "use_prefix_caching"), ("router", "prefix_caching")],
}


def _unusual_value(param):
    """A value other than the flag's default that its checks accept."""
    import click

    if param.is_flag or param.secondary_opts:
        return not param.default
    if param.multiple:
        return ("http://example.test",)
    if isinstance(param.type, click.Choice):
        return next(c for c in param.type.choices if c != param.default)
    special = {"kv_cache_memory": "300MiB", "cuda_graphs": "1,2", "device": "cpu",
               "cuda_memory_fraction": 0.5, "node_rank": 0, "nnodes": 1, "num_shard": 1,
               "quantize_group_size": 64,
               "max_input_tokens": 100, "max_total_tokens": 200, "max_batch_total_tokens": 400}  # fmt: skip
    if param.name in special:
        return special[param.name]
    if param.type.name in ("integer", "integer range"):
        return 7
    if param.type.name == "float":
        return 2.5
    return "value"


def _parse(command, args):
    """The child's own click parser over the arguments the launcher generated."""
    return command.make_context("child", list(args)).params


@pytest.mark.parametrize("name", [p.name for p in __import__("launcher.cli").cli.main.params])
def test_every_launcher_flag_reaches_its_process_with_its_value(tmp_path, monkeypatch, name):
    """Each flag in turn set to an unusual value: the generated child command lines parse
    with the children's own options, and the value arrives (or the launcher keeps it)."""
    from common.config import parse_size
    from launcher.cli import main
    from launcher.config import LauncherConfig
    from launcher.supervisor import Supervisor
    from router.cli import main as router_main
    from shard.cli import serve as shard_serve

    param = next(p for p in main.params if p.name == name)
    value = _unusual_value(param)
    options = {name: value}
    if name in ("shard_tls_cert", "shard_tls_key"):  # they go together
        options = {"shard_tls_cert": "value", "shard_tls_key": "value"}
    if name in ("shard_host", "shard_port_base", "shard_tls_cert", "shard_tls_key"):
        options = {"shard_host": "10.9.8.7", "nnodes": 2, "shard_secret": "s", **options}
    config = LauncherConfig(**{"model_id": str(tmp_path), **options})
    config.check_limits()
    supervisor = Supervisor(config, tmp_path)
    shard_args = supervisor._shard_args()
    router_args = supervisor._router_args()
    for key, env_value in supervisor._router_env().items():
        monkeypatch.setenv(key, env_value)
    parsed = {
        "shard": _parse(shard_serve, shard_args[shard_args.index("serve") + 1 :]),
        "router": _parse(router_main, router_args[3:]),
    }
    if name in LAUNCHER_ONLY:
        return
    targets = RENAMED.get(name) or [(c, name) for c in parsed if name in parsed[c]]
    assert targets, f"--{name} reaches neither the shard nor the router"
    for child, child_name in targets:
        got = parsed[child][child_name]
        if name == "kv_cache_memory":  # travels as bytes
            got_ok = parse_size(got) == parse_size(value)
        elif child_name.endswith("uds_path"):
            got_ok = got == value
        elif isinstance(value, tuple):
            got_ok = tuple(got) == value
        else:
            got_ok = got == value or str(got) == str(value)
        assert got_ok, (name, child, child_name, got, value)


def test_shards_trace_under_the_routers_service_name_stem(tmp_path):
    from launcher.config import LauncherConfig
    from launcher.supervisor import Supervisor
    from shard.cli import serve

    for name, expected in (("pytgi.router", "pytgi.shard"), ("my-llm", "my-llm.shard")):
        config = LauncherConfig(
            str(tmp_path), otlp_endpoint="http://c:4317", otlp_service_name=name
        )
        args = Supervisor(config, tmp_path)._shard_args()
        parsed = _parse(serve, args[args.index("serve") + 1 :])
        assert parsed["otlp_service_name"] == expected
        assert parsed["otlp_endpoint"] == "http://c:4317"


def test_no_cpu_gemv_starts(tiny_model_dir, tmp_path):
    """Once failed at start-up: the launcher passed the shard-only flag to the router."""
    from tests.conftest import LauncherServer

    args = ["--model-id", str(tiny_model_dir), "--no-cpu-gemv", "--max-total-tokens", "512",
            "--max-input-tokens", "100"]  # fmt: skip
    srv = LauncherServer(tmp_path, args)
    try:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        assert httpx.post(srv.url + "/generate", json=body, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_each_default_is_written_once():
    """The CLIs show and use the config dataclasses' defaults (the launcher's derive from the
    router's and the shard's), so no default can drift between processes."""
    from common.config import RouterConfig, ShardConfig, defaults
    from launcher.cli import main as launcher_main
    from launcher.config import LauncherConfig
    from router.cli import main as router_main
    from router.core import ServerSettings
    from shard.cli import serve

    # CLI values that the CLI turns into the config's type (a size, a list, a device)
    converted = {"kv_cache_memory", "cuda_graphs", "device", "uds_path"}
    checked = 0
    for command, config in ((launcher_main, LauncherConfig), (router_main, RouterConfig),
                            (serve, ShardConfig)):  # fmt: skip
        expected = defaults(config)
        for param in command.params:
            if param.name in expected and param.name not in converted:
                default = param.default
                if param.multiple:  # click's "unset" sentinel stands for an empty list
                    default = tuple(default) if isinstance(default, list | tuple) else ()
                elif getattr(param, "is_flag", False) and not isinstance(default, bool):
                    default = False  # a flag without a default is off
                assert default == expected[param.name], (command.name, param.name)
                checked += 1
    router, launcher = defaults(RouterConfig), defaults(LauncherConfig)
    for name, value in defaults(ServerSettings).items():
        assert router.get(name, value) == value, name
    for name in ("max_concurrent_requests", "payload_limit", "waiting_served_ratio"):
        assert launcher[name] == router[name]
    assert checked > 60


def test_the_router_config_survives_its_generated_command_line(tmp_path, monkeypatch):
    """The router's argv is generated from its config: parsed back by the router's own CLI
    (secrets from the environment) it gives the same config."""
    from common.config import RouterConfig
    from launcher.config import LauncherConfig
    from launcher.supervisor import Supervisor
    from router.cli import main as router_main

    config = LauncherConfig(
        model_id=str(tmp_path), max_batch_size=9, prefix_caching=False, json_output=True,
        cors_allow_origin=("http://a.test", "http://b.test"), api_key="k3y", port=4321,
        waiting_served_ratio=2.5, shard_tls_ca="/etc/ca.pem",
    )  # fmt: skip
    supervisor = Supervisor(config, tmp_path)
    for key, value in supervisor._router_env().items():
        monkeypatch.setenv(key, value)
    argv = supervisor._router_args()[3:]
    assert "k3y" not in argv and supervisor.secret not in argv
    options = router_main.make_context("router", argv).params
    options["cors_allow_origin"] = tuple(options["cors_allow_origin"])
    assert RouterConfig(**options) == supervisor.router_config()


@pytest.mark.parametrize(
    "options",
    [
        {},  # the defaults: device auto and every graph size reach the shard as such
        dict(dtype="bfloat16", device="cpu", max_input_tokens=99, kv_cache_memory="3MiB",
             cuda_memory_fraction=0.5, attention="sdpa", cuda_graphs="0", cpu_gemv=False,
             disable_custom_kernels=True, prefix_caching=False, master_port=29999,
             otlp_endpoint="http://c:4317", num_shard=3),
        dict(nnodes=2, node_rank=1, num_shard=4, shard_host="10.9.8.7", shard_port_base=6000,
             shard_secret="s3cret", shard_tls_cert="/c.pem", shard_tls_key="/k.pem",
             cuda_graphs="4,1"),
    ],
)  # fmt: skip
def test_each_shard_config_survives_its_generated_command_line(tmp_path, monkeypatch, options):
    """The shards' argv is generated from each rank's ShardConfig: parsed back by the
    shard's own CLI (the secret from the environment) it gives the same config."""
    from common.rpc import SECRET_ENV
    from launcher.config import LauncherConfig
    from launcher.supervisor import Supervisor
    from shard.cli import serve, shard_config

    config = LauncherConfig(model_id=str(tmp_path), **options)
    config.check_limits()
    supervisor = Supervisor(config, tmp_path)
    if supervisor.secret:
        monkeypatch.setenv(SECRET_ENV, supervisor.secret)
    for rank in config.ranks:
        expected = supervisor.shard_config(rank)
        argv = supervisor._shard_args(rank)
        assert not supervisor.secret or supervisor.secret not in " ".join(argv)
        params = serve.make_context("shard", argv[argv.index("serve") + 1 :]).params
        params.pop("json_output"), params.pop("dist_timeout")
        assert shard_config(**params) == expected, rank
        assert expected.rank == rank and expected.world_size == config.world_size
