"""The paged KV cache: per layer, K and V pools of fixed-size blocks.

Invariant: block 0 is never given to a real request (it pads gathers and serves liveness
checks); the router (or the shard, for self-numbered requests) owns which block is whose.

With `--kv-cache-dtype fp8_e4m3fn` a pool holds K / k_scale and V / v_scale as float8
e4m3 (saturated to +-448, rounded to nearest even), one scale per tensor per layer
(`KVScales`: the checkpoint's, else measured at Warmup by shard/kv_calibration.py); readers
multiply back in float32.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch

from shard import hugepages

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
KV_CACHE_DTYPES = {"fp8_e4m3fn": FP8}  # --kv-cache-dtype values (TGI's names)


class KVScales(NamedTuple):
    """Per-tensor scales of one layer's fp8 K and V pools (stored value = x / scale)."""

    k: float = 1.0
    v: float = 1.0


NO_SCALES = KVScales()


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def inverse(scale: float) -> float:
    """1 / scale rounded to float32: every writer (PyTorch, Triton, the CPU kernel)
    multiplies by this same float32 number, so their stored bytes agree."""
    return struct.unpack("f", struct.pack("f", 1.0 / scale))[0]


def to_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> float8 e4m3fn of x / scale (x * inverse(scale) in float32,
    saturated to +-FP8_MAX, then rounded to nearest even)."""
    scaled = x.to(torch.float32) * inverse(scale)
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def readable(blocks: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache values (gathered blocks) -> `dtype`: fp8 ones times `scale` in float32."""
    if not is_fp8(blocks):
        return blocks
    return (blocks.to(torch.float32) * scale).to(dtype)


def as_stored(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """New K or V x as `cache` would give it back: attention reads every key the same way,
    cached or just computed (so a prefix-cache hit changes no result)."""
    if not is_fp8(cache):
        return x
    return readable(to_fp8(x, scale), scale, x.dtype)


class KVCache:
    """K and V pools, each per layer `[num_blocks, block_size, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        scales: list[KVScales] | None = None,
        huge_pages: bool = False,
    ) -> None:
        """`huge_pages` (CPU): every pool in one arena of 2 MiB pages (shard/hugepages.py)."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if huge_pages:
            pools = hugepages.zeros(2 * num_layers, shape, dtype)
        else:
            pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.keys, self.values = pools[:num_layers], pools[num_layers:]
        self.scales = scales or [NO_SCALES] * num_layers  # used by fp8 pools only
        assert len(self.scales) == num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def nbytes(self) -> int:
        """Bytes of every K and V pool."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def capacity_tokens(self) -> int:
        """Tokens storable in all blocks but block 0."""
        return (self.num_blocks - 1) * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]
