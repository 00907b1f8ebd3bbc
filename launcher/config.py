"""The launcher's settings, and the limits checked before any process starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import (
    DEFAULT_GRAPH_SIZES,
    RouterConfig,
    ShardConfig,
    defaults,
    parse_batch_sizes,
    parse_size,
)
from common.model_spec import PREQUANTIZED

_ROUTER, _SHARD = defaults(RouterConfig), defaults(ShardConfig)  # where those defaults live


class LaunchError(Exception):
    """A start-up problem, reported as one paragraph before exiting non-zero."""


@dataclass(frozen=True, slots=True)
class LauncherConfig:
    model_id: str | None
    revision: str | None = None  # of a Hub model
    huggingface_hub_cache: str | None = None  # None: huggingface_hub's own (HF_HOME)
    num_shard: int = 1
    dtype: str | None = _SHARD["dtype"]
    max_input_tokens: int | None = _ROUTER["max_input_tokens"]
    max_total_tokens: int | None = _ROUTER["max_total_tokens"]
    max_batch_prefill_tokens: int | None = _ROUTER["max_batch_prefill_tokens"]
    max_batch_total_tokens: int | None = _ROUTER["max_batch_total_tokens"]
    max_concurrent_requests: int = _ROUTER["max_concurrent_requests"]
    max_best_of: int = _ROUTER["max_best_of"]
    max_stop_sequences: int = _ROUTER["max_stop_sequences"]
    max_top_n_tokens: int = _ROUTER["max_top_n_tokens"]
    waiting_served_ratio: float = _ROUTER["waiting_served_ratio"]
    max_waiting_tokens: int = _ROUTER["max_waiting_tokens"]
    max_batch_size: int | None = _ROUTER["max_batch_size"]
    max_client_batch_size: int = _ROUTER["max_client_batch_size"]
    validation_workers: int = _ROUTER["validation_workers"]
    disable_grammar_support: bool = _ROUTER["disable_grammar_support"]
    hostname: str = _ROUTER["hostname"]
    port: int = _ROUTER["port"]
    prometheus_port: int | None = _ROUTER["prometheus_port"]
    otlp_endpoint: str | None = _ROUTER["otlp_endpoint"]
    otlp_service_name: str = _ROUTER["otlp_service_name"]  # the shards': its stem + ".shard"
    shard_uds_path: str | None = None
    master_addr: str = _SHARD["master_addr"]
    master_port: int = _SHARD["master_port"]
    cuda_memory_fraction: float = _SHARD["cuda_memory_fraction"]
    device: str = "auto"  # a GPU per shard when CUDA is there
    attention: str = _SHARD["attention"]
    cuda_graphs: str = DEFAULT_GRAPH_SIZES
    quantize: str | None = _SHARD["quantize"]
    quantize_group_size: int = _SHARD["quantize_group_size"]
    cpu_gemv: bool = _SHARD["cpu_gemv"]
    pack_linear: bool = _SHARD["pack_linear"]
    huge_pages: bool = _SHARD["huge_pages"]
    step_ahead: bool = _SHARD["step_ahead"]
    step_ahead_rows: int = _SHARD["step_ahead_rows"]
    disable_custom_kernels: bool = _SHARD["disable_custom_kernels"]
    kv_cache_memory: str | None = _SHARD["kv_cache_memory"]
    kv_cache_dtype: str | None = _SHARD["kv_cache_dtype"]
    api_key: str | None = _ROUTER["api_key"]
    cors_allow_origin: tuple[str, ...] = _ROUTER["cors_allow_origin"]
    payload_limit: int = _ROUTER["payload_limit"]
    json_output: bool = _ROUTER["json_output"]
    graceful_termination_timeout: float = _ROUTER["graceful_termination_timeout"]
    startup_timeout: float = 600.0
    prefix_caching: bool = _ROUTER["prefix_caching"]
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
        if self.quantize is not None and self.quantize not in ("int8", "int4", *PREQUANTIZED):
            raise LaunchError(
                f"--quantize {self.quantize} is not supported yet; supported: int8, int4 "
                f"(weight-only, quantized on load from a full-precision checkpoint), "
                f"{', '.join(PREQUANTIZED)} (checkpoints in those formats, detected from their "
                "config without the flag)"
            )
        if self.kv_cache_dtype not in (None, "fp8_e4m3fn"):
            raise LaunchError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is not supported; fp8_e4m3fn stores "
                "the KV cache in 8 bits (more precision than e5m2, the same memory)"
            )
        if self.quantize_group_size not in (32, 64, 128):
            raise LaunchError("--quantize-group-size: choose 32, 64 or 128")
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
        try:
            parse_batch_sizes(self.cuda_graphs)  # the shard's own parsers: one rule
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        try:
            if self.kv_cache_memory:
                parse_size(self.kv_cache_memory)
        except ValueError as exc:
            raise LaunchError(f"--kv-cache-memory takes {exc}") from None
