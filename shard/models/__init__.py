"""Model implementations. Model files know nothing about serving.

A family is one module here holding its math and its weight plan, named for its
architectures in `common.model_spec.FAMILIES` (the registry, torch-free for the launcher), and its
model class is the module's `Model`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from shard.loader import Store
from shard.models.ops import LayerOps, ops_for
from shard.models.quant import check_method
from shard.models.weights import Loader
from shard.parallel import Parallel
from shard.spec import ModelSpec, check_parallel


def build_model(
    spec: ModelSpec,
    store: Store,
    dtype: torch.dtype,
    device: torch.device,
    parallel: Parallel,
    pack_linear: bool = True,
    gemv: bool = False,
    ops: LayerOps | None = None,
    quantize: str | None = None,
    group_size: int = 32,
    kernels: bool = True,
) -> Any:
    """The family's model with this rank's weights loaded (the decoder's linear layers
    quantized with `quantize`; `kernels` False: quantized layers dequantize per call, as
    --disable-custom-kernels asks)."""
    check_parallel(spec, parallel.world_size)
    check_method(quantize, group_size)
    family = importlib.import_module(f"shard.models.{spec.family}")
    loader = Loader(
        store, parallel, spec.head_dim, dtype, device, pack_linear, gemv, quantize, group_size,
        kernels,
    )  # fmt: skip
    return family.Model(spec, loader, ops if ops is not None else ops_for(device))
