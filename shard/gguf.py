"""A GGUF file (Llama, Mistral, Qwen2 or Qwen3 architecture) as a weight store: its tensors
under Hugging Face's names, Q8_0, Q4_0 and Q4_1 ones also in their packed forms, so they are
served as they are.

GGUF stores a [N, K] weight as N rows of blocks along the inputs: Q8_0 blocks of 32 are a
float16 scale d and 32 int8 (w = d q); Q4_0 blocks are d and 16 bytes of nibbles
(w = d (q - 8)); Q4_1 blocks are d, a float16 min m and the nibbles (w = d q + m), byte j
holding inputs j and j + 16 (the layout `shard.models.quant` keeps). llama.cpp's converter
interleaves the rows of Llama's (and Mistral's) q and k projections for its rotary form;
they are put back in Hugging Face's order (a row permutation, so packed rows move whole);
Qwen's are stored in Hugging Face's order. Other tensor types are dequantized by the `gguf`
package, once each.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shard.errors import ModelLoadError

log = logging.getLogger("shard")

BLOCK = 32
# GGUF names of a Llama layer's tensors -> Hugging Face's
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
}
# GGUF architectures served -> whether llama.cpp interleaved their q/k rows
ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# bytes per block of 32 inputs
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def hf_name(name: str) -> str | None:
    """A GGUF tensor name in Hugging Face's Llama naming; None for names it lacks."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return None


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row indices that undo llama.cpp's interleaving of q/k rows ([heads, 2, D / 2] ->
    [heads, D / 2, 2] per head): HF row i is GGUF row index[i]."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


class GgufStore:
    """The tensors of a GGUF file by Hugging Face name (the WeightStore interface),
    plus `packed(name)`: the packed form of a Q8_0/Q4_0/Q4_1 tensor, else None."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        self.reader = GGUFReader(self.path)
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path.name}: GGUF architecture {arch!r} is not served; GGUF files of "
                f"{', '.join(ARCHITECTURES)} are (other families: their safetensors)"
            )
        self.permuted = ARCHITECTURES[arch]
        self.heads = int(self._field(f"{arch}.attention.head_count"))
        self.kv_heads = int(self._field(f"{arch}.attention.head_count_kv") or self.heads)
        self._tensors: dict[str, Any] = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        kinds = {t.tensor_type.name for t in self._tensors.values()}
        others = sorted(kinds - set(_BLOCK_BYTES) - {"F32", "F16", "BF16"})
        if others:
            log.info("%s: %s tensors are dequantized on load", self.path.name, ", ".join(others))

    def _field(self, key: str) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value.item()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise ModelLoadError(f"weight {name} is missing from {self.path.name}")
        return self._tensors[name]

    def _order(self, name: str, rows: int) -> torch.Tensor | None:
        if not self.permuted:
            return None
        if name.endswith("q_proj.weight"):
            return unpermute_rows(rows, self.heads)
        if name.endswith("k_proj.weight"):
            return unpermute_rows(rows, self.kv_heads)
        return None

    def shape(self, name: str) -> list[int]:
        return [int(d) for d in reversed(self._tensor(name).shape)]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor in float32 (dequantized when stored in blocks)."""
        from gguf import dequantize

        tensor = self._tensor(name)
        data = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
        out = data.float().reshape(self.shape(name))
        order = self._order(name, out.shape[0])
        return out if order is None else out[order].contiguous()

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        whole = self.get(name)
        return whole[start:stop] if dim == 0 else whole[:, start:stop]

    def packed(self, name: str) -> tuple[str, torch.Tensor, tuple[torch.Tensor, ...], None] | None:
        """The tensor in `shard.models.quant`'s forms: ("int8", q [N, K], (scales [N, K/32],))
        or ("int4", q [N, K/2], (scales, mins)), inputs in order (None); None unless Q8_0,
        Q4_0 or Q4_1."""
        tensor = self._tensor(name)
        kind = tensor.tensor_type.name
        if kind not in _BLOCK_BYTES:
            return None
        rows, k = self.shape(name)
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).view(rows, k // BLOCK, -1)
        order = self._order(name, rows)
        if order is not None:
            raw = raw[order]
        d = raw[..., 0:2].contiguous().view(torch.float16).view(rows, k // BLOCK)
        if kind == "Q8_0":
            q = raw[..., 2:].contiguous().view(torch.int8).reshape(rows, k)
            return "int8", q, (d.contiguous(),), None
        start = 4 if kind == "Q4_1" else 2
        q = raw[..., start:].reshape(rows, k // 2).contiguous()
        if kind == "Q4_1":
            mins = raw[..., 2:4].contiguous().view(torch.float16).view(rows, k // BLOCK)
        else:  # w = d (q - 8): the min is -8 d
            mins = d * -8
        return "int4", q, (d.contiguous(), mins.float().contiguous()), None
