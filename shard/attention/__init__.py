"""Attention backends, imported only when chosen so CPU-only installs never touch GPU code."""

from __future__ import annotations

import importlib
import importlib.util

from shard.attention.base import AttentionBackend, AttentionInputs, AttentionMetadata
from shard.errors import ModelLoadError

# name -> (module, class or constructor); a module is imported only when its backend is chosen.
_REGISTRY = {
    "reference": ("shard.attention.reference", "ReferenceBackend"),  # CPU default
    "sdpa": ("shard.attention.reference", "ReferenceBackend"),  # the same, portable
    "triton": ("shard.attention.triton_backend", "TritonBackend"),
    "flash-attn": ("shard.attention.flash_backend", "flash_attn_backend"),
}


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def resolve_backend_name(name: str, device_type: str) -> str:
    """'auto' -> reference on CPU; on CUDA flash-attn when installed, else triton, else sdpa."""
    if name != "auto":
        return name
    if device_type != "cuda":
        return "reference"
    for candidate, package in (("flash-attn", "flash_attn"), ("triton", "triton")):
        if importlib.util.find_spec(package) is not None:
            return candidate
    return "sdpa"


def get_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ModelLoadError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"attention backend {name!r} cannot be imported: {exc}") from exc
    return getattr(module, class_name)(name)


__all__ = [
    "AttentionBackend",
    "AttentionInputs",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "resolve_backend_name",
]
