"""Start-up in stages (shards, then router), supervision, and clean shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

import grpc

from common.config import (
    RouterConfig,
    ShardConfig,
    config_argv,
    parse_batch_sizes,
    parse_size,
)
from common.pb import pb, pb_grpc
from common.rpc import SECRET_ENV, secret_metadata
from launcher.config import LauncherConfig, LaunchError
from launcher.process import Child

log = logging.getLogger("launcher")
POLL_SECONDS = 0.2


def check_port_free(hostname: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((hostname, port))
        except OSError as exc:
            raise LaunchError(
                f"cannot listen on {hostname}:{port}: {exc.strerror}. Is another server using "
                "this port? Choose another with --port."
            ) from exc


def resolve_model(
    model_id: str | None,
    num_shard: int = 1,
    revision: str | None = None,
    hub_cache: str | None = None,
) -> Path:
    """A local model directory, a Hub model fetched once (launcher/hub.py), a GGUF
    file's folder (config and tokenizer read once; weights from the file), or the embedded
    SmolLM2 converted once; checked for support and for splitting over `num_shard` ranks.
    Plain Python: the launcher never imports torch (conversions run in child processes)."""
    from common.model_spec import ModelConfigError, check_parallel, check_tokenizer, read_spec
    from launcher import hub

    if model_id and not hub.looks_local(model_id):
        model_dir = hub.fetch(model_id, revision, hub_cache)
    elif revision:
        raise LaunchError(
            "--revision names a Hub model's revision; a local --model-id is served as is"
        )
    elif model_id and model_id.endswith(".gguf") and Path(model_id).expanduser().is_file():
        model_dir = _prepared(["prepare-gguf", str(Path(model_id).expanduser())], "the GGUF file")
    else:
        model_dir = Path(model_id).expanduser() if model_id else _embedded_model_dir()
    try:
        check_parallel(read_spec(model_dir), num_shard)
        check_tokenizer(model_dir)
    except ModelConfigError as exc:
        raise LaunchError(f"the model cannot be served: {exc}.") from exc
    return model_dir


def _embedded_model_dir() -> Path:
    """`pytgi-shard default-model` in a child: converts once, prints the directory."""
    return _prepared(["default-model"], "the embedded model")


def _prepared(command: list[str], what: str) -> Path:
    """A `pytgi-shard` preparation command in a child (it imports torch and transformers;
    the launcher never does); its last line of output is the folder."""
    result = subprocess.run(
        [sys.executable, "-m", "shard.cli", *command], capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise LaunchError(f"{what} cannot be prepared: {lines[-1]}")
    return Path(result.stdout.strip().splitlines()[-1])


class Supervisor:
    def __init__(self, config: LauncherConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        self.children: list[Child] = []
        self._stop = threading.Event()
        # One node: a fresh secret per start; several: the user's, the same on every node.
        self.secret = config.shard_secret or (
            secrets.token_urlsafe(32) if config.nnodes == 1 else None
        )
        if config.shard_uds_path:
            self.socket_dir = None
            self.uds_path = config.shard_uds_path
        else:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="pytgi-"))  # mode 0700: owner only
            self.uds_path = str(self.socket_dir / "shard")

    # ---- commands for the children ----
    def shard_config(self, rank: int) -> ShardConfig:
        """Rank `rank`'s config: every field the launcher shares with it (by name), the
        ones it writes otherwise (sizes with units, graph sizes as text), and where."""
        c = self.config
        multi_node = c.nnodes > 1
        tls = multi_node and bool(c.shard_tls_cert and c.shard_tls_key)
        given = {
            "model_dir", "uds_path", "rank", "max_input_tokens", "kv_cache_memory", "cuda_graphs",
            "secret", "otlp_service_name",
        }  # fmt: skip
        shared = {f.name for f in fields(ShardConfig)} & {f.name for f in fields(c)} - given
        return ShardConfig(
            **{name: getattr(c, name) for name in shared},
            model_dir=str(self.model_dir),
            uds_path=self.uds_path,
            rank=rank,
            world_size=c.world_size,
            max_input_tokens=c.max_input_tokens or None,
            kv_cache_memory=parse_size(c.kv_cache_memory) if c.kv_cache_memory else None,
            cuda_graphs=parse_batch_sizes(c.cuda_graphs),
            use_prefix_caching=c.prefix_caching,
            grpc_host=c.shard_host if multi_node else None,
            grpc_port_base=c.shard_port_base,
            secret=self.secret,
            tls_cert_file=c.shard_tls_cert if tls else None,
            tls_key_file=c.shard_tls_key if tls else None,
            otlp_service_name=c.otlp_service_name.removesuffix(".router") + ".shard",
        )

    def _shard_args(self, rank: int | None = None) -> list[str]:
        """Generated from the shard's config; the secret travels by environment."""
        config = self.shard_config(self.config.ranks.start if rank is None else rank)
        argv = config_argv(config, by_environment=("secret",), positional=("model_dir",))
        json = ["--json-output"] if self.config.json_output else []
        return [sys.executable, "-m", "shard.cli", "serve", *argv, *json]

    def router_config(self) -> RouterConfig:
        """The router's config: every field the launcher shares with it, plus where the
        shards and the tokenizer are."""
        c = self.config
        given = {
            "master_shard_uds_path", "tokenizer_name", "shard_tls_ca_file", "shard_secret",
            "model_id",  # the launcher's is a path; the router's is the name it shows
        }  # fmt: skip
        shared = {f.name for f in fields(RouterConfig)} & {f.name for f in fields(c)} - given
        return RouterConfig(
            **{name: getattr(c, name) for name in shared},
            master_shard_uds_path=self.uds_path,
            tokenizer_name=str(self.model_dir),
            model_id=c.model_id or self.model_dir.name,
            shard_tls_ca_file=c.shard_tls_ca,
            shard_secret=self.secret,
        )

    def _router_args(self) -> list[str]:
        """Generated from the router's config; secrets travel by environment."""
        argv = config_argv(self.router_config(), by_environment=("api_key", "shard_secret"))
        return [sys.executable, "-m", "router.cli", *argv]

    # ---- stages ----
    def start(self) -> None:
        c = self.config
        log.info("starting shard(s) %s of %d for %s", list(c.ranks), c.world_size, self.model_dir)
        for rank in c.ranks:
            env = {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank - c.ranks.start),  # this machine's GPU index
                "WORLD_SIZE": str(c.world_size),
                "MASTER_ADDR": c.master_addr,
                "MASTER_PORT": str(c.master_port),
                **self._secret_env(),
            }
            self.children.append(Child(f"shard {rank}", self._shard_args(rank), env))
        for rank in c.ranks:
            self._wait_shard(rank)
            log.info("shard %d is ready", rank)
        if not c.runs_router:
            log.info(
                "node %d of %d: shards ready; the router runs on node 0", c.node_rank, c.nnodes
            )
            return
        log.info("starting the router (Warmup sizes the KV cache)")
        self.children.append(Child("router", self._router_args(), self._router_env()))
        self._wait_router()
        log.info(
            "pytgi serving %s on http://%s:%d",
            c.model_id or self.model_dir.name,
            c.hostname,
            c.port,
        )

    def _router_env(self) -> dict[str, str]:
        """Secrets travel by environment, never on a command line other users can read."""
        env = {"API_KEY": self.config.api_key} if self.config.api_key else {}
        return {**env, **self._secret_env()}

    def _secret_env(self) -> dict[str, str]:
        """The children read the secret from their environment, never from argv."""
        return {SECRET_ENV: self.secret} if self.secret else {}

    def _deadline_check(self, deadline: float, what: str) -> None:
        self._raise_if_exited()
        if self._stop.is_set():
            raise LaunchError("interrupted during start-up")
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{what} did not become ready within {self.config.startup_timeout:.0f} s"
            )

    def _wait_shard(self, rank: int) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        path = f"{self.uds_path}-{rank}"
        while True:
            self._deadline_check(deadline, f"shard {rank}")
            if os.path.exists(path):
                try:
                    with grpc.insecure_channel(f"unix://{path}") as channel:
                        pb_grpc.TextGenerationServiceStub(channel).Health(
                            pb.HealthRequest(), timeout=5, metadata=secret_metadata(self.secret)
                        )
                    return
                except grpc.RpcError:
                    pass
            time.sleep(POLL_SECONDS)

    def _wait_router(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        hostname = self.config.hostname
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(hostname, hostname)  # wildcards
        url = f"http://{host}:{self.config.port}/health"
        while True:
            # health first: a signal that comes once the router serves (before this loop saw
            # it) is a stop after start-up, drained and exit 0, not a failed start
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._deadline_check(deadline, "the router")
            time.sleep(POLL_SECONDS)

    def _raise_if_exited(self) -> None:
        for child in self.children:
            if child.returncode is not None:
                raise LaunchError(
                    f"{child.name} exited with code {child.returncode}. "
                    f"Its last lines:\n{child.last_lines()}"
                )

    # ---- supervision ----
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())

    def supervise(self) -> int:
        """Until a signal (exit 0 after a clean stop) or a child's death (exit 1)."""
        while not self._stop.wait(POLL_SECONDS):
            try:
                self._raise_if_exited()
            except LaunchError as exc:
                log.error("%s", exc)
                self.shutdown()
                return 1
        log.info("signal received: stopping the router, then the shards")
        return 0 if self.shutdown() else 1

    def shutdown(self) -> bool:
        """Router first (it drains running requests), then shards; True when all exited
        on their own. Removes the private socket directory."""
        clean = True
        routers = [c for c in self.children if c.name == "router"]
        shards = [c for c in self.children if c.name != "router"]
        for group, timeout in (
            (routers, self.config.graceful_termination_timeout + 10),
            (shards, 30),
        ):
            for child in group:
                child.terminate()
            for child in group:
                clean &= child.wait(timeout)
        for rank in self.config.ranks:  # a killed shard leaves its socket behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.uds_path}-{rank}")
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        return clean
