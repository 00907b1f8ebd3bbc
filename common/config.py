"""One frozen config family, built once from the CLI and passed down to each process.

No module reads the environment at import time; the CLIs build these records.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Everything one shard process needs; one per rank."""

    model_dir: str
    uds_path: str = "/tmp/pytgi-server"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_input_tokens: int | None = None  # None: derived from the model's context length
    kv_cache_memory: int | None = None  # bytes for the KV pool on CPU; None: derived
    cuda_memory_fraction: float = 0.9
    block_size: int = DEFAULT_BLOCK_SIZE
    attention: str = "reference"
    num_threads: int | None = None  # torch intra-op threads; None: torch's default

    @property
    def socket_path(self) -> str:
        """This rank's Unix socket file."""
        return f"{self.uds_path}-{self.rank}"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def url_of(self, rank: int) -> str:
        return f"unix://{self.uds_path}-{rank}"
