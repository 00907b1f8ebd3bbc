"""CPU decode kernels (shard/csrc/cpu_kernels.cpp), compiled once per machine.

torch's extension builder compiles it with the machine's own instruction set into
$TORCH_EXTENSIONS_DIR (by default ~/.cache/torch_extensions); the name carries a hash of the
source and of this CPU's flags, so a change of either builds afresh. `make install` builds it
ahead (`python -m shard.cpu_kernels`); a shard that finds no compiler logs one
warning and keeps the pure-PyTorch decode path.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("shard")
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def has_bf16_instructions(flags: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Without, every
    bfloat16 matrix product converts to float32 on the way, and float32 is faster."""
    names = set((flags if flags is not None else _cpu_flags()).split())
    return bool(names & {"avx512_bf16", "amx_bf16"})


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode() + str(FLAGS).encode())
    return f"pytgi_cpu_kernels_{digest.hexdigest()[:12]}"


def load() -> Any | None:
    """The compiled module, or None when it cannot be built here (reason logged once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = None
            try:
                from torch.utils.cpp_extension import load as build

                _state["module"] = build(
                    name=_name(),
                    sources=[str(SOURCE)],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as exc:  # noqa: BLE001 - any build failure keeps the torch path
                log.warning("CPU decode kernel unavailable, using gather + SDPA: %s", exc)
        return _state["module"]


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D], caches [N, BS, KVH, D], block_tables [B, W], context_lens [B] -> [B, H, D]."""
    module = load()
    assert module is not None, "call load() first and keep the torch path when it is None"
    return module.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


if __name__ == "__main__":
    print("CPU decode kernel:", "built" if load() is not None else "NOT available")
