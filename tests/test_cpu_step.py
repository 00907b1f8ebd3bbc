"""The decode step in one C++ call (shard/models/cpu_step.py) against the Python forward it
replaces: the same engine generates with `runner.cpu_step` on and then off, each prompt
alone and all in one batch, and the tokens and log-probabilities must be equal exactly (the
C++ stack calls the same kernels in the same order, so any difference is a defect, not
rounding). Each case also checks that the step ran (batch 1 always; several rows where the
weights are quantized, or plain in panel_linear's panels), so a silent fallback fails here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shard.models.cpu_step import ANY, CpuDecodeStep
from tests.conftest import build_tiny_model
from tests.helpers import make_engine, run_to_end, spec

PROMPTS = [
    "Once upon a time",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32",
    "The rain in Spain stays mainly in the plain.",
]
NEW_TOKENS = 24  # past a block of 16 and past every window below
LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
}
BIASES = {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}
# id -> (model_type, config overrides, engine options)
CASES = {
    "llama": ("llama", {}, {}),
    "llama-biases-tied": ("llama", BIASES, {}),
    "mistral-window": ("mistral", {"sliding_window": 8}, {}),
    "qwen2-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
        {},
    ),
    "qwen3-1kv": ("qwen3", {"head_dim": 24, "num_key_value_heads": 1}, {}),
    "phi3-longrope": (
        "phi3",
        {"original_max_position_embeddings": 16, "rope_scaling": LONGROPE},
        {},
    ),
    "phi4-partial-rotary": ("phi3", {"partial_rotary_factor": 0.75}, {}),
    "llama-bfloat16": ("llama", {}, {"dtype": "bfloat16"}),
    "llama-biases-tied-bfloat16": ("llama", BIASES, {"dtype": "bfloat16"}),
    "llama-int8": ("llama", {}, {"quantize": "int8"}),
    "qwen2-int4": ("qwen2", {}, {"quantize": "int4", "quantize_group_size": 32}),
    # bfloat16 models' quantized layers in our quantized panels where the CPU takes them
    "llama-int8-bfloat16": ("llama", {}, {"quantize": "int8", "dtype": "bfloat16"}),
    "qwen2-int4-bfloat16": (
        "qwen2",
        {},
        {"quantize": "int4", "quantize_group_size": 32, "dtype": "bfloat16"},
    ),
    "llama-fp8-kv": ("llama", {}, {"kv_cache_dtype": "fp8_e4m3fn"}),
}


def generate(engine, batch_id: int) -> tuple[list, list]:
    """Tokens and log-probabilities of each prompt alone, then of all in one batch (the
    shorter prompts decode beside the longer one's prefill, then all three decode)."""
    tokens, logprobs = [], []
    for i, prompt in enumerate(PROMPTS):
        c = run_to_end(engine, batch_id + i, [spec(i, prompt, NEW_TOKENS, ignore_eos=True)])
        tokens.append(c.tokens[i])
        logprobs.append(c.logprobs[i])
    specs = [spec(10 + i, p, NEW_TOKENS, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    c = run_to_end(engine, batch_id + 9, specs)
    tokens += [c.tokens[10 + i] for i in range(len(PROMPTS))]
    logprobs += [c.logprobs[10 + i] for i in range(len(PROMPTS))]
    return tokens, logprobs


def step_rows(engine, quantized: bool) -> int:
    """Rows the C++ step takes: quantized, the kernels' own limit (quant.h); plain weights
    in panels (their dtype in the build's panel_dtypes), any; other plain weights one (more
    go through oneDNN)."""
    kernels = engine.runner.model.ops.kernels
    if quantized:
        return kernels.max_rows
    panels = engine.runner.dtype_name in getattr(kernels, "panel_dtypes", ())
    return ANY if panels else 1


def assert_step_equals_python(engine, quantized: bool = False) -> None:
    step = engine.runner.cpu_step
    assert step is not None, engine.runner.cpu_step_reason
    assert step.max_rows == step_rows(engine, quantized)
    assert "one C++ call" in engine.runner.kernel_report()
    rows: list[int] = []
    forward = step.forward
    step.forward = lambda inputs, kv: rows.append(len(inputs.input_ids)) or forward(inputs, kv)
    fused = generate(engine, 10)
    engine.runner.cpu_step = None
    try:
        python = generate(engine, 20)
    finally:
        engine.runner.cpu_step = step
    assert fused[0] == python[0]
    assert fused[1] == python[1]  # exactly: the same kernels on the same inputs
    assert engine.blocks_all_back()
    assert 1 in rows and (max(rows) == len(PROMPTS)) == (step.max_rows > 1), rows


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_step_equals_the_python_forward(case, smollm_dir, tmp_path):
    model_type, overrides, options = CASES[case]
    model_dir = build_tiny_model(tmp_path, smollm_dir, model_type, **overrides)
    options = {"dtype": "float32", **options}
    assert_step_equals_python(make_engine(model_dir, **options), "quantize" in options)


def test_cpu_step_on_smollm2_from_its_gguf(smollm_dir):
    """The shipped model (30 layers, 9 heads over 3 KV heads) from its Q4_1 GGUF as int4."""
    engine = make_engine(smollm_dir, dtype="float32", quantize="int4", quantize_group_size=32)
    assert_step_equals_python(engine, quantized=True)


@pytest.mark.parametrize(
    ("model_type", "overrides", "options", "why"),
    [
        ("gemma2", {"head_dim": 16}, {}, "has its own forward"),
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, {}, "mixture-of-experts"),
        (  # neither the single-row copy nor panels (with them, every row takes the panels)
            "llama",
            {},
            {"cpu_gemv": False, "pack_linear": False},
            "qkv weights as Linear without a kernel",
        ),
        ("llama", {}, {"disable_custom_kernels": True}, "not on CPU with pytgi's kernels"),
    ],
)
def test_cpu_step_says_why_it_stays_off(model_type, overrides, options, why, smollm_dir, tmp_path):
    engine = make_engine(build_tiny_model(tmp_path, smollm_dir, model_type, **overrides), **options)
    assert engine.runner.cpu_step is None
    assert why in engine.runner.cpu_step_reason
    assert why in engine.runner.kernel_report()
    c = run_to_end(engine, 1, [spec(0, PROMPTS[0], 4, ignore_eos=True)])  # the Python forward
    assert len(c.tokens[0]) == 4


def test_cpu_step_stays_off_over_shards(tiny_model_dir):
    """Tensor-parallel layers all-reduce between kernels: the step is not built for them."""
    engine = make_engine(tiny_model_dir)
    runner = engine.runner
    step, why = CpuDecodeStep.build(runner.model, runner.backend, SimpleNamespace(world_size=2))
    assert step is None and "tensor parallel" in why


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}], ids=["float32", "int8"])
def test_products_run_each_layers_projections_at_their_widths(options, tiny_model_dir):
    """`DecodeStack.products` (benchmarks/cpu_limits.py times a step's weights alone with
    it) multiplies every layer's QKV, output, gate/up and down projections, in that order, on
    rows of the widths given: the model's widths run, and a wrong width in any of the four
    places is refused by that projection's kernel."""
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    dim = config.get("head_dim") or hidden // heads
    widths = [hidden, heads * dim, hidden, config["intermediate_size"]]
    engine = make_engine(tiny_model_dir, dtype="float32", **options)
    step = engine.runner.cpu_step
    assert step is not None, engine.runner.cpu_step_reason
    for rows in (1, 3):
        step.stack.products(rows, widths)
    for place in range(4):
        wrong = [w + 2 * (i == place) for i, w in enumerate(widths)]
        with pytest.raises(RuntimeError):
            step.stack.products(1, wrong)
    with pytest.raises(RuntimeError, match="four input widths"):
        step.stack.products(1, widths[:3])
