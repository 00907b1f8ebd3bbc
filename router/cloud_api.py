"""The routes managed platforms call, as TGI serves them: SageMaker's `POST /invocations`
(a TGI, chat or completions body, told apart by its fields) and Vertex AI's `POST /vertex`
(`{"instances": [...]}` -> `{"predictions": [text, ...]}`)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from router import openai_api, tgi_api
from router.core import RouterState, state_of
from router.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from router.validation import ValidationError

api = APIRouter()
JsonObject = Annotated[dict[str, Any], Body()]  # any JSON object; its kind is decided here

# The body's distinguishing field -> (its schema, its route), in TGI's order of trial.
_INVOCATION_KINDS: list[tuple[str, type[pydantic.BaseModel], Any]] = [
    ("inputs", GenerateRequest, tgi_api.compat_generate),
    ("messages", ChatCompletionRequest, openai_api.chat_completions),
    ("prompt", CompletionRequest, openai_api.completions),
]


def _parse(schema: type[pydantic.BaseModel], body: Any) -> Any:
    """`body` as `schema`, or the 422 a route's own body check gives."""
    try:
        return schema.model_validate(body)
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a JSON object")
    return value


@api.post("/invocations", summary="SageMaker: a TGI, chat or completions body")
async def invocations(request: Request, body: JsonObject):
    """Answers as the route of the body's kind would, streamed when it asks to be."""
    for field, schema, route in _INVOCATION_KINDS:
        if field in body:
            return await route(request, _parse(schema, body))
    raise ValidationError("the body needs `inputs` (TGI), `messages` (chat) or `prompt`")


@api.post("/vertex", summary="Vertex AI: instances of TGI or chat bodies -> predictions")
async def vertex(request: Request, body: JsonObject) -> JSONResponse:
    """Each instance (`{"inputs", "parameters"}` or a chat body) runs as its own request,
    all at once; the reply lists their texts in order. Unlike TGI, which keeps only an
    instance's `max_new_tokens` and `seed` and always samples, every parameter is honoured."""
    state = state_of(request)
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValidationError("`instances` must be a non-empty list")
    if len(instances) > state.settings.max_client_batch_size:
        raise ValidationError(
            f"`instances` holds {len(instances)}; at most "
            f"{state.settings.max_client_batch_size} are allowed (--max-client-batch-size)"
        )
    texts = await asyncio.gather(*(_predict(state, request, i) for i in instances))
    return JSONResponse({"predictions": list(texts)})


async def _predict(state: RouterState, request: Request, instance: Any) -> str:
    instance = _object(instance, "each instance")
    if "messages" in instance:
        chat = _parse(ChatCompletionRequest, {**instance, "stream": False})
        reply = await openai_api.run_chat(state, request, chat, f"chatcmpl-{uuid.uuid4().hex}")
        return reply["choices"][0]["message"]["content"]
    generate = _parse(GenerateRequest, {**instance, "stream": False})
    async with state.slot():
        reply, _ = await tgi_api.run_generate(state, request, generate)
    return reply["generated_text"]
