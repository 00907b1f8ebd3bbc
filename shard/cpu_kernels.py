"""CPU kernels (shard/csrc: decode attention, small matrix products, int8/int4 layers),
compiled once per machine.

torch's extension builder compiles it with the machine's own instruction set into
$TORCH_EXTENSIONS_DIR (by default ~/.cache/torch_extensions); the name carries a hash of the
source, this CPU's flags, the compiler flags and torch's version, so a change of any builds
afresh. A module already built under that name is imported directly: torch's builder would
compile again whenever the source sits at another path (another checkout, a worktree), as
its build file names the path. `make install` builds it ahead (`python -m shard.cpu_kernels`);
a shard that finds no compiler logs one warning and keeps the pure-PyTorch decode path.
PYTGI_CPU_KERNEL_CFLAGS adds compiler flags (a build of its own): `-mno-avx512f` builds the
AVX2 forms on an AVX-512 CPU, as the tests do to check both on one machine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("shard")
CSRC = Path(__file__).resolve().parent / "csrc"
# Every file of the module in CSRC: the sources compiled and the headers they include.
SOURCES = (
    "bindings.cpp",
    "cpu_kernels.cpp",
    "pointwise.cpp",
    "prefill.cpp",
    "panels.cpp",
    "amx.cpp",
    "quant.cpp",
    "qpanels.cpp",
    "decode_step.cpp",
)
HEADERS = ("decode_step.h", "kernels.h", "quant.h", "vec_exp.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", *os.environ.get("PYTGI_CPU_KERNEL_CFLAGS", "").split()]
_lock = threading.Lock()
_state: dict[str, Any] = {}


@functools.cache
def cpu_flags() -> str:
    """This CPU's flags line from /proc/cpuinfo (the processor's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def has_bf16_instructions(flags: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Without, oneDNN's
    bfloat16 products of several rows are several times slower than float32's, and our
    layers widen the bfloat16 weights to float32 themselves (shard/models/linear.py)."""
    names = set((flags if flags is not None else cpu_flags()).split())
    return bool(names & {"avx512_bf16", "amx_bf16"})


def _name() -> str:
    files = b"".join((CSRC / name).read_bytes() for name in SOURCES + HEADERS)
    key = files + cpu_flags().encode() + str(FLAGS).encode()
    digest = hashlib.sha256(key + torch.__version__.encode())
    return f"pytgi_cpu_kernels_{digest.hexdigest()[:12]}"


def _built(name: str) -> Any | None:
    """The module built earlier under `name`, imported without torch's builder; None if
    there is none."""
    from torch.utils.cpp_extension import _get_build_directory

    library = Path(_get_build_directory(name, False)) / f"{name}.so"
    if not library.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> Any | None:
    """The compiled module, or None when it cannot be built here (reason logged once)."""
    with _lock:
        if "module" not in _state:
            _state["module"] = None
            try:
                from torch.utils.cpp_extension import load as build

                name = _name()
                _state["module"] = _built(name) or build(
                    name=name,
                    sources=[str(CSRC / name) for name in SOURCES],
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
    window: int = 0,
    softcap: float = 0.0,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q [B, H, D], caches [N, BS, KVH, D], block_tables [B, W], context_lens [B] -> [B, H, D];
    `window` > 0: each row sees only its last `window` keys; `softcap` > 0: scores s become
    softcap * tanh(s / softcap). Caches in q's dtype, or float8 e4m3fn standing for their
    values times `scales` (K's, V's)."""
    module = load()
    assert module is not None, "call load() first and keep the torch path when it is None"
    return module.paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap, *scales
    )


def stores_rows(cache: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `store_kv` takes x [T, KVH, D] into `cache`: the same dtype, each row's KVH * D
    values contiguous, the cache contiguous."""
    return (
        x.dtype == cache.dtype
        and x.dim() == 3
        and x.stride(2) == 1
        and x.stride(1) == x.shape[2]
        and cache.is_contiguous()
    )


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots
) -> None:
    """k, v [T, KVH, D] -> caches [N, BS, KVH, D] of their dtype at `slots` [T] (-1: skipped),
    rows copied as they are (`stores_rows` says which inputs it takes)."""
    module = load()
    assert module is not None, "call load() first and keep the torch path when it is None"
    module.store_kv(k_cache, v_cache, k, v, slots)


def store_fp8(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    scales: tuple[float, float],
) -> None:
    """k, v [T, KVH, D] (float32 or bfloat16) -> fp8 caches [N, BS, KVH, D] at `slots` [T]
    (-1: skipped), divided by `scales` (K's, V's) as shard.kv_cache.to_fp8 does, bit for bit."""
    from shard.kv_cache import inverse

    module = load()
    assert module is not None, "call load() first and keep the torch path when it is None"
    module.store_fp8(k_cache, v_cache, k, v, slots, inverse(scales[0]), inverse(scales[1]))


if __name__ == "__main__":
    print("CPU decode kernel:", "built" if load() is not None else "NOT available")
