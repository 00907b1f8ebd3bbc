"""Quantized weights packed for `qpanel_linear` (shard/csrc/qpanels.cpp), where a CPU has
AVX-512 (F and BW) and the model serves float32, or bf16 dot products too and bfloat16.

Units of 32 output columns (two panels of 16); rows past N are zero codes with zero scales.
Per pair of inputs (2p, 2p + 1), word i of a panel (i = 2 j + h) is column j's code for
input 2p + h:
- int8: codes int8 [U, K / 2, 64]: per pair, panel 0's 32 words then panel 1's.
- int4: codes uint8 [U, K / 4, 64]: per two pairs, 32 little-endian 16-bit words, word i
  holding (pair 0, panel 0), (pair 0, panel 1), (pair 1, panel 0), (pair 1, panel 1)'s word i
  in its nibbles, lowest first. The kernel reads a code c as 16 + c (and takes 16 s from
  each min as it scales the group).
Scales and int4's mins m (w = s c + m), [U, G, 32]: float16 where every one is a float16
value (GGUF's Q8_0, Q4_0 and Q4_1; int8 and int4 quantized on load), else float32 (Q4_K's
and Q6_K's products of two scales, GPTQ's mins s z). int4 in groups of 32 reads 16 bytes of
codes a group and column: float16 parameters make it 20 bytes, not 24.
"""

from __future__ import annotations

import torch

UNIT = 32  # output columns of a unit


def _padded(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [U * 32, ...], zero rows past N."""
    extra = -t.shape[0] % UNIT
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


def _words(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> [U, K / 2, 2 (panel), 32 (word 2 j + h)]."""
    n, k = _padded(codes).shape
    units = _padded(codes).view(n // UNIT, 2, UNIT // 2, k // 2, 2)  # unit, panel, j, pair, h
    return units.permute(0, 3, 1, 2, 4).reshape(n // UNIT, k // 2, 2, UNIT)


def params(values: torch.Tensor) -> torch.Tensor:
    """scales or mins [N, G] -> [U, G, 32], same dtype."""
    padded = _padded(values)
    return padded.view(-1, UNIT, padded.shape[1]).transpose(1, 2).contiguous()


def _exact_dtype(*values: torch.Tensor) -> torch.dtype:
    """float16 if every value is a float16 value, else float32."""
    exact = all(torch.equal(v.half().float(), v.float()) for v in values)
    return torch.float16 if exact else torch.float32


def int8_panels(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [N, K] (K even), scales [N, G] -> (codes [U, K / 2, 64], scales [U, G, 32])."""
    words = _words(q)
    codes = words.reshape(words.shape[0], words.shape[1], 2 * UNIT).contiguous()
    return codes, params(scales.to(_exact_dtype(scales)))


def int4_panels(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] in 0..15 (K a multiple of 4), scales, mins [N, G] -> (codes
    [U, K / 4, 64], scales [U, G, 32], mins [U, G, 32])."""
    words = _words(codes)
    two = words.view(words.shape[0], words.shape[1] // 2, 2, 2, UNIT)  # [U, K/4, pair, panel, i]
    low = two[:, :, 0, 0] | (two[:, :, 0, 1] << 4)  # each word's low byte (little-endian)
    high = two[:, :, 1, 0] | (two[:, :, 1, 1] << 4)
    packed = torch.stack([low, high], dim=-1).reshape(two.shape[0], two.shape[1], 2 * UNIT)
    dtype = _exact_dtype(scales, mins)
    return packed.contiguous(), params(scales.to(dtype)), params(mins.to(dtype))
