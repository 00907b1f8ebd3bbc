"""How many KV blocks fit: on CPU from a byte budget, on CUDA from free device memory."""

from __future__ import annotations

import torch

from common.config import ShardConfig
from shard.errors import OutOfBlocks
from shard.kv_cache import KVCache
from shard.parallel import Parallel
from shard.sampling import SamplingParams
from shard.spec import ModelSpec

GREEDY = SamplingParams()
DEFAULT_CPU_FRACTION = 0.25  # of available memory, when --kv-cache-memory is not given
DEFAULT_CPU_CAP = 4 << 30


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kv_budget_bytes(config: ShardConfig, reserve: int = 0) -> int:
    """Bytes the KV pool may take. CUDA: the free memory's `--cuda-memory-fraction`, less
    `reserve` (the activations of a maximum-size prefill, measured at Warmup)."""
    if torch.device(config.device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(config.device))
        return max(0, int(free * config.cuda_memory_fraction) - reserve)
    available = available_memory()
    if config.kv_cache_memory is not None:
        if available and config.kv_cache_memory > available:
            raise OutOfBlocks(
                f"--kv-cache-memory {config.kv_cache_memory >> 20} MiB exceeds the "
                f"{available >> 20} MiB of memory available; lower --kv-cache-memory"
            )
        return config.kv_cache_memory
    if not available:
        return 1 << 30
    return min(int(available * DEFAULT_CPU_FRACTION), DEFAULT_CPU_CAP)


def num_kv_blocks(
    config: ShardConfig, spec: ModelSpec, parallel: Parallel, dtype: torch.dtype, reserve: int = 0
) -> int:
    """Blocks (block 0 included) that the budget holds; raises OutOfBlocks when < 2."""
    local_kv_heads = max(1, spec.num_kv_heads // parallel.world_size)
    per_block = KVCache.bytes_per_block(
        spec.num_layers, config.block_size, local_kv_heads, spec.head_dim, dtype
    )
    blocks = kv_budget_bytes(config, reserve) // per_block
    if blocks < 2:
        raise OutOfBlocks(
            f"the KV budget does not hold one block of {per_block} bytes; "
            "raise --kv-cache-memory (CPU) or --cuda-memory-fraction (GPU)"
        )
    return blocks
