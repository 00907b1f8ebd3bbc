"""Request validation with TGI's rules and messages; tokenization off the event loop."""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from opentelemetry import trace
from tokenizers import Tokenizer

from common.grammar import REGEX, GrammarCache, GrammarSpec, json_schema_spec
from router.schemas import GenerateParameters
from router.types import Params


class ValidationError(Exception):
    """A request that breaks a rule: answered 422 with error_type "validation"."""


UINT32_MAX = 2**32 - 1
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    # Characters per stop sequence: the stream's hold-back and the shard's check scale with it.
    max_stop_sequence_length: int = 1024
    grammar_support: bool = True  # False: --disable-grammar-support


@dataclass(frozen=True, slots=True)
class ValidRequest:
    inputs: str
    input_length: int
    params: Params
    best_of: int
    input_ids: tuple[int, ...] = ()  # after truncation, as the shard will tokenize them
    validation_seconds: float = 0.0  # checks and tokenization (tgi_request_validation_duration)


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low < value < high:
        raise ValidationError(f"`{name}` must be > {low} and < {high}. Given: {value}")


def as_float32(name: str, value: float | None) -> float | None:
    """The value the wire carries (protobuf `float`): rounded to float32, and finite there.
    Rules are checked on this value, so 1e-50 is 0 and 1e39 is out of range."""
    if value is None:
        return None
    try:
        rounded = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        rounded = math.inf
    if not math.isfinite(rounded):
        raise ValidationError(f"`{name}` must be a finite float32 number. Given: {value}")
    return rounded


def check_text(name: str, text: str) -> None:
    """Strings travel as UTF-8 (protobuf, tokenizer): a lone surrogate cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"`{name}` is not valid Unicode (character {exc.start} is a lone surrogate)"
        ) from None


def _check_uint32(name: str, value: int | None) -> None:
    if value is not None and value > UINT32_MAX:
        raise ValidationError(f"`{name}` must be < 2^32. Given: {value}")


def parse_grammar(value: object) -> GrammarSpec:
    """A grammar object as TGI takes it (`parameters.grammar`, chat `response_format`)."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValidationError(
            'grammar must be {"type": "json" | "json_schema" | "regex", "value": ...}'
        )
    kind, content = value["type"], value.get("value")
    try:
        if kind in ("json", "json_object"):
            return json_schema_spec({"type": "object"} if content is None else content)
        if kind == "json_schema":  # {"name": ..., "schema": {...}, "strict": ...}
            if not isinstance(content, dict) or "schema" not in content:
                raise ValueError('a json_schema grammar\'s value is {"name", "schema"}')
            return json_schema_spec(content["schema"])
    except ValueError as exc:
        raise ValidationError(f"invalid grammar: {exc}") from None
    if kind == "regex":
        if not isinstance(content, str) or not content:
            raise ValidationError("a regex grammar's value must be a non-empty string")
        check_text("grammar", content)
        return GrammarSpec(REGEX, content)
    raise ValidationError(f"unknown grammar type {kind!r}: json, json_schema or regex")


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool):
    """The tokenizer's encoding of `text`. Through `encode_batch`, which lets go of the GIL
    while it works: `encode` held it for the whole of a 2 MB prompt (~2 s during which the
    event loop, and every stream, stood still)."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias


_tracer = trace.get_tracer("pytgi.router")


class Validator:
    def __init__(self, tokenizer: Tokenizer, limits: Limits, workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.workers = workers
        self._grammars = GrammarCache(tokenizer, None, [])
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    async def run(self, fn, *args):
        """Runs `fn(*args)` in the worker pool: work that grows with a request's size
        (tokenizing, chat templates, large replies) never holds the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def tokenize(self, text: str, add_special_tokens: bool = True):
        """Encoding of `text`, computed in a worker thread."""
        return await self.run(encode, self.tokenizer, text, add_special_tokens)

    def _check_parameters(self, given: GenerateParameters) -> tuple[GenerateParameters, int]:
        """Checks every parameter on its own, each in the type it travels in to the shards
        (float32, uint32, UTF-8); returns the parameters with floats as float32 values, and
        best_of."""
        lim = self.limits
        p = given.model_copy(update={n: as_float32(n, getattr(given, n)) for n in FLOAT_FIELDS})
        for name in ("top_k", "max_new_tokens", "truncate", "top_n_tokens", "best_of"):
            _check_uint32(name, getattr(p, name))
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
        if p.temperature is not None and p.temperature < FLOAT32_MIN_NORMAL:
            raise ValidationError(
                f"`temperature` must be at least {FLOAT32_MIN_NORMAL:.3g} (a normal float32); "
                f"for greedy decoding leave sampling off. Given: {p.temperature}"
            )
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            raise ValidationError(
                f"`repetition_penalty` must be strictly positive. Given: {p.repetition_penalty}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(p, name)
            if value is not None and not -2.0 <= value <= 2.0:
                raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0. Given: {value}")
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
        for stop in p.stop:
            check_text("stop", stop)
            if len(stop) > lim.max_stop_sequence_length:
                raise ValidationError(
                    f"each `stop` sequence must be at most {lim.max_stop_sequence_length} "
                    f"characters. Given: {len(stop)}"
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
        if p.adapter_id:
            raise ValidationError("`adapter_id` is not supported by this server (no LoRA adapters)")
        return p, best_of

    def _logit_bias(self, given: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as (id, float32 bias) pairs, ids ascending."""
        if not given:
            return ()
        if len(given) > MAX_LOGIT_BIAS:
            raise ValidationError(f"`logit_bias` holds at most {MAX_LOGIT_BIAS} tokens")
        vocab = self.tokenizer.get_vocab_size()
        pairs = []
        for key, bias in given.items():
            token = int(key) if str(key).isdigit() else -1
            if not 0 <= token < vocab:
                raise ValidationError(f"`logit_bias` keys are token ids below {vocab}: {key!r}")
            value = as_float32("logit_bias", bias)
            if value is None or not -100 <= value <= 100:
                raise ValidationError(f"`logit_bias` values are in [-100, 100]. Given: {bias}")
            pairs.append((token, value))
        return tuple(sorted(pairs))

    async def check_grammar(self, value: object) -> GrammarSpec | None:
        """TGI's `grammar` ({"type": "json" | "json_object" | "json_schema" | "regex",
        "value": ...}) as a spec the engine compiles (in a worker thread: a large schema
        takes milliseconds); 422 with the engine's reason when it cannot be used."""
        if value is None:
            return None
        if not self.limits.grammar_support:
            raise ValidationError("grammar is not supported (--disable-grammar-support)")
        spec = value if isinstance(value, GrammarSpec) else parse_grammar(value)
        try:
            await self.run(self._grammars.matcher, spec)
        except ValueError as exc:
            raise ValidationError(f"invalid grammar: {exc}") from None
        return spec

    async def validate(
        self, inputs: str, p: GenerateParameters, add_special_tokens: bool = True
    ) -> ValidRequest:
        with _tracer.start_as_current_span("validation"):
            return await self._validate(inputs, p, add_special_tokens)

    async def _validate(
        self, inputs: str, p: GenerateParameters, add_special_tokens: bool
    ) -> ValidRequest:
        started = time.monotonic()
        p, best_of = self._check_parameters(p)
        grammar = await self.check_grammar(p.grammar)
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        check_text("inputs", inputs)
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
        logit_bias = self._logit_bias(p.logit_bias)
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
            presence_penalty=p.presence_penalty or 0.0,
            logit_bias=logit_bias,
            stop=tuple(p.stop),
            ignore_eos=p.ignore_eos,
            truncate=p.truncate or 0,
            prefill_logprobs=p.decoder_input_details,
            top_n_tokens=p.top_n_tokens or 0,
            add_special_tokens=add_special_tokens,
            grammar=grammar,
        )
        seconds = time.monotonic() - started
        return ValidRequest(inputs, input_length, params, best_of, tuple(ids), seconds)
