"""The shard's engine: the batch registry (Prefill/Decode/Filter/Clear) and Warmup, over
an admission (request checks and block claims) and a model runner (model, KV pool, graphs).
No gRPC in sight.

Every public method is called from one worker thread at a time (see server.py), so the
engine needs no locks. Batches live in `self.batches` between calls; a request's blocks are
the router's unless it sent none (then the shard numbers them: see Admission).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tokenizers import Tokenizer

from common.config import ShardConfig
from shard import memory
from shard.admission import Admission
from shard.batch import (
    Batch,
    CachedBatchInfo,
    RequestSpec,
    StepResult,
)
from shard.errors import BatchNotFound, InvalidRequest, NotReady, OutOfBlocks
from shard.kv_calibration import CALIBRATION_TEXT
from shard.parallel import Parallel
from shard.runner import ModelRunner
from shard.spec import check_tokenizer, read_spec
from shard.step import run_step

log = logging.getLogger("shard")


@dataclass(frozen=True, slots=True)
class EngineInfo:
    dtype: str
    device_type: str
    block_size: int
    attention_impl: str
    support_chunking: bool = True
    use_prefix_caching: bool = True
    device_memory_used: int = 0  # bytes (CUDA)
    device_memory_total: int = 0  # bytes (CUDA)
    kv_cache_blocks: int = 0
    kv_cache_bytes: int = 0
    device_name: str = "cpu"
    cuda_graph_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class _Ahead:
    """A step that ran before its call (ShardEngine.step_ahead): its result or its error,
    and the requests it stepped (on every rank, whichever rank reports their tokens)."""

    batch_id: int
    stepped: frozenset[int]
    result: StepResult | None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class WarmupResult:
    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int


class ShardEngine:
    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.model_spec = read_spec(config.model_dir)
        self.tokenizer = Tokenizer.from_file(str(check_tokenizer(config.model_dir)))
        self.special_ids = {
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special
        }
        self.runner = ModelRunner(config, self.model_spec, Parallel(config.rank, config.world_size))
        self.block_size = config.block_size
        self.batches: dict[int, Batch] = {}
        self._ahead: _Ahead | None = None  # at most one step computed before its call
        if config.use_prefix_caching and not self.use_prefix_caching:
            log.info(
                "prefix caching off: longrope recomputes a request's K/V past the original length"
            )
        context = self.model_spec.max_position_embeddings
        self.admission = Admission(
            self.tokenizer,
            self.model_spec,
            self.block_size,
            self.runner.device,
            max_input_tokens=config.max_input_tokens or context - 1,
            max_total_tokens=context,
        )

    @property
    def use_prefix_caching(self) -> bool:
        """Off for longrope models: a request passing the original length computes its
        first blocks again (with the long factors), so they cannot be shared."""
        return self.config.use_prefix_caching and not self.runner.model.rotary.long_after

    # ---- Info / Health ----
    def info(self) -> EngineInfo:
        runner, kv = self.runner, self.runner.kv
        used, total, name = runner.device_memory()
        return EngineInfo(
            dtype=runner.dtype_name,
            device_type=runner.device.type,
            block_size=self.block_size,
            attention_impl=runner.backend.name,
            use_prefix_caching=self.use_prefix_caching,
            device_memory_used=used,
            device_memory_total=total,
            kv_cache_blocks=kv.num_blocks if kv else 0,
            kv_cache_bytes=kv.nbytes if kv else 0,
            device_name=name,
            cuda_graph_batch_sizes=runner.graphs.sizes if runner.graphs else (),
        )

    def health(self) -> None:
        self.runner.health()

    # ---- Warmup ----
    def warmup(
        self,
        specs: list[RequestSpec],
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> WarmupResult:
        """Runs a maximum-size prefill, then sizes the KV pool; drops every cached batch.

        Unset limits follow the model, as TGI v3's: max_total_tokens is the model's context
        (max_position_embeddings), capped by what the KV pool holds; max_input_tokens one
        less. The chosen values and why are logged."""
        max_pos = self.model_spec.max_position_embeddings
        total = max_total_tokens or max_pos  # lowered to the KV capacity below when unset
        inputs = max_input_tokens or min(self.max_input_tokens, total - 1)
        if total > max_pos:
            raise InvalidRequest(
                f"max_total_tokens {total} exceeds the model's context of {max_pos} tokens"
            )
        if inputs >= total:
            raise InvalidRequest(
                f"max_input_tokens {inputs} must be below max_total_tokens {total}"
            )
        self.clear(None)
        self.runner.free_kv()
        if self.runner.kv_dtype != self.runner.dtype and self.runner.kv_scales is None:
            # fp8 pools without the checkpoint's scales: measured once, on every rank
            self.runner.calibrate_kv(self.tokenizer.encode(CALIBRATION_TEXT).ids[:inputs])
        self.admission.max_input_tokens, self.admission.max_total_tokens = inputs, total
        try:
            activations = self.runner.peak_activation_bytes(
                lambda: self._warmup_prefill(specs, max_prefill_tokens),
                f"a prefill of {max_prefill_tokens} tokens",
            )
        finally:
            self.clear(None)
            self.runner.free_kv()
        num_blocks = self.runner.kv_blocks_that_fit(activations)
        capacity = (num_blocks - 1) * self.block_size
        if max_total_tokens is None:
            total, inputs = self._limits_from_model(capacity, max_input_tokens)
            self.admission.max_input_tokens, self.admission.max_total_tokens = inputs, total
        if capacity < total:
            raise OutOfBlocks(
                f"the KV cache holds {capacity} tokens but one request may need {total}; "
                "raise --kv-cache-memory (or --cuda-memory-fraction on GPU) or lower "
                "--max-total-tokens"
            )
        self._allocate_kv(num_blocks)
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, self.block_size, capacity
        )
        self.runner.capture_graphs(total)
        return WarmupResult(capacity, inputs, total)

    def _limits_from_model(self, capacity: int, max_input_tokens: int | None) -> tuple[int, int]:
        """(max_total_tokens, max_input_tokens) when the caller set no total: the model's
        context, or what the KV pool holds when that is less."""
        max_pos = self.model_spec.max_position_embeddings
        total = min(max_pos, capacity)
        why = (
            "the model's context (max_position_embeddings)"
            if total == max_pos
            else f"what the KV cache holds (the model's context is {max_pos})"
        )
        inputs = max_input_tokens or min(self.max_input_tokens, total - 1)
        if inputs >= total:
            raise OutOfBlocks(
                f"the KV cache holds {capacity} tokens, not more than --max-input-tokens "
                f"{inputs}; raise --kv-cache-memory or lower --max-input-tokens"
            )
        log.info("max_total_tokens %d: %s; max_input_tokens %d", total, why, inputs)
        return total, inputs

    def _warmup_prefill(self, specs: list[RequestSpec], max_prefill_tokens: int) -> None:
        if not specs and max_prefill_tokens > 0:
            # max_prefill_tokens prompt tokens in requests no longer than max_input_tokens
            sizes = [self.max_input_tokens] * (max_prefill_tokens // self.max_input_tokens)
            if max_prefill_tokens % self.max_input_tokens:
                sizes.append(max_prefill_tokens % self.max_input_tokens)
            specs = [
                RequestSpec(
                    id=i,
                    inputs="",
                    input_ids=[0] * size,
                    sampling=memory.GREEDY,
                    max_new_tokens=1,
                )
                for i, size in enumerate(sizes)
            ]
        if not specs:
            return
        for spec in specs:
            spec.blocks, spec.slots, spec.cache_len, spec.chunk_len = [], [], 0, None
        needed = sum(self._prompt_blocks(s) for s in specs) + 1
        self._allocate_kv(needed)
        self.prefill(batch_id=0, specs=specs, cached_batch_id=None)

    def _prompt_blocks(self, spec: RequestSpec) -> int:
        prompt_len = len(self.admission.tokenize(spec))
        return -(-(prompt_len + spec.max_new_tokens) // self.block_size)

    def _allocate_kv(self, num_blocks: int) -> None:
        self.runner.allocate_kv(num_blocks)
        self.admission.reset_pool(num_blocks)

    # ---- Prefill / Decode ----
    def prefill(
        self, batch_id: int, specs: list[RequestSpec], cached_batch_id: int | None
    ) -> StepResult:
        """Admits `specs` as a new batch (merged into the cached batch when given), runs one
        forward and returns the generations; the resulting batch stays cached. A request
        that fails its checks is refused alone (in `StepResult.refused`): the others run."""
        start = time.perf_counter_ns()
        if self.runner.kv is None:
            raise NotReady("the KV cache is not allocated: call Warmup first")
        if batch_id in self.batches and batch_id != cached_batch_id:
            raise InvalidRequest(f"batch {batch_id} already exists")
        if not specs:
            raise InvalidRequest("Prefill needs at least one request")
        cached = self._get_batch(cached_batch_id) if cached_batch_id is not None else None
        self.runner.check_fault(tuple(s.inputs for s in specs))
        live = {i for batch in self.batches.values() for i in batch.request_ids}
        requests, refused = self.admission.admit_all(specs, live)
        concat_ns = None
        if cached is not None:
            concat_start = time.perf_counter_ns()
            cached.requests.extend(requests)
            batch = cached
            concat_ns = time.perf_counter_ns() - concat_start
        else:
            batch = Batch(batch_id, requests)
        self.batches[batch.id] = batch
        ahead = self._take_ahead([cached.id] if cached is not None else [])
        result = self._step(batch, start, concat_ns, ahead)
        result.refused = refused
        return result

    def decode(self, batch_ids: list[int]) -> StepResult:
        """One step over the given cached batches, merged into the first."""
        start = time.perf_counter_ns()
        if not batch_ids:
            raise InvalidRequest("Decode needs at least one batch")
        batches = [self._get_batch(i) for i in batch_ids]
        ahead = self._take_ahead(batch_ids)
        concat_ns = None
        if len(batches) > 1:
            concat_start = time.perf_counter_ns()
            for other in batches[1:]:
                batches[0].requests.extend(other.requests)
                del self.batches[other.id]
            concat_ns = time.perf_counter_ns() - concat_start
        return self._step(batches[0], start, concat_ns, ahead)

    def step_ahead(self, batch_id: int, max_rows: int | None = None) -> bool:
        """Runs the next step of `batch_id` now, before the router asks for it, when every
        unfinished request in it decodes one token (and there are at most `max_rows` of
        them, if given: common.config's step_ahead_rows): the router's round trip (reply, its
        bookkeeping, the next call) then overlaps the step instead of following it. The next
        call naming the batch takes the result: a Decode returns it (stepping only the other
        batches it names), a Prefill into it returns it with the new requests' tokens, a
        FilterBatch keeps the kept requests' tokens, a ClearCache drops it. Never raises: an
        error is raised by the call that takes the result. True when the step ran."""
        batch = self.batches.get(batch_id)
        if self._ahead is not None or batch is None:
            return False
        active = frozenset(r.id for r in batch.requests if not r.is_finished)
        if not active or any(r.query_len != 1 for r in batch.requests if r.id in active):
            return False  # nothing to do, or a prompt still being computed in chunks
        if max_rows is not None and len(active) > max_rows:
            return False
        try:
            result = run_step(
                self.runner, self, batch, time.perf_counter_ns(), None, clear_when_done=False
            )
        except Exception as exc:  # noqa: BLE001 - the batch's next call raises it
            self._ahead = _Ahead(batch_id, active, None, exc)
            return True
        self._ahead = _Ahead(batch_id, active, result)
        return True

    def _take_ahead(self, batch_ids: list[int]) -> _Ahead | None:
        """The step that ran ahead for one of `batch_ids`, now taken; raises its error."""
        ahead = self._ahead
        if ahead is None or ahead.batch_id not in batch_ids:
            return None
        self._ahead = None
        if ahead.error is not None:
            raise ahead.error
        return ahead

    def _step(
        self, batch: Batch, start: int, concat_ns: int | None, ahead: _Ahead | None
    ) -> StepResult:
        """run_step over `batch`, leaving out the requests a step ahead already stepped and
        returning that step's tokens with the new ones (their times added)."""
        if ahead is None:
            return run_step(self.runner, self, batch, start, concat_ns)
        result = run_step(self.runner, self, batch, start, concat_ns, skip=ahead.stepped)
        assert ahead.result is not None
        result.generations = ahead.result.generations + result.generations
        result.forward_ns += ahead.result.forward_ns
        result.decode_ns += ahead.result.decode_ns
        result.total_ns += ahead.result.total_ns
        return result

    def filter(self, batch_id: int, request_ids: list[int]) -> CachedBatchInfo:
        batch = self._get_batch(batch_id)
        unknown = set(request_ids) - set(batch.request_ids)
        if unknown:
            raise InvalidRequest(f"requests {sorted(unknown)} are not in batch {batch_id}")
        ahead = self._ahead
        if ahead is not None and ahead.batch_id == batch_id:
            kept = set(request_ids)
            if ahead.result is not None:  # the left requests' tokens are not reported
                gens = [g for g in ahead.result.generations if g.request_id in kept]
                ahead.result.generations = gens
            self._ahead = _Ahead(batch_id, ahead.stepped & kept, ahead.result, ahead.error)
        self.admission.release(batch.keep(set(request_ids)))
        return self.cached_info(batch)

    def clear(self, batch_id: int | None) -> None:
        if self._ahead is not None and batch_id in (None, self._ahead.batch_id):
            self._ahead = None
        ids = list(self.batches) if batch_id is None else [batch_id]
        for i in ids:
            batch = self.batches.pop(i, None)
            if batch is not None:
                self.admission.release(batch.requests)

    # ---- internals ----
    def _get_batch(self, batch_id: int) -> Batch:
        if batch_id not in self.batches:
            raise BatchNotFound(f"batch {batch_id} not found")
        return self.batches[batch_id]

    @property
    def max_input_tokens(self) -> int:
        return self.admission.max_input_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.admission.max_total_tokens

    def cached_info(self, batch: Batch) -> CachedBatchInfo:
        return CachedBatchInfo(
            batch.id, batch.request_ids, batch.max_tokens(self.block_size), batch.current_tokens
        )
