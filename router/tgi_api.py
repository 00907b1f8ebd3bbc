"""TGI's HTTP API: /generate, /generate_stream, / (compat), /tokenize, /info."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.core import HTTPError, RouterState, collect_or_cancel, state_of
from router.entry import Entry
from router.schemas import GenerateRequest, TokenizeRequest
from router.streaming import finite_or_none, sse, start_stream
from router.types import GenerationOut, TokenOut
from router.validation import ValidRequest, check_text, encode

api = APIRouter()


def token_json(token: TokenOut) -> dict:
    return {
        "id": token.id,
        "text": token.text,
        "logprob": finite_or_none(token.logprob),
        "special": token.special,
    }


def _details(generations: list[GenerationOut], input_length: int) -> dict:
    last = generations[-1].finished
    assert last is not None
    tokens = [t for g in generations for t in g.tokens]
    prefill = generations[0].prefill
    return {
        "finish_reason": last.finish_reason,
        "generated_tokens": last.generated_tokens,
        "seed": last.seed,
        "prefill": [
            {"id": t.id, "text": t.text, "logprob": finite_or_none(t.logprob)}
            for t in prefill or []
        ],
        "tokens": [token_json(t) for t in tokens],
        "top_tokens": [
            [token_json(t) for t in g.top_tokens[0]] for g in generations if g.top_tokens
        ],
    }


def _sequence_logprob(generations: list[GenerationOut]) -> float:
    return sum(t.logprob for g in generations for t in g.tokens)


async def _validated(state: RouterState, body: GenerateRequest) -> ValidRequest:
    return await state.validator.validate(body.inputs, body.parameters)


def timing_headers(
    state: RouterState, valid: ValidRequest, entry: Entry, started: float
) -> dict[str, str]:
    """TGI's x-* headers of a finished generation: times in milliseconds (x-compute-time in
    seconds), the total from the handler's start (`started`, monotonic)."""
    assert entry.started_at is not None and entry.finished_at is not None
    total = entry.finished_at - started
    inference = entry.finished_at - entry.started_at
    per_token = inference / entry.num_generated if entry.num_generated else 0.0

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": f"{state.num_shards}-{state.shard_info.device_type}",
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(len(valid.inputs)),
        "x-total-time": ms(total),
        "x-validation-time": ms(valid.validation_seconds),
        "x-queue-time": ms(entry.started_at - entry.queued_at),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(entry.input_length),
        "x-generated-tokens": str(entry.num_generated),
    }


async def run_generate(
    state: RouterState, request: Request, body: GenerateRequest
) -> tuple[dict, dict[str, str]]:
    """The /generate reply and its timing headers (those of the best of `best_of` runs)."""
    started = time.monotonic()
    valid = await _validated(state, body)
    entries = [state.submit(valid)]
    for _ in range(valid.best_of - 1):  # best_of: more samples with their own seeds
        entries.append(state.submit(valid, replace(valid.params, seed=random.getrandbits(63))))
    results = await collect_or_cancel(state, request, entries)
    best = max(range(len(results)), key=lambda i: _sequence_logprob(results[i]))
    generations = results[best]
    finished = generations[-1].finished
    assert finished is not None
    prefix = body.inputs if body.parameters.return_full_text else ""
    response: dict = {"generated_text": prefix + finished.text}
    if body.parameters.details:
        response["details"] = _details(generations, valid.input_length)
        if valid.best_of > 1:
            response["details"]["best_of_sequences"] = [
                {"generated_text": prefix + r[-1].finished.text, **_details(r, valid.input_length)}  # type: ignore[union-attr]
                for i, r in enumerate(results)
                if i != best
            ]
    return response, timing_headers(state, valid, entries[best], started)


async def stream_events(
    state: RouterState, body: GenerateRequest, valid: ValidRequest
) -> AsyncIterator[bytes]:
    """TGI's SSE stream; errors after the start arrive as a final `{"error", "error_type"}`."""
    try:
        entry = state.submit(valid)
        index = 0
        async for generation in state.stream(entry):
            finished = generation.finished
            for token in generation.tokens:
                index += 1
                event: dict = {
                    "index": index,
                    "token": token_json(token),
                    "top_tokens": [token_json(t) for t in generation.top_tokens[0]]
                    if generation.top_tokens
                    else None,
                    "generated_text": None,
                    "details": None,
                }
                if finished is not None:
                    prefix = body.inputs if body.parameters.return_full_text else ""
                    event["generated_text"] = prefix + finished.text
                    event["details"] = {
                        "finish_reason": finished.finish_reason,
                        "generated_tokens": finished.generated_tokens,
                        "seed": finished.seed,
                        "input_length": valid.input_length,
                    }
                yield sse(event)
    except HTTPError as exc:
        yield sse({"error": exc.message, "error_type": exc.error_type})


async def _tgi_stream(state: RouterState, body: GenerateRequest) -> StreamingResponse:
    async def make():
        if body.parameters is not None and body.parameters.decoder_input_details:
            raise HTTPError(  # as TGI: a stream has no place for the prompt's details
                422,
                "validation",
                "`decoder_input_details` == true is not supported when streaming tokens",
            )
        valid = await _validated(state, body)
        if valid.best_of > 1:
            raise HTTPError(422, "validation", "`best_of` != 1 is not allowed for this endpoint")
        return stream_events(state, body, valid)

    return await start_stream(state, make)


@api.post("/generate", summary="Generate tokens")
async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
    state = state_of(request)
    async with state.slot():
        response, headers = await run_generate(state, request, body)
    return JSONResponse(response, headers=headers)


@api.post("/generate_stream", summary="Generate a stream of tokens (Server-Sent Events)")
async def generate_stream(request: Request, body: GenerateRequest) -> StreamingResponse:
    return await _tgi_stream(state_of(request), body)


@api.post("/", summary="Generate (TGI compat: `stream` selects SSE)")
async def compat_generate(request: Request, body: GenerateRequest):
    state = state_of(request)
    if body.stream:
        return await _tgi_stream(state, body)
    async with state.slot():
        response, headers = await run_generate(state, request, body)
    return JSONResponse([response], headers=headers)  # a list, as TGI's / answers


def tokenized_json(tokenizer, text: str, add_special_tokens: bool) -> bytes:
    """The /tokenize reply, built in slices: json.dumps holds the GIL for its whole call, so
    one call over 400k tokens would stall the event loop for about half a second."""
    encoding = encode(tokenizer, text, add_special_tokens)
    tokens = list(zip(encoding.ids, encoding.offsets, strict=True))
    slices = [
        json.dumps(
            [
                {"id": i, "text": text[start:stop], "start": start, "stop": stop}
                for i, (start, stop) in tokens[first : first + TOKENIZE_SLICE]
            ]
        )[1:-1]
        for first in range(0, len(tokens), TOKENIZE_SLICE)
    ]
    return ("[" + ", ".join(slices) + "]").encode()


TOKENIZE_SLICE = 4096


@api.post("/tokenize", summary="Tokenize inputs")
async def tokenize(request: Request, body: TokenizeRequest) -> Response:
    """Counted by --max-concurrent-requests; tokens and JSON are built in the worker pool."""
    state = state_of(request)
    check_text("inputs", body.inputs)
    async with state.slot():
        validator = state.validator
        content = await validator.run(
            tokenized_json, validator.tokenizer, body.inputs, body.add_special_tokens
        )
    return Response(content, media_type="application/json")


@api.get("/info", summary="Model and router info")
async def info(request: Request) -> JSONResponse:
    state = state_of(request)
    s, lim, shard = state.settings, state.validator.limits, state.shard_info
    return JSONResponse(
        {
            "model_id": s.model_id,
            "model_sha": None,
            "model_dtype": shard.dtype,
            "model_device_type": shard.device_type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": lim.max_best_of,
            "max_stop_sequences": lim.max_stop_sequences,
            "max_input_tokens": lim.max_input_tokens,
            "max_total_tokens": lim.max_total_tokens,
            "max_client_batch_size": s.max_client_batch_size,
            "validation_workers": state.validator.workers,
            "router": "pytgi-router",
            "version": "0.1.0",
            "sha": None,
            "docker_label": None,
            "num_shards": state.num_shards,
            "block_size": shard.block_size,
            "attention_impl": shard.attention_impl,
            "support_chunking": shard.support_chunking,
            "use_prefix_caching": shard.use_prefix_caching,
            "max_supported_total_tokens": state.warmup.max_supported_total_tokens,
            "max_batch_total_tokens": state.scheduler.config.max_batch_total_tokens,
            "max_batch_prefill_tokens": state.scheduler.config.max_batch_prefill_tokens,
            # pytgi extensions (from the shards' Info after Warmup)
            "device_name": shard.device_name,
            "device_memory_used_bytes": shard.device_memory_used,
            "device_memory_total_bytes": shard.device_memory_total,
            "kv_cache_blocks": shard.kv_cache_blocks,
            "kv_cache_bytes": shard.kv_cache_bytes,
            "cuda_graph_batch_sizes": list(shard.cuda_graph_batch_sizes),
        }
    )
