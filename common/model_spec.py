"""A model directory's shape, read from its config.json, and whether it can be served and
split: plain Python (no torch), so the launcher checks a model before any process starts.

Every problem is a one-line `ModelConfigError` naming what is missing or what is supported.
The registry of families (`FAMILIES`) lives here too: the launcher checks a model with no
torch or shard code imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ModelConfigError(ValueError):
    """The model cannot be served as configured; the message is one line naming the fix
    (the shard reports it as its ModelLoadError, the launcher as a start-up error)."""


# The registry: architecture name -> the module of shard/models that implements it.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# Architectures whose q/k/v projections always carry a bias (others: `attention_bias`).
QKV_BIAS = ("Qwen2ForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a decoder, read from config.json (`config`, whole, for the settings
    only one family reads)."""

    architecture: str
    family: str  # the module of shard/models
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window in keys, 0 for none
    config: dict = field(default_factory=dict, compare=False, repr=False)


PREQUANTIZED = ("gptq", "awq", "compressed-tensors", "fp8", "fbgemm_fp8")


def prequantized(config: dict) -> dict | None:
    """A checkpoint's `quantization_config` when pytgi serves it, as settings for the shard's
    `PrequantizedStore`; None when unquantized. Served: 4-bit GPTQ (act-order included),
    AWQ (GEMM layout), compressed-tensors 4-bit symmetric integer weights (pack-quantized)
    and fp8 weights (compressed-tensors float-quantized, transformers' fp8 with block scales,
    FBGEMM fp8; dequantized on load on CPU). Other methods are refused by name: their
    weights are never loaded with their scales ignored."""
    quantized = config.get("quantization_config")
    if not quantized:
        return None
    if not isinstance(quantized, dict):
        quantized = {"quant_method": str(quantized)}
    method = quantized.get("quant_method", "an unknown method")
    if method not in PREQUANTIZED:
        raise ModelConfigError(
            f"this checkpoint is quantized ({method}); quantized weights are not supported yet "
            f"(they are never loaded with their scales ignored; supported: "
            f"{', '.join(PREQUANTIZED)}): serve the unquantized model"
        )
    if method == "compressed-tensors":
        return {"method": method, "weights": _compressed_weights(quantized)}
    if method in ("fp8", "fbgemm_fp8"):  # block scales (weight_scale_inv) cover b x b weights
        return {"method": method, "block": list(quantized.get("weight_block_size") or (128, 128))}
    bits = quantized.get("bits", quantized.get("w_bit"))
    version = str(quantized.get("version", "gemm")).lower()
    if bits != 4 or (method == "awq" and version != "gemm"):
        raise ModelConfigError(
            f"this {method} checkpoint has {bits}-bit weights"
            + (f" in AWQ's {version} layout" if method == "awq" else "")
            + "; pytgi serves 4-bit GPTQ and 4-bit AWQ (GEMM layout)"
        )
    return {  # group sizes and act-order are read from the tensors themselves
        "method": method,
        "zeros_minus_one": method == "gptq"
        and quantized.get("checkpoint_format", "gptq") == "gptq",
    }


def _compressed_weights(quantized: dict) -> str:
    """ "int4" (pack-quantized symmetric 4-bit integers) or "fp8" (8-bit floats), the one
    weight scheme of every config group; anything else refused by what it is."""
    schemes = set()
    for group in (quantized.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        schemes.add((weights.get("type"), weights.get("num_bits"), weights.get("symmetric", True)))
    form = quantized.get("format")
    if schemes == {("int", 4, True)} and form == "pack-quantized":
        return "int4"
    if schemes == {("float", 8, True)} and form in ("float-quantized", "naive-quantized"):
        return "fp8"
    raise ModelConfigError(
        f"this compressed-tensors checkpoint ({form}; weights {sorted(map(str, schemes))}) "
        "is not served: pytgi reads pack-quantized symmetric 4-bit integer weights and 8-bit "
        "float weights"
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def _eos_ids(model_dir: Path, config: dict) -> tuple[int, ...]:
    """EOS ids from generation_config.json, falling back to config.json."""
    gen_path = model_dir / "generation_config.json"
    source = read_json(gen_path) if gen_path.exists() else {}
    eos = source.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def layer_windows(config: dict, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding window in keys (0: full attention), as transformers reads them:
    `layer_types` naming each layer "sliding_attention" or "full_attention" (Qwen2/3,
    Gemma 2/3); else, when `sliding_window` is set (and `use_sliding_window` not false),
    every layer (Mistral, Phi-3), or the layers from `max_window_layers` on (older Qwen2)."""
    window = config.get("sliding_window") or 0
    if not window or not config.get("use_sliding_window", True):
        window = 0
    types = config.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise ModelConfigError(
                f"layer_types names {len(types)} layers, the model has {num_layers}"
            )
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    first = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0
    return tuple(window if i >= first else 0 for i in range(num_layers))


def _rope(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None) from either config form.

    transformers < 5 writes `rope_theta` and `rope_scaling` (null for plain RoPE);
    transformers >= 5 writes one `rope_parameters` dict holding `rope_theta`, `rope_type`
    and the scaling fields. A `rope_type` of "default" means no scaling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            params = _global_rope(config, params)
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling: dict | None = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"unsupported rope_scaling type {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return float(theta), scaling


def _global_rope(config: dict, params: dict) -> dict:
    """transformers >= 5's per-layer-type form (Gemma 3): the global layers' parameters; the
    sliding layers' base goes where transformers < 5 kept it (`rope_local_base_freq`)."""
    if set(params) - {"full_attention", "sliding_attention"} or "full_attention" not in params:
        raise ModelConfigError(
            f"rope_parameters for layer types {sorted(params)} are not supported "
            "(full_attention and sliding_attention only)"
        )
    local = params.get("sliding_attention")
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise ModelConfigError("scaled RoPE on sliding-window layers is not supported")
        config["rope_local_base_freq"] = local.get("rope_theta", 10000.0)
    return params["full_attention"]


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Parses config.json; raises ModelConfigError for a missing file or unsupported model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelConfigError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ModelConfigError(f"{model_dir} has no config.json")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        remote = " (defined by the repository's own code, which pytgi never runs)"
        raise ModelConfigError(
            f"unsupported architecture {architectures or config.get('model_type')}"
            f"{remote if config.get('auto_map') else ''}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    prequantized(config)  # refuses the methods pytgi cannot load
    rope_theta, rope_scaling = _rope(config)
    num_heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return ModelSpec(
        architecture=arch,
        family=FAMILIES[arch],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or hidden // num_heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        qkv_bias=arch in QKV_BIAS
        or bool(config.get("attention_bias", False) or config.get("qkv_bias", False)),
        eos_token_ids=_eos_ids(model_dir, config),
        layer_windows=layer_windows(config, config["num_hidden_layers"]),
        config=config,
    )


def check_tokenizer(model_dir: str | Path) -> Path:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise ModelConfigError(f"{model_dir} has no tokenizer.json")
    return path


def check_parallel(spec: ModelSpec, world_size: int) -> None:
    """Raises a clear error when the heads or vocabulary do not split across `world_size`."""
    if world_size == 1:
        return
    bad = []
    if spec.num_heads % world_size:
        bad.append(f"{spec.num_heads} attention heads")
    kv = spec.num_kv_heads
    if (kv % world_size) and (world_size % kv):
        bad.append(f"{kv} KV heads")
    sizes = _split_sizes(spec)
    bad += [f"{name} {size}" for name, size in sizes.items() if size % world_size]
    if bad:
        fits = [
            n
            for n in range(1, 9)
            if spec.num_heads % n == 0
            and (kv % n == 0 or n % kv == 0)
            and all(size % n == 0 for size in sizes.values())
        ]
        raise ModelConfigError(
            f"cannot shard over {world_size} ranks: {', '.join(bad)} do not divide; "
            f"shard counts that work: {', '.join(map(str, fits))}"
        )


def _split_sizes(spec: ModelSpec) -> dict[str, int]:
    """The sizes split evenly over ranks besides heads: MLP rows, the vocabulary, experts
    (each rank holds whole experts) and a shared expert's rows."""
    config = spec.config
    sizes = {"intermediate size": spec.intermediate_size, "vocabulary": spec.vocab_size}
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        sizes["experts"] = int(experts)
    if config.get("shared_expert_intermediate_size"):
        sizes["shared expert size"] = int(config["shared_expert_intermediate_size"])
    return sizes
