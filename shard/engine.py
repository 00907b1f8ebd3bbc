"""The shard's engine: the batch protocol over the model, with no gRPC in sight.

Every public method is called from one worker thread at a time (see server.py), so the
engine needs no locks. Batches live in `self.batches` between calls; a request's blocks are
the router's unless it sent none (then the shard numbers them and frees them itself).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from common.config import ShardConfig
from shard import cpu_kernels, memory
from shard.admission import Admission
from shard.attention import get_backend, resolve_backend_name
from shard.batch import (
    Batch,
    CachedBatchInfo,
    RequestSpec,
    StepResult,
)
from shard.cuda_graphs import DecodeGraphs
from shard.errors import BatchNotFound, InvalidRequest, NotReady, OutOfBlocks
from shard.kv_cache import KVCache
from shard.loader import WeightStore
from shard.models.llama import LlamaModel
from shard.models.ops import TorchOps
from shard.parallel import Parallel
from shard.spec import check_tokenizer, read_spec
from shard.step import run_step

log = logging.getLogger("shard")
DEFAULT_MAX_TOTAL_TOKENS = 4096  # as TGI: the default context is capped for memory


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
class WarmupResult:
    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int


PLAIN_BACKENDS = ("reference", "sdpa")  # PyTorch ops only


def _backend_name(attention: str, device_type: str, plain: bool) -> str:
    """The attention backend; with --disable-custom-kernels, auto picks a PyTorch one and a
    Triton or flash-attn choice is refused."""
    if not plain:
        return resolve_backend_name(attention, device_type)
    if attention == "auto":
        return "sdpa" if device_type == "cuda" else "reference"
    if attention not in PLAIN_BACKENDS:
        raise InvalidRequest(
            f"--attention {attention} uses custom kernels, which --disable-custom-kernels "
            f"turns off; choose {' or '.join(PLAIN_BACKENDS)}"
        )
    return attention


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise InvalidRequest(f"unsupported dtype {name!r}; supported: {', '.join(dtypes)}")
    return dtypes[name]


class ShardEngine:
    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.parallel = Parallel(config.rank, config.world_size)
        self.model_spec = read_spec(config.model_dir)
        self.tokenizer = Tokenizer.from_file(str(check_tokenizer(config.model_dir)))
        self.special_ids = {
            i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special
        }
        plain = config.disable_custom_kernels
        self.backend = get_backend(_backend_name(config.attention, self.device.type, plain))
        self.model = LlamaModel(
            self.model_spec,
            WeightStore(config.model_dir),
            self.dtype,
            self.device,
            self.parallel,
            pack_linear=config.pack_linear,
            gemv=config.cpu_gemv and not plain,
            ops=TorchOps() if plain else None,
        )
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            if not cpu_kernels.has_bf16_instructions():
                log.warning(
                    "bfloat16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16): "
                    "each matrix product converts to float32 first; --dtype float32 is faster"
                )
        log.info("kernels: %s", self.kernel_report())
        self.block_size = config.block_size
        self.kv: KVCache | None = None
        self.graphs: DecodeGraphs | None = None  # captured at Warmup (CUDA, --cuda-graphs)
        self.batches: dict[int, Batch] = {}
        context = self.model_spec.max_position_embeddings
        self.admission = Admission(
            self.tokenizer,
            self.model_spec,
            self.block_size,
            self.device,
            max_input_tokens=config.max_input_tokens or context - 1,
            max_total_tokens=context,
        )

    def kernel_report(self) -> str:
        """Which code paths this shard runs, for its start-up log."""
        layer = self.model.layers[0].qkv
        if layer.is_packed:
            gemm = "oneDNN packed weights"
        elif self.device.type == "cpu":
            gemm = "PyTorch linear (oneDNN cannot pack this dtype here)"
        else:
            gemm = "PyTorch linear"
        gemv = "C++ single-row kernel" if layer.kernels is not None else "as the batched path"
        ops = type(self.model.ops).__name__
        return (
            f"attention {self.backend.name}; matrix products: {gemm}; batch-1 rows: {gemv}; "
            f"element-wise layer steps: {ops}; {str(self.dtype).removeprefix('torch.')} on "
            f"{self.device.type}"
        )

    # ---- Info / Health ----
    def info(self) -> EngineInfo:
        used = total = 0
        name = "cpu"
        if self.device.type == "cuda":
            used = torch.cuda.memory_reserved(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            name = torch.cuda.get_device_name(self.device)
        kv = self.kv
        return EngineInfo(
            dtype=str(self.dtype).removeprefix("torch."),
            device_type=self.device.type,
            block_size=self.block_size,
            attention_impl=self.backend.name,
            use_prefix_caching=self.config.use_prefix_caching,
            device_memory_used=used,
            device_memory_total=total,
            kv_cache_blocks=kv.num_blocks if kv else 0,
            kv_cache_bytes=kv.nbytes if kv else 0,
            device_name=name,
            cuda_graph_batch_sizes=self.graphs.sizes if self.graphs else (),
        )

    def health(self) -> None:
        """Runs one tiny op on the device; raises if the device is broken."""
        (torch.ones(1, device=self.device) + 1).item()

    # ---- Warmup ----
    def warmup(
        self,
        specs: list[RequestSpec],
        max_input_tokens: int | None,
        max_prefill_tokens: int,
        max_total_tokens: int | None,
    ) -> WarmupResult:
        """Runs a maximum-size prefill, then sizes the KV pool; drops every cached batch."""
        max_pos = self.model_spec.max_position_embeddings
        total = max_total_tokens or min(max_pos, DEFAULT_MAX_TOTAL_TOKENS)
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
        self.kv, self.graphs = None, None
        self.admission.max_input_tokens, self.admission.max_total_tokens = inputs, total
        activations = self._warmup_prefill_measured(specs, max_prefill_tokens)
        num_blocks = memory.num_kv_blocks(
            self.config, self.model_spec, self.parallel, self.dtype, reserve=activations
        )
        capacity = (num_blocks - 1) * self.block_size
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
        self._capture_graphs()
        return WarmupResult(capacity, inputs, total)

    def _capture_graphs(self) -> None:
        sizes = self.config.cuda_graphs
        if self.device.type != "cuda" or not sizes:
            return
        if not self.backend.supports_cuda_graphs:
            log.warning("CUDA graphs need the triton or flash-attn backend; decoding eagerly")
            return
        self.graphs = DecodeGraphs(self, sizes)
        self.graphs.capture()

    def _warmup_prefill_measured(self, specs: list[RequestSpec], max_prefill_tokens: int) -> int:
        """Runs the warmup prefill; returns its peak activation bytes on CUDA (0 on CPU), which
        the KV pool must leave free. A prefill that does not fit is a clear error."""
        if self.device.type != "cuda":
            self._warmup_prefill(specs, max_prefill_tokens)
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        try:
            self._warmup_prefill(specs, max_prefill_tokens)
        except torch.cuda.OutOfMemoryError as exc:
            self.clear(None)
            self.kv = None
            torch.cuda.empty_cache()
            raise OutOfBlocks(
                f"a prefill of {max_prefill_tokens} tokens does not fit in GPU memory after "
                "the weights; lower --max-batch-prefill-tokens or use more shards"
            ) from exc
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self.kv = None
        torch.cuda.empty_cache()  # what the prefill cached goes back to the free memory
        return peak

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
        self.clear(None)

    def _prompt_blocks(self, spec: RequestSpec) -> int:
        prompt_len = len(self.admission.tokenize(spec))
        return -(-(prompt_len + spec.max_new_tokens) // self.block_size)

    def _allocate_kv(self, num_blocks: int) -> None:
        self.kv = None  # free the old pool before allocating the new one
        self.kv = KVCache(
            self.model_spec.num_layers,
            num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            self.model_spec.head_dim,
            self.dtype,
            self.device,
        )
        self.admission.reset_pool(num_blocks)

    # ---- Prefill / Decode ----
    def prefill(
        self, batch_id: int, specs: list[RequestSpec], cached_batch_id: int | None
    ) -> StepResult:
        """Admits `specs` as a new batch (merged into the cached batch when given), runs one
        forward and returns the generations; the resulting batch stays cached. A request
        that fails its checks is refused alone (in `StepResult.refused`): the others run."""
        start = time.perf_counter_ns()
        if self.kv is None:
            raise NotReady("the KV cache is not allocated: call Warmup first")
        if batch_id in self.batches and batch_id != cached_batch_id:
            raise InvalidRequest(f"batch {batch_id} already exists")
        if not specs:
            raise InvalidRequest("Prefill needs at least one request")
        cached = self._get_batch(cached_batch_id) if cached_batch_id is not None else None
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
        result = self._step(batch, start, concat_ns)
        result.refused = refused
        return result

    def decode(self, batch_ids: list[int]) -> StepResult:
        """One step over the given cached batches, merged into the first."""
        start = time.perf_counter_ns()
        if not batch_ids:
            raise InvalidRequest("Decode needs at least one batch")
        batches = [self._get_batch(i) for i in batch_ids]
        concat_ns = None
        if len(batches) > 1:
            concat_start = time.perf_counter_ns()
            for other in batches[1:]:
                batches[0].requests.extend(other.requests)
                del self.batches[other.id]
            concat_ns = time.perf_counter_ns() - concat_start
        return self._step(batches[0], start, concat_ns)

    def filter(self, batch_id: int, request_ids: list[int]) -> CachedBatchInfo:
        batch = self._get_batch(batch_id)
        unknown = set(request_ids) - set(batch.request_ids)
        if unknown:
            raise InvalidRequest(f"requests {sorted(unknown)} are not in batch {batch_id}")
        self.admission.release(batch.keep(set(request_ids)))
        return self.cached_info(batch)

    def clear(self, batch_id: int | None) -> None:
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

    def check_fault(self) -> None:
        """The test-only fault hook (--fault-file): raise inside this forward, once."""
        path = self.config.fault_file
        if path and os.path.exists(path):
            os.unlink(path)
            raise RuntimeError(f"injected fault ({path})")

    def _step(self, batch: Batch, start_ns: int, concat_ns: int | None) -> StepResult:
        return run_step(self, batch, start_ns, concat_ns)
