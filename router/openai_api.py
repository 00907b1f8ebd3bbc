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
from router.entry import Entry
from router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    _OpenAICommon,
)
from router.stops import StopMatcher, trim_at_stop
from router.streaming import finite_or_none, merged, sse, start_stream
from router.tgi_api import tokenized_json
from router.tools import CallStreamer, ToolPlan, parse_call, plan_tools, tools_in_prompt
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
        presence_penalty=body.presence_penalty or None,
        logit_bias=body.logit_bias or None,
        repetition_penalty=body.repetition_penalty,
        top_n_tokens=top_n or None,
        ignore_eos=body.ignore_eos,
    )


def response_grammar(fmt: object) -> dict | None:
    """Chat `response_format` -> TGI's grammar object. OpenAI's forms: {"type": "text"},
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}; TGI's: {"type": "json" | "json_object" | "json_schema" | "regex", "value"}."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ValidationError('`response_format` must be an object with a "type"')
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object" and "value" not in fmt:
        return {"type": "json", "value": {"type": "object"}}  # any JSON object
    if kind == "json_schema" and "value" not in fmt:
        return {"type": "json_schema", "value": fmt.get("json_schema")}
    return fmt


def _choices_per_prompt(state: RouterState, body: _OpenAICommon, prompts: int = 1) -> int:
    """`n`: completions per prompt; prompts x n at most --max-client-batch-size."""
    n = 1 if body.n is None else body.n
    limit = state.settings.max_client_batch_size
    if n < 1 or n * prompts > limit:
        raise ValidationError(
            f"`n` must be at least 1, and `n` x prompts at most {limit} "
            f"(--max-client-batch-size). Given: n={n} for {prompts} prompt(s)"
        )
    return n


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
        message: dict = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:  # an assistant's calls reach the template as sent
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


async def _templated(
    state: RouterState, body: ChatCompletionRequest, plan: ToolPlan | None = None
) -> str:
    """The chat request's prompt: its messages (and tools) through the model's chat template."""
    if not body.messages:
        raise ValidationError("`messages` cannot be empty")
    template = state.chat_template
    if template is None:
        raise ValidationError("this model has no chat template; use /v1/completions")
    messages = _messages(body)
    if plan is not None and template.takes_tools:
        return await state.validator.run(template.render, messages, plan.tools)
    if plan is not None:
        tools_in_prompt(messages, plan, body.tool_prompt)
    return await state.validator.run(template.render, messages)


async def _validate_chat(
    state: RouterState, body: ChatCompletionRequest
) -> tuple[ValidRequest, ToolPlan | None]:
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("`top_logprobs` requires `logprobs` to be true")
    params = _parameters(body, body.max_completion_tokens or body.max_tokens, top_n)
    params.grammar = response_grammar(body.response_format)
    plan = plan_tools(body.tools, body.tool_choice)
    if plan is not None:
        if params.grammar is not None:
            raise ValidationError("use `tools` or `response_format`, not both")
        params.grammar = plan.grammar
    prompt = await _templated(state, body, plan)
    valid = await state.validator.validate(prompt, params, add_special_tokens=False)
    return valid, plan


@api.post("/chat_tokenize", summary="The chat template's prompt for these messages, tokenized")
async def chat_tokenize(request: Request, body: ChatCompletionRequest) -> Response:
    """TGI's reply: `{"tokenize_response": [{id, text, start, stop}...], "templated_text"}`.
    The template already holds the special tokens, so none are added."""
    state = state_of(request)
    async with state.slot():
        prompt = await _templated(state, body, plan_tools(body.tools, body.tool_choice))
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
            n = _choices_per_prompt(state, body)
            valid, plan = await _validate_chat(state, body)
            return _chat_stream(state, body, valid, plan, n, request_id, stops)

        return await start_stream(state, make)
    return JSONResponse(await run_chat(state, request, body, request_id))


async def run_chat(
    state: RouterState, request: Request, body: ChatCompletionRequest, request_id: str
) -> dict:
    """A non-streamed chat completion (its `n` choices), as its JSON object."""
    stops = _stops(body.stop)
    async with state.slot():
        n = _choices_per_prompt(state, body)
        valid, plan = await _validate_chat(state, body)
        results = await collect_or_cancel(state, request, await state.submit_n(valid, n))
    response = _base("chat.completion", state, request_id)
    response["choices"] = [
        _chat_choice(index, generations, body, plan, stops)
        for index, generations in enumerate(results)
    ]
    generated = sum(g[-1].finished.generated_tokens for g in results if g[-1].finished)
    response["usage"] = _usage([valid], generated)
    return response


def _chat_choice(
    index: int,
    generations: list[GenerationOut],
    body: ChatCompletionRequest,
    plan: ToolPlan | None,
    stops: list[str],
) -> dict:
    finished = generations[-1].finished
    assert finished is not None
    message: dict = {"role": "assistant", "content": trim_at_stop(finished.text, stops)}
    finish_reason = FINISH[finished.finish_reason]
    call = parse_call(finished.text) if plan is not None else None
    if call is not None:  # OpenAI's shape: no content, the call, finish "tool_calls"
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish_reason = "tool_calls"
    return {
        "index": index,
        "message": message,
        "logprobs": _chat_logprobs(generations) if body.logprobs else None,
        "finish_reason": finish_reason,
    }


async def _chat_stream(
    state: RouterState,
    body: ChatCompletionRequest,
    valid: ValidRequest,
    plan: ToolPlan | None,
    n: int,
    request_id: str,
    stops: list[str],
) -> AsyncIterator[bytes]:
    """The chunks of every choice as they come, then the usage (if asked) and [DONE]."""
    base = _base("chat.completion.chunk", state, request_id)
    entries = await state.submit_n(valid, n)
    generated = [0] * len(entries)
    choices = [
        _chat_choice_chunks(state, body, entry, index, plan, stops, generated)
        for index, entry in enumerate(entries)
    ]
    async for chunk in merged(choices):
        yield sse({**base, "choices": [chunk], "usage": None} if "index" in chunk else chunk)
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": _usage([valid], sum(generated))})
    yield sse("[DONE]")


async def _chat_choice_chunks(
    state: RouterState,
    body: ChatCompletionRequest,
    entry: Entry,
    index: int,
    plan: ToolPlan | None,
    stops: list[str],
    generated: list[int],
) -> AsyncIterator[dict]:
    """One choice's chunks (an error ends it with the error's own event)."""
    matcher = StopMatcher(stops)  # OpenAI leaves stop sequences out of the text
    calls = CallStreamer() if plan is not None else None
    try:
        async for generation in state.stream(entry):
            finished = generation.finished
            for i, token in enumerate(generation.tokens):
                piece = "" if token.special else token.text  # EOS and friends never reach text
                reason = FINISH[finished.finish_reason] if finished else None
                if calls is not None:
                    for delta in calls.push(piece, finished is not None):
                        yield {"index": index, "delta": {"role": "assistant", **delta},
                               "logprobs": None, "finish_reason": None}  # fmt: skip
                    if finished is None:
                        continue
                    reason = "tool_calls" if calls.is_call else reason
                    text = ""
                else:
                    text = matcher.push(piece, finished is not None)
                choice = {
                    "index": index,
                    "delta": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                if body.logprobs:
                    top = generation.top_tokens[i] if i < len(generation.top_tokens) else []
                    choice["logprobs"] = {"content": [_chat_logprob(token, top)]}
                yield choice
            if finished is not None:
                generated[index] = finished.generated_tokens
    except HTTPError as exc:
        yield {"error": exc.message, "error_type": exc.error_type}


async def _validate_prompts(
    state: RouterState, body: CompletionRequest
) -> tuple[list[ValidRequest], int]:
    """The prompts, validated, and `n` (completions per prompt)."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ValidationError("`prompt` cannot be empty")
    if len(prompts) > state.settings.max_client_batch_size:
        raise ValidationError(
            f"`prompt` holds {len(prompts)} prompts; "
            f"at most {state.settings.max_client_batch_size} are allowed"
        )
    if body.suffix:
        raise ValidationError(
            "`suffix` is not supported; put the text around the prompt yourself (as TGI)"
        )
    if body.best_of not in (None, 1):
        raise ValidationError("`best_of` is not supported on /v1/completions")
    n = _choices_per_prompt(state, body, len(prompts))
    params = _parameters(body, body.max_tokens or 16, body.logprobs or 0)
    valids = await asyncio.gather(*(state.validator.validate(p, params) for p in prompts))
    return list(valids), n


def _completion_logprobs(generations: list[GenerationOut], position: int = 0) -> dict:
    """OpenAI's legacy logprobs of these generations' tokens; `position`: the text offset of
    the first one (a stream's chunks continue where the last left off)."""
    tokens = [t for g in generations for t in g.tokens]
    top = [
        {t.text: finite_or_none(t.logprob) for t in g.top_tokens[0]} if g.top_tokens else None
        for g in generations
    ]
    offsets = []
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
            valids, n = await _validate_prompts(state, body)
            return _completion_stream(state, body, valids, n, request_id, stops)

        return await start_stream(state, make)
    async with state.slot():
        valids, n = await _validate_prompts(state, body)
        entries = await _submit_each(state, valids, n)
        results = await collect_or_cancel(state, request, entries)
    choices, generated = [], 0
    for index, generations in enumerate(results):
        valid = valids[index // n]  # choices: n per prompt, in prompt order
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


async def _submit_each(state: RouterState, valids: list[ValidRequest], n: int) -> list[Entry]:
    """`n` runs of each prompt, n per prompt in prompt order."""
    groups = await asyncio.gather(*(state.submit_n(v, n) for v in valids))
    return [entry for group in groups for entry in group]


async def _completion_stream(
    state: RouterState,
    body: CompletionRequest,
    valids: list[ValidRequest],
    n: int,
    request_id: str,
    stops: list[str],
) -> AsyncIterator[bytes]:
    base = _base("text_completion", state, request_id)
    entries = await _submit_each(state, valids, n)
    generated = [0] * len(entries)
    choices = [
        _completion_chunks(state, body, valids[i // n], entry, i, stops, generated)
        for i, entry in enumerate(entries)
    ]
    async for chunk in merged(choices):
        yield sse({**base, "choices": [chunk], "usage": None} if "index" in chunk else chunk)
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": _usage(valids, sum(generated))})
    yield sse("[DONE]")


async def _completion_chunks(
    state: RouterState,
    body: CompletionRequest,
    valid: ValidRequest,
    entry: Entry,
    index: int,
    stops: list[str],
    generated: list[int],
) -> AsyncIterator[dict]:
    """One choice's chunks (an error ends it with the error's own event)."""
    matcher = StopMatcher(stops)
    echo, position = body.echo, 0  # the prompt opens the first chunk when echoed
    try:
        async for generation in state.stream(entry):
            finished = generation.finished
            piece = "".join(t.text for t in generation.tokens if not t.special)
            text = matcher.push(piece, finished is not None)
            if echo:
                text, echo = valid.inputs + text, False
            logprobs = None
            if body.logprobs:  # as in the whole reply: offsets within the completion
                logprobs = _completion_logprobs([generation], position)
                position += sum(len(t.text) for t in generation.tokens)
            if finished is not None:
                generated[index] = finished.generated_tokens
            yield {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": FINISH[finished.finish_reason] if finished else None,
            }
    except HTTPError as exc:
        yield {"error": exc.message, "error_type": exc.error_type}


@api.get("/v1/models", summary="The served model")
async def models(request: Request) -> JSONResponse:
    state = state_of(request)
    model = {"id": state.settings.model_id, "object": "model", "created": 0, "owned_by": "pytgi"}
    return JSONResponse({"object": "list", "data": [model]})
