"""Request validation with TGI's rules and messages; tokenization off the event loop."""

from __future__ import annotations

import asyncio
import math
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tokenizers import Tokenizer

from router.schemas import GenerateParameters
from router.types import Params


class ValidationError(Exception):
    """A request that breaks a rule: answered 422 with error_type "validation"."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5


@dataclass(frozen=True, slots=True)
class ValidRequest:
    inputs: str
    input_length: int
    params: Params
    best_of: int
    input_ids: tuple[int, ...] = ()  # after truncation, as the shard will tokenize them


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low < value < high:
        raise ValidationError(f"`{name}` must be > {low} and < {high}. Given: {value}")


class Validator:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    async def tokenize(self, text: str, add_special_tokens: bool = True):
        """Encoding of `text`, computed in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        )

    def _check_parameters(self, p: GenerateParameters) -> int:
        """Checks every parameter on its own; returns best_of."""
        lim = self.limits
        for name in (
            "temperature",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "frequency_penalty",
        ):
            value = getattr(p, name)
            if value is not None and not math.isfinite(value):
                raise ValidationError(f"`{name}` must be a finite number. Given: {value}")
        best_of = p.best_of if p.best_of is not None else 1
        if not 0 < best_of <= lim.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {lim.max_best_of}. Given: {best_of}"
            )
        sampling = (
            p.do_sample or p.temperature not in (None, 1.0) or p.top_k or p.top_p or p.typical_p
        )
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if best_of > 1 and p.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if p.temperature is not None and p.temperature <= 0:
            raise ValidationError(
                f"`temperature` must be strictly positive. Given: {p.temperature}"
            )
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            raise ValidationError(
                f"`repetition_penalty` must be strictly positive. Given: {p.repetition_penalty}"
            )
        fp = p.frequency_penalty
        if fp is not None and not -2.0 <= fp <= 2.0:
            raise ValidationError(f"`frequency_penalty` must be >= -2.0 and <= 2.0. Given: {fp}")
        _check_range("top_p", p.top_p, 0.0, 1.0)
        _check_range("typical_p", p.typical_p, 0.0, 1.0)
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError(f"`top_k` must be strictly positive. Given: {p.top_k}")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError(
                f"`max_new_tokens` must be strictly positive. Given: {p.max_new_tokens}"
            )
        if len(p.stop) > lim.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {lim.max_stop_sequences} stop sequences. "
                f"Given: {len(p.stop)}"
            )
        if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= lim.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {lim.max_top_n_tokens}. "
                f"Given: {p.top_n_tokens}"
            )
        if p.truncate is not None and not 0 < p.truncate <= lim.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {lim.max_input_tokens}. "
                f"Given: {p.truncate}"
            )
        if p.seed is not None and not 0 <= p.seed < 2**64:
            raise ValidationError(f"`seed` must be >= 0 and < 2^64. Given: {p.seed}")
        if p.watermark:
            raise ValidationError("`watermark` is not supported by this server")
        if p.grammar is not None:
            raise ValidationError("`grammar` is not supported by this server")
        if p.adapter_id:
            raise ValidationError("`adapter_id` is not supported by this server (no LoRA adapters)")
        return best_of

    async def validate(
        self, inputs: str, p: GenerateParameters, add_special_tokens: bool = True
    ) -> ValidRequest:
        best_of = self._check_parameters(p)
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        lim = self.limits
        ids = (await self.tokenize(inputs, add_special_tokens)).ids
        if p.truncate and len(ids) > p.truncate:
            ids = ids[-p.truncate :]
        input_length = len(ids)
        if input_length > lim.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {lim.max_input_tokens} tokens. Given: {input_length}"
            )
        max_new = p.max_new_tokens or lim.max_total_tokens - input_length
        if input_length + max_new > lim.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {lim.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        params = Params(
            max_new_tokens=max_new,
            temperature=p.temperature if p.temperature is not None else 1.0,
            top_k=p.top_k or 0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            typical_p=p.typical_p if p.typical_p is not None else 1.0,
            do_sample=p.do_sample,
            seed=seed,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            stop=tuple(p.stop),
            ignore_eos=p.ignore_eos,
            truncate=p.truncate or 0,
            prefill_logprobs=p.decoder_input_details,
            top_n_tokens=p.top_n_tokens or 0,
            add_special_tokens=add_special_tokens,
        )
        return ValidRequest(inputs, input_length, params, best_of, tuple(ids))
