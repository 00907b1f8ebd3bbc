"""The shard's only contact with generated protobuf types: wire messages <-> plain records."""

from __future__ import annotations

from common.grammar import JSON, LARK, REGEX, GrammarSpec
from common.pb import pb
from shard.batch import CachedBatchInfo, Generation, RequestSpec, StepResult, TokenInfo
from shard.engine import EngineInfo, WarmupResult
from shard.sampling import SamplingParams


def _inputs_text(request: pb.Request) -> str:
    """The prompt: `input_chunks` when sent (pytgi's router sends only those), else `inputs`."""
    chunks = request.input_chunks.chunks
    if not chunks:
        return request.inputs
    return "".join(chunk.text for chunk in chunks)


def _unsupported(request: pb.Request) -> str | None:
    """What the request asks for that this shard cannot do, if anything."""
    params = request.parameters
    if any(chunk.WhichOneof("chunk") != "text" for chunk in request.input_chunks.chunks):
        return f"request {request.id}: image inputs are not supported"
    if params.watermark:
        return f"request {request.id}: watermark is not supported"
    if params.grammar_type not in _GRAMMAR_KINDS:
        return f"request {request.id}: unknown grammar type {params.grammar_type}"
    if request.HasField("adapter_id") and request.adapter_id:
        return f"request {request.id}: LoRA adapters (adapter_id) are not supported"
    return None


_GRAMMAR_KINDS = {
    pb.GRAMMAR_TYPE_NONE: None,
    pb.GRAMMAR_TYPE_JSON: JSON,
    pb.GRAMMAR_TYPE_REGEX: REGEX,
    pb.GRAMMAR_TYPE_LARK: LARK,
}


def _grammar(params: pb.NextTokenChooserParameters) -> GrammarSpec | None:
    kind = _GRAMMAR_KINDS.get(params.grammar_type)
    return GrammarSpec(kind, params.grammar) if kind is not None else None


def request_from_pb(request: pb.Request) -> RequestSpec:
    """Never raises on a request's content: what cannot be served is named in
    `RequestSpec.unsupported`, and the engine refuses that request alone."""
    p = request.parameters
    stop = request.stopping_parameters
    return RequestSpec(
        id=request.id,
        inputs=_inputs_text(request),
        sampling=SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logit_bias=tuple(sorted(p.logit_bias.items())),
        ),
        max_new_tokens=stop.max_new_tokens,
        stop_sequences=list(stop.stop_sequences),
        ignore_eos=stop.ignore_eos_token,
        truncate=request.truncate,
        prefill_logprobs=request.prefill_logprobs,
        top_n_tokens=request.top_n_tokens,
        blocks=list(request.blocks),
        slots=list(request.slots),
        cache_len=request.cache_len,
        add_special_tokens=request.add_special_tokens,
        chunk_len=request.chunk_len if request.HasField("chunk_len") else None,
        grammar=_grammar(p),
        unsupported=_unsupported(request),
        input_ids=list(request.input_ids) or None,
    )


def requests_from_pb(batch: pb.Batch) -> list[RequestSpec]:
    return [request_from_pb(r) for r in batch.requests]


def cached_batch_to_pb(info: CachedBatchInfo) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=info.id,
        request_ids=info.request_ids,
        size=len(info.request_ids),
        max_tokens=info.max_tokens,
        current_tokens=info.current_tokens,
    )


def _tokens_to_pb(tokens: TokenInfo) -> pb.Tokens:
    return pb.Tokens(
        ids=tokens.ids, logprobs=tokens.logprobs, texts=tokens.texts, is_special=tokens.is_special
    )


def generation_to_pb(generation: Generation) -> pb.Generation:
    message = pb.Generation(
        request_id=generation.request_id,
        tokens=_tokens_to_pb(generation.tokens),
        top_tokens=[_tokens_to_pb(t) for t in generation.top_tokens],
    )
    if generation.prefill_tokens is not None:
        message.prefill_tokens.CopyFrom(_tokens_to_pb(generation.prefill_tokens))
    finished = generation.finished
    if finished is not None:
        message.generated_text.CopyFrom(
            pb.GeneratedText(
                text=finished.text,
                generated_tokens=finished.generated_tokens,
                finish_reason=pb.FinishReason.Name(int(finished.finish_reason)),
                seed=finished.seed,
            )
        )
    return message


def step_to_pb(result: StepResult, response_type):
    """StepResult -> PrefillResponse or DecodeResponse (they share every field)."""
    response = response_type(
        generations=[generation_to_pb(g) for g in result.generations],
        forward_ns=result.forward_ns,
        decode_ns=result.decode_ns,
        total_ns=result.total_ns,
        concat_ns=result.concat_ns,
    )
    if result.batch is not None:
        response.batch.CopyFrom(cached_batch_to_pb(result.batch))
    if result.refused:  # only PrefillResponse has the field, and only Prefill refuses
        response.refused.extend(
            pb.RefusedRequest(request_id=r.request_id, message=r.message) for r in result.refused
        )
    return response


def info_to_pb(info: EngineInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        requires_padding=False,
        dtype=info.dtype,
        device_type=info.device_type,
        speculate=0,
        support_chunking=info.support_chunking,
        use_prefix_caching=info.use_prefix_caching,
        attention_impl=info.attention_impl,
        block_size=info.block_size,
        device_memory_used=info.device_memory_used,
        device_memory_total=info.device_memory_total,
        kv_cache_blocks=info.kv_cache_blocks,
        kv_cache_bytes=info.kv_cache_bytes,
        device_name=info.device_name,
        cuda_graph_batch_sizes=list(info.cuda_graph_batch_sizes),
    )


def warmup_to_pb(result: WarmupResult) -> pb.WarmupResponse:
    return pb.WarmupResponse(
        max_supported_total_tokens=result.max_supported_total_tokens,
        max_input_tokens=result.max_input_tokens,
        max_total_tokens=result.max_total_tokens,
    )
