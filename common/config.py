"""One frozen config family, built once from the CLI and passed down to each process.

No module reads the environment at import time; the CLIs build these records.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_BLOCK_SIZE = 16
DEFAULT_GRAPH_SIZES = "1,2,4,8,16,32,64,128"  # --cuda-graphs: decode batch sizes captured


def graph_sizes_text(sizes: tuple[int, ...]) -> str:
    """(1, 2, 4) -> '1,2,4'; () -> '0' (graphs disabled): what --cuda-graphs parses."""
    return ",".join(map(str, sizes)) or "0"


# How config_argv writes a field (dataclass field metadata):
ALWAYS = "argv_always"  # written even at the dataclass default (the CLI's default differs)
FLAG = "argv_flag"  # the option's name when it is not the field's
TEXT = "argv_text"  # value -> the option's text


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything one shard process needs; one per rank."""

    model_dir: str
    uds_path: str = "/tmp/pytgi-server"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str = field(default="cpu", metadata={ALWAYS: True})  # the CLI's default: auto
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_input_tokens: int | None = None  # None: derived from the model's context length
    kv_cache_memory: int | None = None  # bytes for the KV pool on CPU; None: derived
    kv_cache_dtype: str | None = None  # None: the model's dtype; "fp8_e4m3fn" (shard/kv_cache.py)
    cuda_memory_fraction: float = 0.9
    block_size: int = DEFAULT_BLOCK_SIZE
    attention: str = "auto"  # auto: reference on CPU; flash-attn, else triton, on CUDA
    # decode batch sizes captured as CUDA graphs (CUDA only); the CLI's default: all sizes
    cuda_graphs: tuple[int, ...] = field(
        default=(), metadata={ALWAYS: True, TEXT: graph_sizes_text}
    )
    pack_linear: bool = True  # CPU weights packed: our panels or oneDNN's (models/linear.py)
    # weight-only quantization of the decoder's linear layers on load (shard/models/quant.py)
    quantize: str | None = None  # None, "int8" or "int4"
    quantize_group_size: int = 32  # int4: inputs per group (32, 64 or 128)
    cpu_gemv: bool = True  # CPU: plain weights kept too, for batch-1 steps (more memory)
    # CPU: weights and KV pools in 2 MiB pages where the kernel offers them (shard/hugepages.py)
    huge_pages: bool = True
    # a decoding batch's next step runs as soon as a step's reply is queued, before the
    # router asks for it (ShardEngine.step_ahead): the round trip overlaps the step. Only
    # for batches of up to `step_ahead_rows` unfinished requests (0: any). On 2 Zen 4 cores
    # (benchmarks/step_ahead.py, bfloat16, eight runs) concurrency 1 served 0.99-1.11x the
    # tokens/s of off (median 1.06x); 2 0.96-1.13x, 4 / 8 / 32 0.94x / 0.91x / 0.98x: the
    # router's and the clients' work for more streams takes the cores the step runs on. On 2
    # Zen 5 cores it measured 0.998-1.036x at concurrency 1-32.
    step_ahead: bool = True
    step_ahead_rows: int = 1
    # PyTorch's ops only: no C++ GEMV, no Triton layer or attention kernels (TGI's flag)
    disable_custom_kernels: bool = False
    # reported by Info; the router shares cached prefixes
    use_prefix_caching: bool = field(default=True, metadata={FLAG: "prefix-caching"})
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    # Multi-node: also listen on TCP at {grpc_host}:{grpc_port_base + rank}, the address
    # the router on node 0 uses to reach this rank. None: Unix socket only (one machine).
    grpc_host: str | None = None
    grpc_port_base: int = 50051
    # Test-only fault hook (ModelRunner.check_fault): an empty file fails the next forward;
    # a file holding a marker fails the Prefill of a prompt containing it on every rank.
    fault_file: str | None = None
    # Every RPC must carry this secret (common.rpc); None: no check (TGI's routers send none)
    secret: str | None = field(default=None, repr=False)
    # PEM files: the TCP port (multi-node) speaks TLS with this certificate; None: plaintext
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    otlp_endpoint: str | None = None  # OTLP gRPC collector for traces; None: no tracing
    otlp_service_name: str = "pytgi.shard"

    @property
    def socket_path(self) -> str:
        """This rank's Unix socket file."""
        return f"{self.uds_path}-{self.rank}"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_address(self) -> str | None:
        if self.grpc_host is None:
            return None
        return f"{self.grpc_host}:{self.grpc_port_base + self.rank}"

    @property
    def advertised_url(self) -> str:
        """How other processes reach this rank: TCP when multi-node, else the Unix socket."""
        return self.tcp_address or self.url


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router process needs; flags named as TGI's router names them."""

    master_shard_uds_path: str
    tokenizer_name: str
    hostname: str = "0.0.0.0"  # as TGI: reachable in a container; warned of without a key
    port: int = 3000
    prometheus_port: int | None = None  # /metrics alone on this port too (TGI's 9000); None: off
    model_id: str | None = None  # name shown in /info and /v1/models; default: tokenizer dir
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None: the shards' default after Warmup
    max_total_tokens: int | None = None
    waiting_served_ratio: float = 1.2
    max_batch_prefill_tokens: int | None = (
        None  # None: 2048, at least max_input_tokens without chunking
    )
    max_batch_total_tokens: int | None = None  # None: the KV capacity Warmup reports
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    max_client_batch_size: int = 4
    validation_workers: int = 2  # threads that tokenize and render chat templates
    disable_grammar_support: bool = False  # TGI's flag: requests with a grammar get 422
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    graceful_termination_timeout: float = 30.0
    json_output: bool = False
    prefix_caching: bool = True  # effective only when the shards report use_prefix_caching
    client_timeout: float = 60.0  # a body slower than this, or a reply unread this long, ends
    max_connections: int | None = None  # open HTTP connections; None: see connection_limit
    otlp_endpoint: str | None = None  # OTLP gRPC collector for traces; None: no tracing
    otlp_service_name: str = "pytgi.router"

    @property
    def connection_limit(self) -> int:
        """Connections (and tasks) uvicorn serves before answering 503."""
        return self.max_connections or 4 * self.max_concurrent_requests + 64

    shard_secret: str | None = field(default=None, repr=False)  # sent on every shard call
    shard_tls_ca_file: str | None = None  # PEM: TCP shard URLs are dialled over TLS, checked

    @property
    def master_url(self) -> str:
        return f"unix://{self.master_shard_uds_path}-0"


def defaults(cls: type) -> dict[str, Any]:
    """Each field's default, by name: the one place a default is written. The CLIs and the
    launcher's config read theirs from here."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def config_argv(
    config: Any, by_environment: tuple[str, ...] = (), positional: tuple[str, ...] = ()
) -> list[str]:
    """The command-line arguments that rebuild `config` in a child whose click options are
    named after its fields (`--max-batch-size`, `--no-prefix-caching`, a repeated flag per
    tuple item; field metadata FLAG and TEXT where the option differs): the `positional`
    fields first, then the flags. Fields at their default are left out (unless marked
    ALWAYS), and so are those in `by_environment` (secrets: the child reads its environment)."""
    argv = [str(getattr(config, name)) for name in positional]
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in by_environment or f.name in positional or value is None:
            continue
        if value == f.default and not f.metadata.get(ALWAYS):
            continue
        flag = "--" + f.metadata.get(FLAG, f.name.replace("_", "-"))
        if TEXT in f.metadata:
            argv += [flag, f.metadata[TEXT](value)]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes; ValueError naming the text otherwise."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "b": 1}  # fmt: skip
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), "")
    try:
        size = int(float(lowered.removesuffix(unit)) * units.get(unit, 1))
    except ValueError:
        raise ValueError(f"a size like 512MiB, 2GiB or 1000000 (bytes); got {text!r}") from None
    if size <= 0:
        raise ValueError(f"a size must be positive; got {text!r}")
    return size


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), sorted and unique; '0' or '' -> () (graphs disabled)."""
    sizes = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"--cuda-graphs takes batch sizes like 1,2,4,8; got {text!r}")
        sizes.add(int(part))
    if sizes == {0}:
        return ()
    if 0 in sizes:
        raise ValueError(
            f"--cuda-graphs: 0 disables graphs and cannot be mixed with sizes: {text!r}"
        )
    return tuple(sorted(sizes))
