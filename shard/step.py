"""One forward over a batch, then token choice, detokenization and stopping."""

from __future__ import annotations

import time
from typing import Protocol

import torch
from tokenizers import Tokenizer

from shard.batch import (
    Batch,
    CachedBatchInfo,
    FinishedText,
    Generation,
    RequestState,
    StepResult,
    TokenInfo,
)
from shard.inputs import prepare_forward
from shard.runner import ModelRunner
from shard.sampling import Choice, choose_tokens
from shard.stopping import FinishReason


class BatchHost(Protocol):
    """What a step needs of the batch registry that holds the batch (ShardEngine is one):
    the tokenizer, and the registry's clear and info."""

    tokenizer: Tokenizer
    special_ids: set[int]

    def clear(self, batch_id: int | None) -> None: ...

    def cached_info(self, batch: Batch) -> CachedBatchInfo: ...


def run_step(
    runner: ModelRunner,
    host: BatchHost,
    batch: Batch,
    start_ns: int,
    concat_ns: int | None,
    skip: frozenset[int] = frozenset(),
    clear_when_done: bool = True,
) -> StepResult:
    """Computes the next tokens of every unfinished request not in `skip` (requests whose
    step ran ahead: see ShardEngine.step_ahead); emits a token for each request whose
    computed tokens caught up with its tokens. Drops the batch when all finished, unless
    `clear_when_done` is False (a step ahead: the batch's next call drops it)."""
    active = [r for r in batch.requests if not r.is_finished and r.id not in skip]
    runner.check_fault()
    forward_start = time.perf_counter_ns()
    emitting: list[RequestState] = []
    with torch.inference_mode():
        if active:
            emitting, logits = _forward(runner, active)
        forward_ns = time.perf_counter_ns() - forward_start
        decode_start = time.perf_counter_ns()
        choices = []
        if emitting:
            choices = choose_tokens(
                logits,
                [r.chooser for r in emitting],
                [r.all_ids for r in emitting],
                [r.top_n_tokens for r in emitting],
            )
    generations = []
    parallel = runner.parallel
    for request, choice in zip(emitting, choices, strict=True):
        generation = _advance(host, request, choice)
        if request.id % parallel.world_size == parallel.rank:
            generations.append(generation)
    decode_ns = time.perf_counter_ns() - decode_start
    cached: CachedBatchInfo | None = None
    if clear_when_done and all(r.is_finished for r in batch.requests):
        host.clear(batch.id)
    else:
        cached = host.cached_info(batch)
    total_ns = time.perf_counter_ns() - start_ns
    return StepResult(generations, cached, forward_ns, decode_ns, total_ns, concat_ns)


def _forward(
    runner: ModelRunner, active: list[RequestState]
) -> tuple[list[RequestState], torch.Tensor]:
    """Runs the model; returns the requests that emit and their logits [N, V] (float32).
    Prompt log-probabilities of requests that asked for them are recorded on the way."""
    long_after = runner.model.rotary.long_after
    if long_after:
        _switch_to_long_rope(active, long_after)
    inputs = prepare_forward(active, runner.block_size, runner.device, long_after)
    hidden = runner.forward(inputs)
    emitting, rows = [], []
    attention = inputs.attention
    for request, start, count in zip(
        active, attention.query_starts, attention.query_lens, strict=True
    ):
        request.num_computed += count
        if request.prefill_logprobs and request.num_generated == 0:
            _record_prompt_logprobs(runner, request, hidden[start : start + count])
        if request.num_computed == len(request.all_ids):
            emitting.append(request)
            rows.append(start + count - 1)
    logits = runner.logits(hidden[rows]) if rows else hidden.new_empty(0)
    return emitting, logits


def _switch_to_long_rope(requests: list[RequestState], long_after: int) -> None:
    """Longrope: once a request passes `long_after` tokens all of them use the long factors,
    so K/V computed with the short ones are computed again, once (num_computed back to 0),
    as transformers drops its cache at that point. (Prefix caching is off for such models:
    this rewrites the request's first blocks.)"""
    for request in requests:
        if not request.long_rope and len(request.all_ids) > long_after:
            request.long_rope = True
            request.num_computed = 0


def _record_prompt_logprobs(
    runner: ModelRunner, request: RequestState, hidden: torch.Tensor
) -> None:
    """hidden [n, H] of the chunk just computed; position p predicts prompt token p + 1."""
    end = request.num_computed
    first = end - hidden.shape[0]
    targets = request.all_ids[first + 1 : min(end + 1, request.prompt_len)]
    if not targets:
        return
    logprobs = runner.logits(hidden[: len(targets)]).log_softmax(-1)
    picked = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1))
    request.prompt_logprobs.extend(picked.squeeze(1).tolist())


def _token_info(
    host: BatchHost, ids: list[int], logprobs: list[float], texts: list[str] | None = None
) -> TokenInfo:
    if texts is None:
        texts = [host.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return TokenInfo(ids, logprobs, texts, [i in host.special_ids for i in ids])


def _advance(host: BatchHost, request: RequestState, choice: Choice) -> Generation:
    """Appends the chosen token, detokenizes it, checks stopping; returns its Generation."""
    prefill = None
    if request.prefill_logprobs and request.num_generated == 0:
        prompt = request.all_ids[: request.prompt_len]
        prefill = _token_info(host, prompt, request.prompt_logprobs[: len(prompt)])
    request.all_ids.append(choice.token_id)
    text = request.detokenizer.step(host.tokenizer, request.all_ids)
    reason = request.stopping.step(choice.token_id, text)
    if reason is None and request.chooser.grammar_complete:
        reason = FinishReason.EOS_TOKEN  # the grammar allows nothing more: as at EOS
    generation = Generation(
        request_id=request.id,
        tokens=_token_info(host, [choice.token_id], [choice.logprob], [text]),
        prefill_tokens=prefill,
    )
    if request.top_n_tokens:
        generation.top_tokens = [_token_info(host, choice.top_ids, choice.top_logprobs)]
    if reason is not None:
        request.finish_reason = reason
        params = request.chooser.params
        generation.finished = FinishedText(
            text=host.tokenizer.decode(
                request.all_ids[request.prompt_len :], skip_special_tokens=True
            ),
            generated_tokens=request.num_generated,
            finish_reason=reason,
            seed=params.seed if params.is_sampling else None,
        )
    return generation
