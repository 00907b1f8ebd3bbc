"""Reads a model's weights from safetensors (never pickle; no remote code runs). The shape
and support checks of the model directory are in shard/spec.py (no torch there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from shard.errors import ModelLoadError
from shard.spec import read_json


class Store(Protocol):
    """What the model loader reads: tensors by Hugging Face name (a WeightStore, or a GGUF
    or GPTQ/AWQ checkpoint seen through one; those also offer `packed(name)`)."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> list[int]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


class WeightStore:
    """Lazy access to the tensors of one or many safetensors files.

    `get_slice` reads only the requested rows/columns, so a tensor-parallel rank never
    materialises the full tensor.
    """

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = read_json(index_path)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"{model_dir} has no *.safetensors weights (pickle .bin files are never loaded)"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = model_dir / name
            if not path.exists():
                raise ModelLoadError(f"weight file {path} named by the index is missing")
            handle = safe_open(str(path), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ModelLoadError(f"weight {name} is missing from the safetensors files")
        return self._handles[self._file_of[name]]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim=0) or columns (dim=1) `start:stop` of a tensor, read lazily."""
        view = self._handle(name).get_slice(name)
        if dim == 0:
            return view[start:stop]
        return view[:, start:stop]
