"""Rotary position embeddings (the rotate-half form) with transformers' scalings: default,
linear, llama3, dynamic, yarn and longrope, over all of the head or its first part
(`partial_rotary_factor`).

The tables are looked up by a rotary index per token, which is its position, except with
longrope: a request whose context passes `original_max_position_embeddings` uses the long
factors for all its tokens, as transformers does for a sequence that long, so its rows
lie after the short ones (`Rotary.long_after`; see shard/inputs.py).

Dynamic NTK scaling changes nothing within `max_position_embeddings`, and the engine never
serves past it (its max_total_tokens is capped there), so it uses the default frequencies.
"""

from __future__ import annotations

import math

import torch

from shard.spec import ModelSpec


def _default(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies blended between interpolated and extrapolated by a linear ramp over
    the dimensions; and the attention factor that scales cos and sin."""
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or max_positions
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    interpolated = extrapolated / factor
    keep = 1 - ramp  # the share of the extrapolated frequency
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _longrope_attention(scaling: dict, factor: float, original: int) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


class Rotary:
    """cos/sin tables [rows, rotary_dim / 2] in the model's dtype."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict | None,
        dtype: torch.dtype,
        device: torch.device,
        rotary_dim: int | None = None,  # the first dims of each head it rotates; None: all
        original_max: int | None = None,  # longrope: config's original_max_position_embeddings
    ) -> None:
        scaling = scaling or {}
        dim = rotary_dim or head_dim
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        self.rotary_dim = dim
        self.long_after = 0  # longrope: contexts longer than this read the long rows
        attention = 1.0
        inv_freq = _default(dim, theta)
        if kind == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, scaling)
        elif kind == "yarn":
            inv_freq, attention = _yarn(dim, theta, scaling, max_positions)
        if kind != "longrope":
            self.cos, self.sin = self._tables(inv_freq, max_positions, attention, dtype, device)
            return
        # Phi-3 keeps its pretraining length beside the extended one; their ratio is the factor
        original = original_max or max_positions
        factor = max_positions / original_max if original_max else scaling.get("factor", 1.0)
        attention = _longrope_attention(scaling, factor, original)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * theta**shape)
        long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * theta**shape)
        short_cos, short_sin = self._tables(short, original, attention, dtype, device)
        long_cos, long_sin = self._tables(long, max_positions, attention, dtype, device)
        self.cos, self.sin = torch.cat([short_cos, long_cos]), torch.cat([short_sin, long_sin])
        self.long_after = original

    @classmethod
    def for_model(
        cls, spec: ModelSpec, dtype: torch.dtype, device: torch.device, theta: float | None = None
    ) -> Rotary:
        """The model's RoPE from its config; `theta` given: that base, unscaled (Gemma 3's
        sliding layers)."""
        config = spec.config
        return cls(
            spec.head_dim,
            spec.max_position_embeddings,
            theta if theta is not None else spec.rope_theta,
            None if theta is not None else spec.rope_scaling,
            dtype,
            device,
            rotary_dim=int(spec.head_dim * config.get("partial_rotary_factor", 1.0)),
            original_max=config.get("original_max_position_embeddings"),
        )

    @staticmethod
    def _tables(inv_freq, positions: int, attention: float, dtype, device):
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)  # [P, d/2]
        cos, sin = freqs.cos() * attention, freqs.sin() * attention
        return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for rotary indices [T], each [T, 1, rotary_dim / 2], broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] -> rotated [T, heads, D]; dimensions past 2 * cos's width pass."""
        rotary = 2 * cos.shape[-1]
        if rotary < x.shape[-1]:
            rotated = Rotary.apply(x[..., :rotary], cos, sin)
            return torch.cat((rotated, x[..., rotary:]), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
