"""The shard's view of common/model_spec.py (the torch-free config reader the launcher also
uses): the same names, with its errors raised as the shard's ModelLoadError."""

from __future__ import annotations

from pathlib import Path

from common import model_spec
from common.model_spec import FAMILIES, SUPPORTED_ARCHITECTURES, ModelSpec, read_json
from shard.errors import ModelLoadError

__all__ = [
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "ModelSpec",
    "check_parallel",
    "check_tokenizer",
    "read_json",
    "read_spec",
]


def read_spec(model_dir: str | Path) -> ModelSpec:
    try:
        return model_spec.read_spec(model_dir)
    except model_spec.ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from exc


def check_tokenizer(model_dir: str | Path) -> Path:
    try:
        return model_spec.check_tokenizer(model_dir)
    except model_spec.ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from exc


def check_parallel(spec: ModelSpec, world_size: int) -> None:
    try:
        model_spec.check_parallel(spec, world_size)
    except model_spec.ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
