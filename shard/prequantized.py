"""Quantized checkpoints (`common.model_spec.prequantized`) seen as plain tensor names: GPTQ
and AWQ layers `X` are `X.qweight`, `X.qzeros`, `X.scales` (and GPTQ's `X.g_idx`) in place of
`X.weight`, compressed-tensors' 4-bit ones `X.weight_packed` and `X.weight_scale`; this store
serves `X.weight` in `shard.models.quant`'s int4 form (w = s q + m, with m = -s z held
exactly in float32). fp8 weights (`X.weight` in float8_e4m3fn with `X.weight_scale` per
tensor or channel, or transformers' `X.weight_scale_inv` per 128 x 128 block): on a GPU
with fp8 products, per-tensor and per-channel ones are served as stored (`packed` gives
("fp8", weight, (scales [N, 1],), None); shard/models/fp8.py); block-scaled ones, and every
one elsewhere (CPUs have no fast fp8 products), are multiplied out on load (logged once).

Published layouts (int32 words of eight 4-bit values, the first in the low bits):
- GPTQ: qweight [K / 8, N] packs 8 consecutive inputs per word; qzeros [G, N / 8] packs 8
  consecutive outputs; scales [G, N]; g_idx [K] names each input's group. The original
  format ("gptq", v1) stores each zero minus one. w[n, k] = s[g, n] (q[k, n] - z[g, n]),
  g = g_idx[k]. With act-order (desc_act) the groups are not contiguous along the inputs:
  the inputs are reordered so that they are, and the layer reorders x the same way.
- AWQ (GEMM): qweight [K, N / 8] and qzeros [G, N / 8] pack 8 outputs per word in the order
  0, 2, 4, 6, 1, 3, 5, 7; scales [G, N]; w[n, k] = s[k / g, n] (q[k, n] - z[k / g, n]).
- compressed-tensors pack-quantized (symmetric): weight_packed [N, K / 8] packs 8 inputs per
  word, each the signed value plus 8; weight_scale [N, G]; w[n, k] = s[n, k / g] (q - 8).
"""

from __future__ import annotations

import logging

import torch

from shard.errors import ModelLoadError
from shard.loader import WeightStore
from shard.models.quant import dequantize_int4, pack_int4

log = logging.getLogger("shard")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble i holds output 8 c + AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)

Packed = tuple[str, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None]


def unpack_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit values (low bits first) along `dim`, as int32."""
    nibbles = (words.unsqueeze(dim + 1) >> _SHIFTS.view([8] + [1] * (words.dim() - dim - 1))) & 15
    shape = list(words.shape)
    shape[dim] *= 8
    return nibbles.reshape(shape)


def from_awq_order(values: torch.Tensor) -> torch.Tensor:
    """[..., N] unpacked from AWQ words -> outputs in their natural order."""
    groups = values.view(*values.shape[:-1], -1, 8)
    out = torch.empty_like(groups)
    out[..., list(AWQ_ORDER)] = groups
    return out.view(values.shape)


class PrequantizedStore:
    """A safetensors checkpoint of GPTQ or AWQ layers behind the WeightStore interface:
    `packed(name)` gives a quantized layer's int4 form and input order (act-order)."""

    def __init__(self, store: WeightStore, settings: dict, fp8_products: bool = False) -> None:
        self.store, self.settings, self.fp8_products = store, settings, fp8_products
        self.method = settings["method"]
        self.packing = "compressed" if settings.get("weights") == "int4" else self.method
        self._told = False

    def _quantized(self, name: str) -> str | None:
        """`X` when `name` is `X.weight` of a packed 4-bit layer."""
        base = name.removesuffix(".weight")
        packed = "weight_packed" if self.packing == "compressed" else "qweight"
        return base if name.endswith(".weight") and f"{base}.{packed}" in self.store else None

    def __contains__(self, name: str) -> bool:
        return name in self.store or self._quantized(name) is not None

    def shape(self, name: str) -> list[int]:
        base = self._quantized(name)
        if base is None:
            return self.store.shape(name)
        if self.packing == "compressed":
            rows, words = self.store.shape(f"{base}.weight_packed")
            return [rows, words * 8]
        rows, cols = self.store.shape(f"{base}.qweight")
        return [cols, rows * 8] if self.method == "gptq" else [cols * 8, rows]

    def _fp8_scale(self, name: str) -> str | None:
        """The scale tensor's name when `name` is an fp8 weight (names only, nothing read)."""
        if not name.endswith(".weight"):
            return None
        base = name.removesuffix(".weight")
        scales = (f"{base}.{s}" for s in ("weight_scale", "weight_scale_inv"))
        return next((s for s in scales if s in self.store), None)

    def _fp8(self, name: str, scale_name: str) -> torch.Tensor:
        """An fp8 weight times its scales (per tensor, per channel or per block), float32."""
        weight = self.store.get(name).float()
        scale = self.store.get(scale_name).float()
        if scale.dim() == 2 and scale.shape[1] > 1:  # [N / b, K / b] blocks
            rows, cols = self.settings.get("block", (128, 128))
            scale = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
            scale = scale[: weight.shape[0], : weight.shape[1]]
        elif scale.dim() == 1 and scale.numel() == weight.shape[0] > 1:
            scale = scale[:, None]
        if not self._told:
            self._told = True
            why = "block scales" if self.fp8_products else "no fp8 products on this device"
            log.info("fp8 weights are multiplied out to the serving dtype on load (%s)", why)
        return weight * scale

    def _fp8_form(self, name: str) -> Packed | None:
        """An fp8 weight as stored with one scale per output row, when this device
        multiplies fp8 and the scale is per tensor or per channel; None otherwise."""
        scale_name = self._fp8_scale(name) if self.fp8_products else None
        if scale_name is None:
            return None
        rows = self.store.shape(name)[0]
        scale = self.store.get(scale_name).float().reshape(-1)
        if scale.numel() not in (1, rows):  # blocks
            return None
        return "fp8", self.store.get(name), (scale.expand(rows).reshape(rows, 1),), None

    def get(self, name: str) -> torch.Tensor:
        form = None if self._quantized(name) is None else self.packed(name)
        if form is None:
            scale_name = self._fp8_scale(name)
            return self.store.get(name) if scale_name is None else self._fp8(name, scale_name)
        _, q, params, order = form
        weight = dequantize_int4(q, *params)
        if order is not None:  # back to the checkpoint's input order
            weight = weight[:, torch.argsort(order)]
        return weight

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if self._quantized(name) is None and self._fp8_scale(name) is None:
            return self.store.get_slice(name, dim, start, stop)
        whole = self.get(name)
        return whole[start:stop] if dim == 0 else whole[:, start:stop]

    def packed(self, name: str) -> Packed | None:
        """("int4", q [N, K / 2], (scales [N, G], mins [N, G]), input order [K] or None), or
        an fp8 weight's form (see _fp8_form)."""
        base = self._quantized(name)
        if base is None:
            return self._fp8_form(name)
        if self.packing == "compressed":
            return self._compressed(base)
        words = self.store.get(f"{base}.qweight").to(torch.int32)
        zero_words = self.store.get(f"{base}.qzeros").to(torch.int32)
        scales = self.store.get(f"{base}.scales").to(torch.float16)  # [G, N]
        if self.method == "gptq":
            codes = unpack_words(words, 0)  # [K, N]
            zeros = unpack_words(zero_words, 1) + int(self.settings["zeros_minus_one"])
        else:
            codes = from_awq_order(unpack_words(words, 1))
            zeros = from_awq_order(unpack_words(zero_words, 1))
        k, n = codes.shape
        groups = scales.shape[0]
        group = k // groups
        order, group_of = None, self._group_index(base, k, group)
        if group_of is not None:
            order = torch.argsort(group_of, stable=True)
            if not torch.equal(
                torch.bincount(group_of, minlength=groups), torch.full((groups,), group)
            ):
                raise ModelLoadError(f"{base}: g_idx does not give every group {group} inputs")
            codes = codes[order]
        if group % 32 or k % 32:
            raise ModelLoadError(f"{base}: groups of {group} inputs; pytgi needs multiples of 32")
        mins = -(scales.float() * zeros[:, :n].float())  # exact: a float16 times 0..16
        q = pack_int4(codes.t().contiguous().to(torch.uint8))
        return "int4", q, (scales.t().contiguous(), mins.t().contiguous()), order

    def _compressed(self, base: str) -> Packed:
        codes = unpack_words(self.store.get(f"{base}.weight_packed").to(torch.int32), 1)  # [N, K]
        scales = self.store.get(f"{base}.weight_scale").float()  # [N, G]
        if scales.dim() == 1:
            scales = scales[:, None]
        n, k = codes.shape
        if (k // scales.shape[1]) % 32:
            raise ModelLoadError(
                f"{base}: groups of {k // scales.shape[1]} inputs; pytgi needs multiples of 32"
            )
        halves = scales.half()  # the kernels' scales (float16 holds bf16 scales of weights)
        mins = -8 * halves.float()  # w = s (q - 8)
        q = pack_int4(codes.to(torch.uint8))
        return "int4", q, (halves.contiguous(), mins.contiguous()), None

    def _group_index(self, base: str, k: int, group: int) -> torch.Tensor | None:
        """GPTQ's g_idx when it is not the plain k // group (act-order); else None."""
        name = f"{base}.g_idx"
        if self.method != "gptq" or name not in self.store:
            return None
        group_of = self.store.get(name).to(torch.int64)
        plain = torch.arange(k) // group
        return None if torch.equal(group_of, plain) else group_of
