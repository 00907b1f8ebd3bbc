"""HTTP request bodies (pydantic): TGI's and OpenAI's. Unknown fields are ignored, as both do."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateParameters(_Body):
    best_of: int | None = Field(
        None, description="Generate best_of sequences, return the most likely"
    )
    decoder_input_details: bool = Field(False, description="Return prompt tokens with logprobs")
    details: bool = Field(False, description="Return generation details")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding")
    frequency_penalty: float | None = Field(
        None, description="OpenAI-style frequency penalty, -2..2"
    )
    max_new_tokens: int | None = Field(None, description="Most tokens to generate")
    repetition_penalty: float | None = Field(None, description="HF repetition penalty, > 0")
    return_full_text: bool | None = Field(None, description="Prepend the prompt to the output")
    seed: int | None = Field(None, description="Random seed for sampling")
    stop: list[str] = Field(default_factory=list, description="Stop sequences")
    temperature: float | None = Field(None, description="Softmax temperature, > 0")
    top_k: int | None = Field(None, description="Top-k filtering, > 0")
    top_n_tokens: int | None = Field(None, description="Alternatives returned per token")
    top_p: float | None = Field(None, description="Nucleus sampling, 0 < top_p < 1")
    truncate: int | None = Field(None, description="Keep only the last truncate prompt tokens")
    typical_p: float | None = Field(None, description="Typical sampling, 0 < typical_p < 1")
    watermark: bool = Field(False, description="Not supported: rejected when true")
    grammar: Any | None = Field(
        None,
        description='{"type": "json" | "json_schema" | "regex", "value": ...}: the output'
        " follows this JSON schema or regex",
    )
    adapter_id: str | None = Field(None, description="Not supported: rejected when set")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (extension, as vLLM)")
    presence_penalty: float | None = Field(
        None, description="OpenAI's presence penalty, -2..2 (extension: the chat APIs' field)"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="OpenAI's token id -> bias in -100..100 (extension)"
    )


class GenerateRequest(_Body):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(_Body):
    inputs: str
    add_special_tokens: bool = True


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: the call it answers


class _OpenAICommon(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias, -100..100
    n: int | None = None
    ignore_eos: bool = False
    top_k: int | None = None
    repetition_penalty: float | None = None


class ChatCompletionRequest(_OpenAICommon):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None  # "auto" (default with tools), "none", "required", a name
    tool_prompt: str | None = None  # TGI's: put before the tools when the template takes none
    response_format: Any | None = None


class CompletionRequest(_OpenAICommon):
    prompt: str | list[str]
    suffix: str | None = None  # refused (422), as TGI
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
