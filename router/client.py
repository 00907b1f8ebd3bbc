"""The router's gRPC edge: the only router module touching generated protobuf types.

Every call goes to all shards at once; replies merge as the protocol says: generations
concatenated (each rank answers for `id % world_size == rank`), the batch taken from any
rank, the slowest rank's timings, the smallest Warmup capacity.
"""

from __future__ import annotations

import asyncio

import grpc

from common.grammar import JSON, LARK, REGEX
from common.pb import pb, pb_grpc
from common.rpc import MESSAGE_OPTIONS, secret_metadata
from common.tracing import context_metadata
from router.types import (
    CachedBatch,
    FinishedOut,
    GenerationOut,
    Params,
    ShardInfo,
    ShardRequest,
    StepOut,
    TokenOut,
    WarmupOut,
)

LIVENESS_ID = 2**64 - 1  # request and batch id of liveness prefills; never a real request's

FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


def _params_pb(
    params: Params,
) -> tuple[pb.NextTokenChooserParameters, pb.StoppingCriteriaParameters]:
    return (
        pb.NextTokenChooserParameters(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            typical_p=params.typical_p,
            do_sample=params.do_sample,
            seed=params.seed,
            repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logit_bias=dict(params.logit_bias),
            grammar=params.grammar.text if params.grammar else "",
            grammar_type=(
                _GRAMMAR_TYPES[params.grammar.kind] if params.grammar else pb.GRAMMAR_TYPE_NONE
            ),
        ),
        pb.StoppingCriteriaParameters(
            max_new_tokens=params.max_new_tokens,
            stop_sequences=list(params.stop),
            ignore_eos_token=params.ignore_eos,
        ),
    )


_GRAMMAR_TYPES = {
    JSON: pb.GRAMMAR_TYPE_JSON,
    REGEX: pb.GRAMMAR_TYPE_REGEX,
    LARK: pb.GRAMMAR_TYPE_LARK,
}


def request_pb(request: ShardRequest) -> pb.Request:
    chooser, stopping = _params_pb(request.params)
    return pb.Request(
        id=request.id,
        input_chunks=pb.Input(chunks=[pb.InputChunk(text=request.inputs)]),  # the text, once
        truncate=request.params.truncate,
        parameters=chooser,
        stopping_parameters=stopping,
        prefill_logprobs=request.params.prefill_logprobs,
        top_n_tokens=request.params.top_n_tokens,
        blocks=request.blocks,
        slots=request.slots,
        cache_len=request.cache_len,
        add_special_tokens=request.params.add_special_tokens,
        chunk_len=request.chunk_len,
        input_ids=request.input_ids,
    )


def batch_pb(batch_id: int, requests: list[ShardRequest]) -> pb.Batch:
    return pb.Batch(
        id=batch_id,
        requests=[request_pb(r) for r in requests],
        size=len(requests),
        max_tokens=sum(len(r.blocks) * r.block_size for r in requests),
        max_blocks=sum(len(r.blocks) for r in requests),
    )


def cached_pb(batch: CachedBatch) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=batch.id,
        request_ids=list(batch.request_ids),
        size=batch.size,
        max_tokens=batch.max_tokens,
        current_tokens=batch.current_tokens,
    )


def cached_from_pb(batch: pb.CachedBatch) -> CachedBatch:
    return CachedBatch(batch.id, tuple(batch.request_ids), batch.max_tokens, batch.current_tokens)


def _tokens(tokens: pb.Tokens) -> list[TokenOut]:
    return [
        TokenOut(i, lp, text, special)
        for i, lp, text, special in zip(
            tokens.ids, tokens.logprobs, tokens.texts, tokens.is_special, strict=True
        )
    ]


def generation_from_pb(g: pb.Generation) -> GenerationOut:
    out = GenerationOut(
        request_id=g.request_id,
        tokens=_tokens(g.tokens),
        prefill=_tokens(g.prefill_tokens) if g.HasField("prefill_tokens") else None,
        top_tokens=[_tokens(t) for t in g.top_tokens],
    )
    if g.HasField("generated_text"):
        gt = g.generated_text
        out.finished = FinishedOut(
            text=gt.text,
            generated_tokens=gt.generated_tokens,
            finish_reason=FINISH_REASONS[gt.finish_reason],
            seed=gt.seed if gt.HasField("seed") else None,
        )
    return out


def _merge_steps(replies) -> StepOut:
    generations = [generation_from_pb(g) for reply in replies for g in reply.generations]
    first = replies[0]
    refused = {
        r.request_id: r.message
        for reply in replies
        for r in getattr(reply, "refused", ())  # PrefillResponse only
    }
    return StepOut(
        generations=generations,
        batch=cached_from_pb(first.batch) if first.HasField("batch") else None,
        forward_ns=max(r.forward_ns for r in replies),
        decode_ns=max(r.decode_ns for r in replies),
        total_ns=max(r.total_ns for r in replies),
        concat_ns=max((r.concat_ns for r in replies if r.HasField("concat_ns")), default=None),
        refused=refused,
    )


def _channel(url: str, tls_ca: bytes | None = None) -> grpc.aio.Channel:
    """A channel to one shard: Unix sockets in plain, TCP addresses over TLS checked against
    `tls_ca` when given."""
    options = list(MESSAGE_OPTIONS)
    if tls_ca is None or url.startswith("unix:"):
        return grpc.aio.insecure_channel(url, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
    return grpc.aio.secure_channel(url, credentials, options=options)


class ShardedClient:
    """One channel per shard; every call fans out to all of them, with the shards' secret."""

    def __init__(
        self, urls: list[str], secret: str | None = None, tls_ca: bytes | None = None
    ) -> None:
        self.urls = urls
        self._metadata = secret_metadata(secret)
        self._channels = [_channel(url, tls_ca) for url in urls]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]

    @classmethod
    async def connect(
        cls,
        master_url: str,
        secret: str | None = None,
        tls_ca: bytes | None = None,
        timeout: float = 30.0,
    ) -> ShardedClient:
        """Asks the master shard for every shard's URL (ServiceDiscovery)."""
        async with _channel(master_url, tls_ca) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            reply = await stub.ServiceDiscovery(
                pb.ServiceDiscoveryRequest(), timeout=timeout, metadata=secret_metadata(secret)
            )
        return cls(list(reply.urls), secret, tls_ca)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, method: str, message, timeout: float | None = None, **options) -> list:
        """Every shard's reply, in rank order. Returns (or raises the first rank's error)
        only once every shard has answered: a call that failed on one rank may still run on
        another, and the next call sent before it ends could reach that rank first (a small
        ClearCache overtakes a large Prefill), so ranks would see different call orders."""
        metadata = (self._metadata or ()) + context_metadata() or None  # secret, traceparent
        if len(self._stubs) == 1:  # awaited in place: gather's task took 0.01-0.13 ms of CPU
            stub = self._stubs[0]
            return [
                await getattr(stub, method)(message, timeout=timeout, metadata=metadata, **options)
            ]
        replies = await asyncio.gather(
            *(
                getattr(s, method)(message, timeout=timeout, metadata=metadata, **options)
                for s in self._stubs
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def info(self) -> ShardInfo:
        replies = await self._all("Info", pb.InfoRequest(), timeout=30)
        reply = replies[0]
        return ShardInfo(
            dtype=reply.dtype,
            device_type=reply.device_type,
            block_size=reply.block_size,
            support_chunking=reply.support_chunking,
            use_prefix_caching=reply.use_prefix_caching,
            attention_impl=reply.attention_impl,
            requires_padding=reply.requires_padding,
            window_size=reply.window_size if reply.HasField("window_size") else None,
            speculate=reply.speculate,
            device_name=reply.device_name,
            device_memory_used=sum(r.device_memory_used for r in replies),
            device_memory_total=sum(r.device_memory_total for r in replies),
            kv_cache_blocks=reply.kv_cache_blocks,
            kv_cache_bytes=sum(r.kv_cache_bytes for r in replies),
            cuda_graph_batch_sizes=tuple(reply.cuda_graph_batch_sizes),
        )

    async def health(self, timeout: float = 10.0) -> None:
        await self._all("Health", pb.HealthRequest(), timeout=timeout)

    async def wait_until_healthy(self, timeout: float) -> None:
        """Waits until every shard answers Health (wait_for_ready), up to `timeout` seconds."""
        await self._all("Health", pb.HealthRequest(), timeout=timeout, wait_for_ready=True)

    async def clear_cache(self, batch_id: int | None) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest(id=batch_id))

    async def warmup(
        self, max_input_tokens: int | None, max_prefill_tokens: int, max_total_tokens: int | None
    ) -> WarmupOut:
        message = pb.WarmupRequest(
            batch=pb.Batch(id=0),
            max_input_tokens=max_input_tokens,
            max_prefill_tokens=max_prefill_tokens,
            max_total_tokens=max_total_tokens,
        )
        replies = await self._all("Warmup", message)
        return WarmupOut(
            max_supported_total_tokens=min(r.max_supported_total_tokens for r in replies),
            max_input_tokens=min(r.max_input_tokens for r in replies),
            max_total_tokens=min(r.max_total_tokens for r in replies),
        )

    async def prefill(
        self, batch_id: int, requests: list[ShardRequest], cached: CachedBatch | None
    ) -> StepOut:
        message = pb.PrefillRequest(batch=batch_pb(batch_id, requests))
        if cached is not None:
            message.cached_batch.CopyFrom(cached_pb(cached))
        return _merge_steps(await self._all("Prefill", message))

    async def decode(self, batches: list[CachedBatch]) -> StepOut:
        message = pb.DecodeRequest(batches=[cached_pb(b) for b in batches])
        return _merge_steps(await self._all("Decode", message))

    async def liveness_prefill(self) -> None:
        """A one-token prefill on block 0 (reserved for this), to confirm the shards compute."""
        params = Params(max_new_tokens=1, ignore_eos=True)
        request = ShardRequest(LIVENESS_ID, "ok", params, [0], 1)
        message = pb.PrefillRequest(batch=batch_pb(LIVENESS_ID, [request]))
        message.batch.requests[0].ClearField("slots")
        await self._all("Prefill", message, timeout=60)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> CachedBatch:
        message = pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        replies = await self._all("FilterBatch", message)
        return cached_from_pb(replies[0].batch)
