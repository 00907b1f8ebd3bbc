"""Attention backends, imported only when chosen so CPU-only installs never touch GPU code."""

from __future__ import annotations

import importlib

from shard.attention.base import AttentionBackend, AttentionInputs
from shard.errors import ModelLoadError

# name -> (module, class); a module is imported only when its backend is chosen.
_REGISTRY = {
    "reference": ("shard.attention.reference", "ReferenceBackend"),
}


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


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
    return getattr(module, class_name)()


__all__ = ["AttentionBackend", "AttentionInputs", "available_backends", "get_backend"]
