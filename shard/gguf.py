"""A GGUF file (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 or Gemma 3 architecture) as a
weight store: its tensors under Hugging Face's names, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K ones
also in their packed forms, so they are served as they are.

GGUF stores a [N, K] weight as N rows of blocks along the inputs: Q8_0 blocks of 32 are a
float16 scale d and 32 int8 (w = d q); Q4_0 blocks are d and 16 bytes of nibbles
(w = d (q - 8)); Q4_1 blocks are d, a float16 min m and the nibbles (w = d q + m), byte j
holding inputs j and j + 16 (the layout `shard.models.quant` keeps); Q4_K super-blocks of
256 become eight such groups with float32 scales and mins, Q6_K ones int8 in groups of 16
with float32 scales (`GgufStore._q4_k`, `_q6_k`). llama.cpp's converter interleaves the rows
of Llama's (and Mistral's) q and k projections for its rotary form; they are put back in
Hugging Face's order (a row permutation, so packed rows move whole); the other families'
are stored in Hugging Face's order. Phi-3 keeps its fused qkv and gate_up tensors; Gemma's
norm weights are stored as 1 + w (llama.cpp folds Gemma's "1 + weight" into them) and are
read back as w. Other tensor types are dequantized by the `gguf` package, once each.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shard.errors import ModelLoadError
from shard.gguf_file import GgufFile

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
# Phi-3: fused q/k/v and gate/up tensors under llama.cpp's names
_PHI3_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",  # gate rows, then up rows
    "ffn_down": "mlp.down_proj",
}
# Gemma 2 / 3: four norms per layer (llama.cpp's ffn_norm is the pre-MLP one)
_GEMMA_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter stored one family."""

    names: dict[str, str] = field(default_factory=lambda: _LAYER_NAMES)  # layer parts -> HF
    interleaved: bool = False  # q/k rows interleaved for llama.cpp's rotary form
    norm_offset: float = 0.0  # norm weights stored as offset + w


ARCHITECTURES = {
    "llama": Architecture(interleaved=True),
    "mistral": Architecture(interleaved=True),
    "qwen2": Architecture(),
    "qwen3": Architecture(),
    "phi3": Architecture(names=_PHI3_NAMES),
    "gemma2": Architecture(names=_GEMMA_NAMES, norm_offset=1.0),
    "gemma3": Architecture(names=_GEMMA_NAMES, norm_offset=1.0),
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# bytes per block of 32 inputs
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
# K-quants served packed, in super-blocks of 256 inputs (Q4_K 144 bytes, Q6_K 210)
SUPER = 256
_SUPER_KINDS = ("Q4_K", "Q6_K")


def hf_name(name: str, names: dict[str, str] = _LAYER_NAMES) -> str | None:
    """A GGUF tensor name in Hugging Face's naming (`names`: the family's layer parts);
    None for names it lacks."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    return None


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row indices that undo llama.cpp's interleaving of q/k rows ([heads, 2, D / 2] ->
    [heads, D / 2, 2] per head): HF row i is GGUF row index[i]."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


class GgufStore:
    """The tensors of a GGUF file by Hugging Face name (the WeightStore interface),
    plus `packed(name)`: the packed form of a Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensor, else None."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.file = GgufFile(self.path)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path.name}: GGUF architecture {arch!r} is not served; GGUF files of "
                f"{', '.join(ARCHITECTURES)} are (other families: their safetensors)"
            )
        self.arch = ARCHITECTURES[arch]
        unread = [
            t.name
            for t in self.file.tensors
            if t.name.startswith("rope_") and t.name not in _ROPE_TENSORS.get(arch, ())
        ]
        if unread:
            raise ModelLoadError(
                f"{self.path.name}: rotary tensors {', '.join(unread)} are not read for "
                f"{arch}; serve its safetensors checkpoint"
            )
        self.heads = int(self._field(f"{arch}.attention.head_count"))
        self.kv_heads = int(self._field(f"{arch}.attention.head_count_kv") or self.heads)
        self._tensors: dict[str, Any] = {}
        for tensor in self.file.tensors:
            name = hf_name(tensor.name, self.arch.names)
            if name is not None:
                self._tensors[name] = tensor
        kinds = {t.tensor_type.name for t in self._tensors.values()}
        others = sorted(kinds - {*_BLOCK_BYTES, *_SUPER_KINDS, "F32", "F16", "BF16"})
        if others:
            log.info("%s: %s tensors are dequantized on load", self.path.name, ", ".join(others))

    def _field(self, key: str) -> Any:
        return self.file.value(key)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise ModelLoadError(f"weight {name} is missing from {self.path.name}")
        return self._tensors[name]

    def _order(self, name: str, rows: int) -> torch.Tensor | None:
        if not self.arch.interleaved:
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
        if self.arch.norm_offset and name.endswith("norm.weight"):
            out -= self.arch.norm_offset  # exact for 1 + w in [0.5, 2] (Sterbenz)
        order = self._order(name, out.shape[0])
        return out if order is None else out[order].contiguous()

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        whole = self.get(name)
        return whole[start:stop] if dim == 0 else whole[:, start:stop]

    def packed(self, name: str) -> tuple[str, torch.Tensor, tuple[torch.Tensor, ...], None] | None:
        """The tensor in `shard.models.quant`'s forms: ("int8", q [N, K], (scales [N, K/32],))
        or ("int4", q [N, K/2], (scales, mins)), inputs in order (None); None unless Q8_0,
        Q4_0, Q4_1, Q4_K or Q6_K."""
        tensor = self._tensor(name)
        kind = tensor.tensor_type.name
        if kind == "Q4_K":
            return self._q4_k(name, tensor)
        if kind == "Q6_K":
            return self._q6_k(name, tensor)
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

    def _super_blocks(self, name: str, tensor: Any) -> torch.Tensor:
        """The tensor's raw super-blocks [rows, K / 256, bytes], rows in HF's order."""
        rows, k = self.shape(name)
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).view(rows, k // SUPER, -1)
        order = self._order(name, rows)
        return raw if order is None else raw[order]

    def _q6_k(self, name: str, tensor: Any) -> tuple[str, torch.Tensor, tuple, None]:
        """Q6_K as int8 in groups of 16: per super-block of 256 inputs, 128 bytes of low
        nibbles (64-byte half h holds inputs 128h + t in its low nibbles and 128h + 64 + t
        in its high ones), 64 bytes of high 2-bit pairs (32-byte half h: bits 2j..2j+1 of
        byte t belong to input 128h + 32j + t), sixteen int8 scales s and a float16 d;
        w = d s (q - 32), so the codes q - 32 fit int8 and the scales are d s in float32
        (a float16 times an int8: exact)."""
        rows, k = self.shape(name)
        raw = self._super_blocks(name, tensor)
        supers = k // SUPER
        low = raw[..., :128].reshape(rows, supers, 2, 1, 64)
        low = torch.cat([low & 15, low >> 4], dim=3).reshape(rows, supers, SUPER)
        high = raw[..., 128:192].reshape(rows, supers, 2, 1, 32)
        high = torch.cat([(high >> shift) & 3 for shift in (0, 2, 4, 6)], dim=3)
        codes = (low | (high.reshape(rows, supers, SUPER) << 4)).to(torch.int16) - 32
        d = raw[..., 208:210].contiguous().view(torch.float16).float()  # [rows, supers, 1]
        scales = raw[..., 192:208].contiguous().view(torch.int8).float() * d
        q = codes.to(torch.int8).reshape(rows, k)
        return "int8", q, (scales.reshape(rows, k // 16),), None

    def _q4_k(self, name: str, tensor: Any) -> tuple[str, torch.Tensor, tuple, None]:
        """Q4_K as int4 in groups of 32: per super-block of 256 inputs a float16 d and dmin,
        12 bytes of eight 6-bit scales s and mins m, then 128 bytes in which 32-byte chunk c
        holds group 2c in its low nibbles and group 2c + 1 in its high ones (input t of a
        group in byte t). w = d s q - dmin m, so the groups' scales are d s in float32 (a
        float16 times a 6-bit integer: exact) and their mins -dmin m; the nibbles are
        repacked into the GGML block layout."""
        rows, k = self.shape(name)
        supers = k // SUPER
        raw = self._super_blocks(name, tensor)
        d = raw[..., 0:2].contiguous().view(torch.float16).float()  # [rows, supers, 1]
        dmin = raw[..., 2:4].contiguous().view(torch.float16).float()
        low6, high6, rest = raw[..., 4:16].reshape(rows, supers, 3, 4).unbind(2)
        scales = torch.cat([low6 & 0x3F, (rest & 0x0F) | ((low6 >> 2) & 0x30)], dim=-1)
        mins = torch.cat([high6 & 0x3F, (rest >> 4) | ((high6 >> 2) & 0x30)], dim=-1)
        chunks = raw[..., 16:].reshape(rows, supers, 4, 1, 32)
        nibbles = torch.cat([chunks & 15, chunks >> 4], dim=3).reshape(rows, supers * 8, 32)
        q = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).reshape(rows, k // 2)
        group_scales = (d * scales.float()).reshape(rows, k // BLOCK)
        group_mins = -(dmin * mins.float()).reshape(rows, k // BLOCK)
        return "int4", q.contiguous(), (group_scales, group_mins), None


# Gemma's 27B models scale queries by hidden / heads rather than head_dim (as llama.cpp
# decides, by their layer count): architecture -> block count of its 27B
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Rotary tensors llama.cpp writes in place of a config's RoPE scaling, read by gguf_config:
# Llama 3.1+'s per-frequency divisors, Phi-3's longrope factors
_ROPE_TENSORS = {
    "llama": ("rope_freqs.weight",),
    "phi3": ("rope_factors_long.weight", "rope_factors_short.weight"),
}


def llama3_divisors(
    dim: int, theta: float, factor: float, low: float, high: float, original: float
) -> list[float]:
    """What Llama 3's RoPE scaling divides each of the dim / 2 frequencies by (the values
    llama.cpp stores as rope_freqs): 1 for wavelengths under original / high, `factor` over
    original / low, a smooth blend between."""
    out = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_scaling(divisors: list[float], dim: int, theta: float) -> dict[str, Any] | None:
    """The rope_scaling that gives llama.cpp's rope_freqs `divisors`, with Llama 3's low and
    high frequency factors (1 and 4, as every Llama 3.x has); the original context length
    is read off a blended frequency (or 8192). ValueError when none reproduces them."""
    factor = max(divisors)
    if factor == 1.0:
        return None
    candidates = [8192.0]
    for i, value in enumerate(divisors):
        if 1.0 < value < factor:  # 1 / value = (1 - s) / factor + s, s = (original / wl - 1) / 3
            smooth = (1 / value - 1 / factor) / (1 - 1 / factor)
            candidates.append(round(2 * math.pi * theta ** (2 * i / dim) * (3 * smooth + 1)))
    for original in candidates:
        expected = llama3_divisors(dim, theta, factor, 1.0, 4.0, original)
        if np.allclose(expected, divisors, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": int(original),
            }
    raise ValueError("its rope_freqs are not Llama 3's RoPE scaling (low 1, high 4)")


def _tensor_values(gguf_file: GgufFile, name: str) -> list[float] | None:
    for tensor in gguf_file.tensors:
        if tensor.name == name:
            return np.asarray(tensor.data, dtype=np.float32).reshape(-1).tolist()
    return None


def gguf_config(path: str | Path) -> dict[str, Any]:
    """Config values of a GGUF file that transformers' GGUF reader leaves at its defaults:
    Gemma 2's soft-capping, Gemma's query scale, RoPE scaling (linear: Gemma 3 4B and
    larger; Llama 3.1+'s from its rope_freqs; Phi-3's longrope from its factor tensors),
    partial rotary dimensions (Phi-4-mini). Keys absent from the file are left out;
    ValueError for rope_freqs that are not Llama 3's scaling."""
    gguf_file = GgufFile(path)
    value = gguf_file.value

    arch = value("general.architecture")
    out: dict[str, Any] = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if arch == "gemma2" and value(f"{arch}.{key}") is not None:
            out[key] = float(value(f"{arch}.{key}"))
    hidden, heads = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    head_dim = value(f"{arch}.attention.key_length") or (hidden // heads if heads else None)
    if arch in _GEMMA_27B_LAYERS and head_dim:
        big = value(f"{arch}.block_count") == _GEMMA_27B_LAYERS[arch]
        out["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    if value(f"{arch}.rope.scaling.type") == "linear":
        out["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(value(f"{arch}.rope.scaling.factor")),
        }
    rotary = value(f"{arch}.rope.dimension_count") or head_dim
    if arch == "phi3" and rotary and head_dim and rotary < head_dim:
        out["partial_rotary_factor"] = rotary / head_dim
    divisors = _tensor_values(gguf_file, "rope_freqs.weight")
    if arch == "llama" and divisors is not None and rotary:
        theta = float(value(f"{arch}.rope.freq_base") or 10000.0)
        scaling = _llama3_scaling(divisors, rotary, theta)
        if scaling is not None:
            out["rope_scaling"] = scaling
    long = _tensor_values(gguf_file, "rope_factors_long.weight")
    if arch == "phi3" and long is not None:
        short = _tensor_values(gguf_file, "rope_factors_short.weight") or long
        out["rope_scaling"] = {"type": "longrope", "long_factor": long, "short_factor": short}
        original = value(f"{arch}.rope.scaling.original_context_length")
        if original:
            out["original_max_position_embeddings"] = int(original)
    return out
