"""PyTorch pickle checkpoints (pytorch_model*.bin) converted once to safetensors beside them.

torch.load runs with `weights_only=True`: only tensors and plain containers are rebuilt, so
a checkpoint cannot run code. Tensors that share storage (tied embeddings) are written as
separate copies (safetensors stores no aliasing). The index, when there is one, is
rewritten for the new files; the shards then load the safetensors as from any repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from shard.errors import ModelLoadError


def safetensors_name(pickle_name: str) -> str:
    """pytorch_model.bin -> model.safetensors; pytorch_model-00001-of-00002.bin ->
    model-00001-of-00002.safetensors."""
    return pickle_name.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"


def convert_pickles(model_dir: str | Path) -> list[Path]:
    """Writes a .safetensors file for each pytorch_model*.bin (and the index); returns them."""
    model_dir = Path(model_dir)
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if not pickles:
        raise ModelLoadError(f"{model_dir} has no pytorch_model*.bin files")
    written = []
    for path in pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable or unsafe pickle
            raise ModelLoadError(f"{path.name} cannot be loaded as plain tensors: {exc}") from exc
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ModelLoadError(f"{path.name} is not a state dict of tensors")
        tensors = {name: t.detach().contiguous().clone() for name, t in state.items()}
        target = model_dir / safetensors_name(path.name)
        save_file(tensors, str(target), metadata={"format": "pt"})
        written.append(target)
    index = model_dir / "pytorch_model.bin.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: safetensors_name(v) for k, v in data["weight_map"].items()}
        target = model_dir / "model.safetensors.index.json"
        target.write_text(json.dumps(data, indent=2))
        written.append(target)
    return written
