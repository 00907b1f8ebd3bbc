"""The model runner: the model on its device, its attention backend, the KV pool and the
decode graphs. It knows tokens and positions, never requests or batches: `forward` takes a
laid-out `ForwardInputs` and gives hidden states [T, H], `logits` turns rows into [N, V].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from common.config import ShardConfig
from common.model_spec import PREQUANTIZED, prequantized
from shard import cpu_kernels, hugepages, memory
from shard.attention import AttentionInputs, get_backend, resolve_backend_name
from shard.cuda_graphs import DecodeGraphs
from shard.embedded import gguf_source
from shard.errors import InvalidRequest, ModelLoadError, OutOfBlocks
from shard.gguf import GgufStore
from shard.inputs import ForwardInputs
from shard.kv_cache import KV_CACHE_DTYPES, KVCache, KVScales
from shard.kv_calibration import scales_from
from shard.loader import Store, WeightStore
from shard.models import build_model
from shard.models.cpu_step import ANY, CpuDecodeStep
from shard.models.fp8 import fp8_products
from shard.models.ops import TorchOps
from shard.models.quant import QuantLinear
from shard.parallel import Parallel
from shard.prequantized import PrequantizedStore
from shard.spec import ModelSpec

log = logging.getLogger("shard")
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


def checkpoint_scales(store: Store, num_layers: int) -> list[KVScales] | None:
    """Per-layer fp8 KV scales a checkpoint carries (llm-compressor / compressed-tensors'
    `self_attn.k_scale` and `v_scale`, or one `kv_scale` for both, as TGI reads them); None
    unless every layer has them."""
    scales = []
    for index in range(num_layers):
        prefix = f"model.layers.{index}.self_attn"
        names = (f"{prefix}.k_scale", f"{prefix}.v_scale")
        if all(name in store for name in names):
            k, v = (float(store.get(name).float().reshape(-1)[0]) for name in names)
        elif f"{prefix}.kv_scale" in store:
            k = v = float(store.get(f"{prefix}.kv_scale").float().reshape(-1)[0])
        else:
            return None
        scales.append(KVScales(k, v))
    return scales


def resolve_kv_dtype(name: str | None, dtype: torch.dtype) -> torch.dtype:
    """The KV pools' element type: `dtype`, or --kv-cache-dtype's."""
    if name is None:
        return dtype
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequest(
            f"unsupported --kv-cache-dtype {name!r}; supported: {', '.join(KV_CACHE_DTYPES)}"
        )
    return KV_CACHE_DTYPES[name]


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise InvalidRequest(f"unsupported dtype {name!r}; supported: {', '.join(dtypes)}")
    return dtypes[name]


def weight_store(config: ShardConfig, spec: ModelSpec) -> tuple[Store, str | None]:
    """The model's weights and the method quantizing them on the fly (or None).

    A GPTQ/AWQ checkpoint's packed layers are served as they are (`--quantize` may name
    its method, nothing else). For `--quantize int4` in groups of 32 on the embedded default
    model, the GGUF file it was converted from (its Q4_1 layers and Q8_0 head as stored;
    other group sizes quantize the converted weights again). A `--model-id file.gguf`
    folder's weights are always the file's."""
    settings = prequantized(spec.config)
    products = fp8_products(torch.device(config.device))
    if settings is not None:
        fp8_methods = ("fp8", "fbgemm_fp8")
        fp8_weights = settings["method"] in fp8_methods or settings.get("weights") == "fp8"
        if config.quantize not in (None, settings["method"]) and not (
            config.quantize == "fp8" and fp8_weights
        ):
            raise ModelLoadError(
                f"--quantize {config.quantize}: this checkpoint is {settings['method']}-"
                f"quantized; leave --quantize unset or pass {settings['method']}"
            )
        store = PrequantizedStore(WeightStore(config.model_dir), settings, fp8_products=products)
        return store, None
    if config.quantize == "fp8":
        if not products:
            raise ModelLoadError(
                f"--quantize fp8 needs a GPU with fp8 products (compute capability 8.9+: Ada, "
                f"Hopper); {config.device} has none (PyTorch's fp8 products on CPU run ~40x "
                "slower than float32); --quantize int8 stores the same byte per weight"
            )
        return WeightStore(config.model_dir), "fp8"
    if config.quantize in PREQUANTIZED:
        raise ModelLoadError(
            f"--quantize {config.quantize}: this checkpoint has no {config.quantize} "
            "quantization_config; for quantizing on load pass int8, int4 or fp8"
        )
    blocks = config.quantize == "int4" and config.quantize_group_size == 32
    found = gguf_source(config.model_dir)
    if found is None or not (found[1] or blocks):
        return WeightStore(config.model_dir), config.quantize
    log.info("serving %s's own Q8_0/Q4_0/Q4_1 blocks", found[0].name)
    return GgufStore(found[0]), config.quantize


class ModelRunner:
    def __init__(self, config: ShardConfig, model_spec: ModelSpec, parallel: Parallel) -> None:
        self.config = config
        self.model_spec = model_spec
        self.parallel = parallel
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        plain = config.disable_custom_kernels
        self.backend = get_backend(_backend_name(config.attention, self.device.type, plain))
        store, on_the_fly = weight_store(config, model_spec)
        self.model = build_model(
            model_spec,
            store,
            self.dtype,
            self.device,
            parallel,
            pack_linear=config.pack_linear,
            gemv=config.cpu_gemv and not plain,
            ops=TorchOps() if plain else None,
            quantize=on_the_fly,
            group_size=config.quantize_group_size,
            kernels=not plain,
        )
        self.huge_pages = config.huge_pages and self.device.type == "cpu"
        if self.huge_pages:  # before the C++ step below takes references to the weights
            moved = hugepages.relocate(self.model)
            log.info(
                "weights: %.0f MB in one arena%s", moved / 1e6,
                " of 2 MiB pages" if hugepages.available() else " (no huge pages here)",
            )  # fmt: skip
        # batch-1 decode forwards in one C++ call where the model allows (shard/models/cpu_step.py)
        built = CpuDecodeStep.build(self.model, self.backend, parallel)
        self.cpu_step, self.cpu_step_reason = built
        self.kv: KVCache | None = None  # allocated by Warmup
        # fp8 pools: the checkpoint's scales, else measured by calibrate_kv at Warmup
        self.kv_scales: list[KVScales] | None = None
        if self.kv_dtype != self.dtype:
            self.kv_scales = checkpoint_scales(store, model_spec.num_layers)
            if self.kv_scales is not None:
                log.info("fp8 KV scales: the checkpoint's (k_scale, v_scale per layer)")
        self.graphs: DecodeGraphs | None = None  # captured at Warmup (CUDA, --cuda-graphs)
        self._faults_fired: set[str] = set()  # markers of the test-only fault hook
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            if self._bf16_on_onednn:
                log.warning(
                    "bfloat16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16): "
                    "batched matrix products (prefill, decode of several requests) take "
                    "oneDNN's bfloat16 path, not pytgi's float32 widening (its CPU kernels "
                    "are off, or oneDNN packed the weights); --dtype float32 is faster there"
                )
            elif self._bf16_without_instructions:
                log.warning(
                    "bfloat16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16): "
                    "its products are widened to float32, so decode steps run as fast as "
                    "float32's or faster, but prefills can take longer (1.17-1.31x float32's "
                    "time on a 2-core AVX2 EPYC, benchmarks/bf16_cpu.py); --dtype float32 for long "
                    "prompts"
                )
            if self._quantized_without_panels():
                log.warning(
                    "bfloat16 with int8/int4 weights on a CPU without bf16 dot products: the "
                    "quantized layers keep their row-major codes; with --dtype float32 they "
                    "take our quantized panels (float32 int4 steps of 8 rows: 2.2x the codes' "
                    "speed on a Zen 5 build without bf16 dot products)"
                )
        log.info("kernels: %s", self.kernel_report())

    def _quantized_without_panels(self) -> bool:
        """Whether this model's quantized layers stayed in row-major codes only because the
        kernels' panels take float32 rows, not this model's dtype."""
        layer, kernels = self.model.layers[0].qkv, cpu_kernels.load()
        dtypes = getattr(kernels, "qpanel_dtypes", ())
        return (
            isinstance(layer, QuantLinear)
            and not layer.panels
            and ("float32" in dtypes and str(self.dtype).removeprefix("torch.") not in dtypes)
        )

    def kernel_report(self) -> str:
        """Which code paths this shard runs, for its start-up log."""
        layer = self.model.layers[0].qkv
        prefill = self.backend.prefill_report(self.dtype, self.device)
        attention = self.backend.name + (f" (prefill rows: {prefill})" if prefill else "")
        if hasattr(layer, "kind"):  # quantized (int8, int4, fp8)
            return (
                f"attention {attention}; matrix products: {layer.kind}; element-wise "
                f"layer steps: {type(self.model.ops).__name__}; {self._step_report}; "
                f"{self.precision}"
            )
        if layer.panels is not None:
            gemm = "our panels (C++ panel_linear" + self._amx_report + self._wide_report + ")"
        elif layer.is_packed:
            gemm = "oneDNN packed weights"
        elif self._widens_bf16:
            gemm = "bfloat16 rows widened to float32 (C++ up to 64 rows, float32 tiles past)"
        elif self.device.type == "cpu" and not self.config.pack_linear:
            gemm = "PyTorch linear (--no-pack-linear)"
        elif self.device.type == "cpu":
            gemm = "PyTorch linear (oneDNN cannot pack this dtype here)"
        else:
            gemm = "PyTorch linear"
        gemv = "C++ single-row kernel" if layer.plain is not None else "as the batched path"
        ops = type(self.model.ops).__name__
        return (
            f"attention {attention}; matrix products: {gemm}; batch-1 rows: {gemv}; "
            f"element-wise layer steps: {ops}; {self._step_report}; {self.precision}"
        )

    @property
    def _amx_report(self) -> str:
        """', AMX tiles from N rows' where bfloat16 panels take them (shard/csrc/amx.cpp)."""
        kernels = cpu_kernels.load()
        rows = getattr(kernels, "amx_rows", 0)
        if kernels is None or self.dtype != torch.bfloat16 or not rows or not kernels.amx_ready():
            return ""
        return f", AMX tiles from {rows} row{'s' if rows > 1 else ''}"

    @property
    def _wide_report(self) -> str:
        """', bfloat16 widened ...' where bfloat16 panels multiply in float32 (a build without
        bf16 dot products: shard/csrc/panels.cpp)."""
        wide = getattr(cpu_kernels.load(), "panel_widens_bfloat16", False)
        wide = wide and self.dtype == torch.bfloat16
        return ", bfloat16 widened to float32 multiply-adds" if wide else ""

    @property
    def _widens_bf16(self) -> bool:
        """Whether the layers multiply bfloat16 weights in float32 (shard/models/linear.py)."""
        return bool(getattr(self.model.layers[0].qkv, "widen", False))

    @property
    def _bf16_on_onednn(self) -> bool:
        """Whether a bfloat16 model's products of several rows take oneDNN's bfloat16 path on
        a CPU without bf16 instructions: neither the layers' widening (AVX2) nor our panels
        (AVX-512 BW: widened in registers) took them."""
        layer = self.model.layers[0].qkv
        return self._bf16_without_instructions and not self._widens_bf16 and layer.panels is None

    @property
    def _bf16_without_instructions(self) -> bool:
        """Whether plain (not quantized: see _quantized_without_panels) layers multiply
        bfloat16 on a CPU without bf16 instructions."""
        layer = self.model.layers[0].qkv
        return not hasattr(layer, "kind") and not cpu_kernels.has_bf16_instructions()

    @property
    def _step_report(self) -> str:
        """CPU: whether decode steps run in one C++ call (and up to how many rows), or why not."""
        if self.cpu_step is not None:
            rows = self.cpu_step.max_rows
            limit = "any number of" if rows >= ANY else f"up to {rows}"
            return f"decode steps of {limit} rows: one C++ call (DecodeStack)"
        if self.device.type != "cpu":
            return "decode steps: per layer"
        return f"decode steps: per layer in Python ({self.cpu_step_reason})"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        kv = self.config.kv_cache_dtype or self.dtype_name
        return f"{self.dtype_name} on {self.device.type}, KV cache {kv}"

    def device_memory(self) -> tuple[int, int, str]:
        """(bytes reserved, bytes in total, device name); zeros and "cpu" off CUDA."""
        if self.device.type != "cuda":
            return 0, 0, "cpu"
        props = torch.cuda.get_device_properties(self.device)
        return torch.cuda.memory_reserved(self.device), props.total_memory, props.name

    def health(self) -> None:
        """Runs one tiny op on the device; raises if the device is broken."""
        (torch.ones(1, device=self.device) + 1).item()

    def check_fault(self, prompts: tuple[str, ...] = ()) -> None:
        """The test-only fault hook (--fault-file). An empty file: the next forward raises,
        once (the file is removed; `<path>.rank<r>` fires on rank r only). A file of marker
        lines: a Prefill of a prompt containing a marker raises on every rank alike, once
        per marker and rank (ranks stay in step: none of them reaches a collective)."""
        base = self.config.fault_file
        if not base:
            return
        for path in (base, f"{base}.rank{self.parallel.rank}"):
            try:
                with open(path) as f:
                    markers = f.read().split()
            except OSError:
                continue
            if not markers:
                os.unlink(path)
                raise RuntimeError(f"injected fault ({path})")
            for marker in markers:
                if marker not in self._faults_fired and any(marker in p for p in prompts):
                    self._faults_fired.add(marker)
                    raise RuntimeError(f"injected fault ({marker!r} in a prompt)")

    # ---- the KV pool and graphs ----
    def allocate_kv(self, num_blocks: int) -> None:
        self.graphs = None  # captured over the old pool
        self.kv = None  # free the old pool before allocating the new one
        self.kv = KVCache(
            self.model_spec.num_layers,
            num_blocks,
            self.block_size,
            self.model.num_kv_heads,
            self.model_spec.head_dim,
            self.kv_dtype,
            self.device,
            self.kv_scales,
            huge_pages=self.huge_pages,
        )

    def calibrate_kv(self, ids: list[int]) -> None:
        """fp8 pools: per-layer K and V scales (shard/kv_calibration.py) from one prefill of
        `ids` into a pool of the model's dtype."""
        if not ids:
            return
        bs, count = self.block_size, len(ids)
        blocks = -(-count // bs)
        spec = self.model_spec
        pool = KVCache(spec.num_layers, blocks + 1, bs, self.model.num_kv_heads, spec.head_dim,
                       self.dtype, self.device)  # fmt: skip
        table = torch.arange(1, blocks + 1, device=self.device).unsqueeze(0)
        slots = torch.arange(bs, bs + count, device=self.device)
        layout = AttentionInputs([0], [count], [0], slots, table, bs)
        tokens = torch.tensor(ids, device=self.device)
        positions = torch.arange(count, device=self.device)
        with torch.inference_mode():
            meta = self.backend.prepare(layout)
            self.model.forward(tokens, positions, meta, pool, self.backend)
        self.kv_scales = scales_from(pool)
        k, v = [s.k for s in self.kv_scales], [s.v for s in self.kv_scales]
        log.info(
            "fp8 KV scales from %d calibration tokens: K %.3g..%.3g, V %.3g..%.3g",
            count, min(k), max(k), min(v), max(v),
        )  # fmt: skip

    def free_kv(self) -> None:
        self.kv, self.graphs = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what a prefill cached goes back to the free memory

    def kv_blocks_that_fit(self, reserve: int) -> int:
        """Blocks (block 0 included) the KV budget holds, `reserve` bytes left free."""
        return memory.num_kv_blocks(
            self.config, self.model_spec, self.parallel, self.kv_dtype, reserve=reserve
        )

    def peak_activation_bytes(self, run: Callable[[], None], what: str) -> int:
        """Runs `run` (a prefill); returns its peak bytes on CUDA above the weights (0 on
        CPU), which the KV pool must leave free. Running out of memory is a clear error."""
        if self.device.type != "cuda":
            run()
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        try:
            run()
        except torch.cuda.OutOfMemoryError as exc:
            self.free_kv()
            raise OutOfBlocks(
                f"{what} does not fit in GPU memory after the weights; lower "
                "--max-batch-prefill-tokens or use more shards"
            ) from exc
        return torch.cuda.max_memory_allocated(self.device) - baseline

    def capture_graphs(self, max_total_tokens: int) -> None:
        sizes = self.config.cuda_graphs
        if self.device.type != "cuda" or not sizes:
            return
        if not self.backend.supports_cuda_graphs:
            log.warning("CUDA graphs need the triton or flash-attn backend; decoding eagerly")
            return
        if not getattr(self.model, "supports_cuda_graphs", True):
            log.warning("CUDA graphs: this model routes tokens to experts on the host; eager")
            return
        self.graphs = DecodeGraphs(self, sizes, max_total_tokens)
        self.graphs.capture()

    # ---- forwards ----
    def forward(self, inputs: ForwardInputs) -> torch.Tensor:
        """hidden [T, H] for the laid-out tokens; writes their K/V into the pool."""
        assert self.kv is not None, "the KV pool is allocated at Warmup"
        if self.graphs is not None and all(n == 1 for n in inputs.attention.query_lens):
            hidden = self.graphs.run(inputs)  # None when no captured size holds the batch
            if hidden is not None:
                return hidden
        lens = inputs.attention.query_lens
        if self.cpu_step is not None and len(lens) <= self.cpu_step.max_rows:
            if all(n == 1 for n in lens):  # decode rows only
                return self.cpu_step.forward(inputs, self.kv)
        meta = self.backend.prepare(inputs.attention)
        return self.model.forward(inputs.input_ids, inputs.positions, meta, self.kv, self.backend)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32."""
        return self.model.logits(hidden)
