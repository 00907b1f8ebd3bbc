"""Per-tensor scales of an fp8 KV cache, measured once on a fixed English text.

A scale s stores x as fp8(x / s). With s = 1 (TGI's default without checkpoint scales) a
layer whose values are small loses them to e4m3's subnormals (below 2^-6: SmolLM2's first
layer has 42% of its V values there); with s = MARGIN * max|x| / 448 every value the text
produced sits in the normal range, and values up to MARGIN times larger still fit before
saturating. Measured on SmolLM2 over 2,000 tokens of CPython's LICENSE (a different text):
perplexity +3.5% over float32 K/V with s = 1, +2.4% with these scales.
"""

from __future__ import annotations

import torch

from shard.kv_cache import FP8_MAX, KVCache, KVScales

MARGIN = 4.0  # headroom over the calibration text's largest value
# Our own paragraph: ordinary prose, numbers and a little code, about 250 tokens.
CALIBRATION_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening, except on "
    "Sundays, when it stays closed. Most visitors come for the reading room on the second "
    "floor, where long oak tables face tall windows. In 1998 the city added a small room "
    "for computers; today it holds twelve machines and a printer that jams about twice a "
    "week. Children's books are kept downstairs, next to a corner with cushions and a map "
    "of the world painted on the wall. Ask the staff about the history of the building: it "
    "was a bank until 1952, and the old vault now stores rare maps and letters.\n\n"
    "Question: How many hours a day is the library open on weekdays?\n"
    "Answer: It opens at 9:00 and closes at 18:00, so it is open for 9 hours.\n\n"
    "def opening_hours(opens: int, closes: int) -> int:\n"
    "    return closes - opens\n\n"
    "print(opening_hours(9, 18))  # 9\n\n"
    "Volunteers run a reading club every Thursday. Last month they read a novel about a "
    "lighthouse keeper who writes letters to ships that never answer, and the discussion "
    "went on long after closing time."
)


def scales_from(kv: KVCache, margin: float = MARGIN) -> list[KVScales]:
    """Each layer's (K, V) scales from the values a forward wrote into `kv` (block 0 and
    unwritten slots hold zeros, which change no maximum); 1.0 for a pool of zeros."""

    def scale(pool: torch.Tensor) -> float:
        top = pool.abs().max().float().item()
        return margin * top / FP8_MAX if top > 0 else 1.0

    return [KVScales(scale(k), scale(v)) for k, v in zip(kv.keys, kv.values, strict=True)]
