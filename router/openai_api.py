"""OpenAI's HTTP API: /v1/chat/completions, /v1/completions, /v1/models; and TGI's
/chat_tokenize (the chat template's prompt, tokenized)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from router.core import HTTPError, RouterState, collect_or_cancel, state_of
from router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    _OpenAICommon,
)
from router.stops import StopMatcher, trim_at_stop
from router.streaming import finite_or_none, sse, start_stream
from router.tgi_api import tokenized_json
from router.types import GenerationOut, TokenOut
from router.validation import ValidationError, ValidRequest

api = APIRouter()

FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _parameters(body: _OpenAICommon, max_tokens: int | None, top_n: int) -> GenerateParameters:
    """OpenAI fields -> TGI parameters. As TGI: temperature 0 is greedy, otherwise sample."""
    if body.n not in (None, 1):
        raise ValidationError("`n` > 1 is not supported; send several requests")
    if body.presence_penalty:
        raise ValidationError("`presence_penalty` is not supported; use `frequency_penalty`")
    temperature = body.temperature
    do_sample = temperature != 0.0
    return GenerateParameters(
        max_new_tokens=max_tokens,
        temperature=temperature if do_sample else None,
        do_sample=do_sample,
        top_p=body.top_p if body.top_p not in (None, 1.0) else None,
        top_k=body.top_k,
        seed=body.seed,
        stop=_stops(body.stop),
        frequency_penalty=body.frequency_penalty or None,
        repetition_penalty=body.repetition_penalty,
        top_n_tokens=top_n or None,
        ignore_eos=body.ignore_eos,
    )


def _usage(valids: list[ValidRequest], generated: int) -> dict:
    prompt_tokens = sum(v.input_length for v in valids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
    }


def _chat_logprobs(generations: list[GenerationOut]) -> dict:
    content = []
    for g in generations:
        for i, token in enumerate(g.tokens):
            top = g.top_tokens[i] if i < len(g.top_tokens) else []
            content.append(_chat_logprob(token, top))
    return {"content": content}


def _chat_logprob(token: TokenOut, top: list[TokenOut]) -> dict:
    return {
        "token": token.text,
        "logprob": finite_or_none(token.logprob),
        "bytes": list(token.text.encode()),
        "top_logprobs": [
            {"token": t.text, "logprob": finite_or_none(t.logprob), "bytes": list(t.text.encode())}
            for t in top
        ],
    }


def _messages(body: ChatCompletionRequest) -> list[dict]:
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise ValidationError(
                        f"message content of type {part.get('type')!r} is not supported"
                    )
                parts.append(part.get("text", ""))
            content = "".join(parts)
        messages.append({"role": m.role, "content": content or ""})
    return messages


async def _templated(state: RouterState, body: ChatCompletionRequest) -> str:
    """The chat request's prompt: its messages through the model's chat template."""
    if not body.messages:
        raise ValidationError("`messages` cannot be empty")
    if body.tools:
        raise ValidationError("`tools` are not supported by this server")
    if body.response_format is not None:
        raise ValidationError("`response_format` (grammar) is not supported by this server")
    if state.chat_template is None:
        raise ValidationError("this model has no chat template; use /v1/completions")
    return await state.validator.run(state.chat_template.render, _messages(body))


async def _validate_chat(state: RouterState, body: ChatCompletionRequest) -> ValidRequest:
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("`top_logprobs` requires `logprobs` to be true")
    params = _parameters(body, body.max_completion_tokens or body.max_tokens, top_n)
    prompt = await _templated(state, body)
    return await state.validator.validate(prompt, params, add_special_tokens=False)


@api.post("/chat_tokenize", summary="The chat template's prompt for these messages, tokenized")
async def chat_tokenize(request: Request, body: ChatCompletionRequest) -> Response:
    """TGI's reply: `{"tokenize_response": [{id, text, start, stop}...], "templated_text"}`.
    The template already holds the special tokens, so none are added."""
    state = state_of(request)
    async with state.slot():
        prompt = await _templated(state, body)
        validator = state.validator
        tokens = await validator.run(tokenized_json, validator.tokenizer, prompt, False)
    content = b'{"tokenize_response": ' + tokens + b', "templated_text": '
    return Response(content + json.dumps(prompt).encode() + b"}", media_type="application/json")


def _base(kind: str, state: RouterState, request_id: str) -> dict:
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": state.settings.model_id,
        "system_fingerprint": "pytgi-0.1.0",
    }


@api.post("/v1/chat/completions", summary="OpenAI chat completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    state = state_of(request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stops = _stops(body.stop)
    if body.stream:

        async def make():
            valid = await _validate_chat(state, body)
            return _chat_stream(state, body, valid, request_id, stops)

        return await start_stream(state, make)
    return JSONResponse(await run_chat(state, request, body, request_id))


async def run_chat(
    state: RouterState, request: Request, body: ChatCompletionRequest, request_id: str
) -> dict:
    """A non-streamed chat completion, as its JSON object."""
    stops = _stops(body.stop)
    async with state.slot():
        valid = await _validate_chat(state, body)
        [generations] = await collect_or_cancel(state, request, [state.submit(valid)])
    finished = generations[-1].finished
    assert finished is not None
    response = _base("chat.completion", state, request_id)
    response["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": trim_at_stop(finished.text, stops)},
            "logprobs": _chat_logprobs(generations) if body.logprobs else None,
            "finish_reason": FINISH[finished.finish_reason],
        }
    ]
    response["usage"] = _usage([valid], finished.generated_tokens)
    return response


async def _chat_stream(
    state: RouterState,
    body: ChatCompletionRequest,
    valid: ValidRequest,
    request_id: str,
    stops: list[str],
) -> AsyncIterator[bytes]:
    base = _base("chat.completion.chunk", state, request_id)
    matcher = StopMatcher(stops)  # OpenAI leaves stop sequences out of the text
    try:
        async for generation in state.stream(state.submit(valid)):
            finished = generation.finished
            for i, token in enumerate(generation.tokens):
                piece = "" if token.special else token.text  # EOS and friends never reach text
                text = matcher.push(piece, finished is not None)
                choice = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": FINISH[finished.finish_reason] if finished else None,
                }
                if body.logprobs:
                    top = generation.top_tokens[i] if i < len(generation.top_tokens) else []
                    choice["logprobs"] = {"content": [_chat_logprob(token, top)]}
                yield sse({**base, "choices": [choice], "usage": None})
            if finished is not None and body.stream_options and body.stream_options.include_usage:
                yield sse(
                    {**base, "choices": [], "usage": _usage([valid], finished.generated_tokens)}
                )
        yield sse("[DONE]")
    except HTTPError as exc:
        yield sse({"error": exc.message, "error_type": exc.error_type})


async def _validate_prompts(state: RouterState, body: CompletionRequest) -> list[ValidRequest]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ValidationError("`prompt` cannot be empty")
    if len(prompts) > state.settings.max_client_batch_size:
        raise ValidationError(
            f"`prompt` holds {len(prompts)} prompts; "
            f"at most {state.settings.max_client_batch_size} are allowed"
        )
    if body.best_of not in (None, 1):
        raise ValidationError("`best_of` is not supported on /v1/completions")
    params = _parameters(body, body.max_tokens or 16, body.logprobs or 0)
    return list(await asyncio.gather(*(state.validator.validate(p, params) for p in prompts)))


def _completion_logprobs(generations: list[GenerationOut]) -> dict:
    tokens = [t for g in generations for t in g.tokens]
    top = [
        {t.text: finite_or_none(t.logprob) for t in g.top_tokens[0]} if g.top_tokens else None
        for g in generations
    ]
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [finite_or_none(t.logprob) for t in tokens],
        "top_logprobs": top,
        "text_offset": offsets,
    }


@api.post("/v1/completions", summary="OpenAI completions (one prompt or a list)")
async def completions(request: Request, body: CompletionRequest):
    state = state_of(request)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stops = _stops(body.stop)
    if body.stream:

        async def make():
            valids = await _validate_prompts(state, body)
            return _completion_stream(state, body, valids, request_id, stops)

        return await start_stream(state, make)
    async with state.slot():
        valids = await _validate_prompts(state, body)
        results = await collect_or_cancel(state, request, [state.submit(v) for v in valids])
    choices, generated = [], 0
    for index, (valid, generations) in enumerate(zip(valids, results, strict=True)):
        finished = generations[-1].finished
        assert finished is not None
        generated += finished.generated_tokens
        text = trim_at_stop(finished.text, stops)
        choices.append(
            {
                "index": index,
                "text": (valid.inputs + text) if body.echo else text,
                "logprobs": _completion_logprobs(generations) if body.logprobs else None,
                "finish_reason": FINISH[finished.finish_reason],
            }
        )
    response = _base("text_completion", state, request_id)
    response["choices"] = choices
    response["usage"] = _usage(valids, generated)
    return JSONResponse(response)


async def _completion_stream(
    state: RouterState,
    body: CompletionRequest,
    valids: list[ValidRequest],
    request_id: str,
    stops: list[str],
) -> AsyncIterator[bytes]:
    base = _base("text_completion", state, request_id)
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, valid: ValidRequest) -> None:
        matcher = StopMatcher(stops)
        try:
            async for generation in state.stream(state.submit(valid)):
                finished = generation.finished
                piece = "".join(t.text for t in generation.tokens if not t.special)
                text = matcher.push(piece, finished is not None)
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": FINISH[finished.finish_reason] if finished else None,
                }
                await queue.put((choice, finished.generated_tokens if finished else 0))
        except HTTPError as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, v)) for i, v in enumerate(valids)]
    try:
        remaining, generated = len(tasks), 0
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, HTTPError):
                yield sse({"error": item.message, "error_type": item.error_type})
                continue
            choice, count = item
            generated += count
            yield sse({**base, "choices": [choice], "usage": None})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": _usage(valids, generated)})
        yield sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()


@api.get("/v1/models", summary="The served model")
async def models(request: Request) -> JSONResponse:
    state = state_of(request)
    model = {"id": state.settings.model_id, "object": "model", "created": 0, "owned_by": "pytgi"}
    return JSONResponse({"object": "list", "data": [model]})
