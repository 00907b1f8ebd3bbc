"""The launcher's settings, and the limits checked before any process starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class LaunchError(Exception):
    """A start-up problem, reported as one paragraph before exiting non-zero."""


@dataclass(frozen=True, slots=True)
class LauncherConfig:
    model_id: str | None
    num_shard: int = 1
    dtype: str | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    max_client_batch_size: int = 4
    hostname: str = "127.0.0.1"
    port: int = 3000
    shard_uds_path: str | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    cuda_memory_fraction: float = 0.9
    device: str = "auto"
    attention: str = "auto"
    cuda_graphs: str = "1,2,4,8,16,32,64,128"
    cpu_gemv: bool = True
    kv_cache_memory: str | None = None
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    json_output: bool = False
    graceful_termination_timeout: float = 30.0
    startup_timeout: float = 600.0
    prefix_caching: bool = True
    nnodes: int = 1
    node_rank: int = 0
    shard_host: str | None = None
    shard_port_base: int = 50051
    shard_secret: str | None = field(default=None, repr=False)
    shard_tls_cert: str | None = None
    shard_tls_key: str | None = None
    shard_tls_ca: str | None = None
    insecure_shard_ports: bool = False

    @property
    def world_size(self) -> int:
        return self.num_shard * self.nnodes

    @property
    def ranks(self) -> range:
        """Global ranks of the shards this node starts."""
        first = self.node_rank * self.num_shard
        return range(first, first + self.num_shard)

    @property
    def runs_router(self) -> bool:
        return self.node_rank == 0

    def check_limits(self) -> None:
        """Contradicting limits end the start-up before anything is spawned."""
        if self.num_shard < 1:
            raise LaunchError(f"--num-shard must be at least 1, got {self.num_shard}")
        inp, total = self.max_input_tokens, self.max_total_tokens
        if inp is not None and total is not None and inp >= total:
            raise LaunchError(
                f"--max-input-tokens ({inp}) must be smaller than --max-total-tokens ({total}): "
                "a request needs room for at least one generated token."
            )
        batch_total = self.max_batch_total_tokens
        if batch_total is not None and total is not None and batch_total < total:
            raise LaunchError(
                f"--max-batch-total-tokens ({batch_total}) must be at least --max-total-tokens "
                f"({total}), or a single request could never fit in a batch."
            )
        for name in ("max_concurrent_requests", "max_best_of", "payload_limit"):
            if getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and not self.shard_host:
            raise LaunchError(
                "--nnodes > 1 needs --shard-host: the address of this machine that node 0's "
                "router can reach the shards on"
            )
        if self.nnodes > 1 and not self.shard_secret and not self.insecure_shard_ports:
            raise LaunchError(
                "--nnodes > 1 opens the shards' TCP ports: set SHARD_SECRET (the same secret on "
                "every node) so that only this group's router can call them, or pass "
                "--insecure-shard-ports on a network only you can reach"
            )
        if bool(self.shard_tls_cert) != bool(self.shard_tls_key):
            raise LaunchError("--shard-tls-cert and --shard-tls-key go together")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise LaunchError(
                f"--cuda-memory-fraction must be in (0, 1], got {self.cuda_memory_fraction}"
            )
        if not re.fullmatch(r"\d+(,\d+)*", self.cuda_graphs.replace(" ", "")):
            raise LaunchError(
                f"--cuda-graphs takes batch sizes like 1,2,4,8 (0: none), got {self.cuda_graphs!r}"
            )
