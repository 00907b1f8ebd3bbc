"""The random-weight models that benchmarks/gpu_check.sh builds load in both pytgi and
transformers, with exactly the parameter names and shapes of transformers' own classes (Llama, Qwen3)."""

from __future__ import annotations

import pytest
import torch
import transformers

from benchmarks.gpu_models import SHAPES, build, config_json, tensor_shapes
from tests.helpers import make_engine, run_to_end, spec


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_match_transformers(name):
    values = config_json(SHAPES[name])
    config = transformers.AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == values["architectures"][0]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert tensor_shapes(SHAPES[name]) == expected


def test_built_model_serves_and_matches_transformers(tmp_path, smollm_dir):
    path = build("smollm2-135m", tmp_path, smollm_dir)
    engine = make_engine(path, dtype="bfloat16")
    out = run_to_end(engine, 1, [spec(0, "Hello there, how are you", 4, ignore_eos=True)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = engine.tokenizer.encode("Hello there, how are you", add_special_tokens=False).ids
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    first = out.tokens[0][0]
    assert logits.max() - logits[first] < 2e-2
    assert abs(logits[first].item() - out.logprobs[0][0]) < 2e-2


def test_gpu_decode_script_runs_on_cpu(tiny_model_dir, tmp_path):
    """benchmarks/gpu_decode.py, smoke-tested here so a GPU session does not find its bugs."""
    import json
    import subprocess
    import sys

    out = tmp_path / "decode.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu_decode.py", str(tiny_model_dir), "--device", "cpu",
         "--batch", "1,2", "--steps", "3", "--json", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["weight_bytes"] > 0 and report["bound_ms"] > 0 and report["bandwidth"] > 0
    for row in report["rows"].values():
        assert row["eager_ms"] > 0 and row["graphs_ms"] > 0 and row["transformers_ms"] > 0


def test_gpu_decode_quantized_table_runs_on_cpu(tiny_model_dir):
    """The formats' table gpu_check.sh prints: on CPU every format but fp8 weights is
    measured; fp8 weights are refused there with the reason in their row."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_decode.py", str(tiny_model_dir), "--device", "cpu",
         "--batch", "1,2", "--steps", "3", "--quantized"],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    by_name = {row.split(" | ")[0].removeprefix("| "): row for row in rows[1:]}
    assert set(by_name) >= {"bf16", "fp8 weights", "int8 weights", "int4 weights (g32)",
                            "bf16, fp8 KV cache"}  # fmt: skip
    assert "refused: --quantize fp8 needs a GPU" in by_name["fp8 weights"]
    for name in ("bf16", "int8 weights", "int4 weights (g32)", "bf16, fp8 KV cache"):
        assert by_name[name].rstrip(" |").endswith("x"), by_name[name]


def test_the_second_family_serves_and_matches_transformers(tmp_path, smollm_dir, monkeypatch):
    """The Qwen3 shape (heads wider than hidden / heads, per-head q/k norms), cut to two
    layers and SmolLM2's vocabulary so that it builds in seconds here."""
    small = {**SHAPES["qwen3-0.6b"], "num_hidden_layers": 2, "vocab_size": 49152}
    monkeypatch.setitem(SHAPES, "qwen3-0.6b", small)
    path = build("qwen3-0.6b", tmp_path, smollm_dir)
    engine = make_engine(path, dtype="bfloat16")
    assert engine.model_spec.config["model_type"] == "qwen3"
    prompt = "Hello there, how are you"
    out = run_to_end(engine, 1, [spec(0, prompt, 4, ignore_eos=True)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False).ids
    with torch.inference_mode():
        logits = hf(torch.tensor([ids + out.tokens[0]])).logits[0].float().log_softmax(-1)
    for step, (token, ours) in enumerate(zip(out.tokens[0], out.logprobs[0], strict=True)):
        theirs = logits[len(ids) - 1 + step]
        assert theirs.max() - theirs[token] < 2e-2 and abs(theirs[token].item() - ours) < 2e-2


def test_gpu_quant_kernels_script_runs_on_cpu():
    """benchmarks/gpu_quant_kernels.py under Triton's interpreter, tiny shapes: every form
    timed, and every GEMV tile variant (rounded weights too) gives the default kernel's
    product."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_quant_kernels.py", "--device", "cpu", "--small",
         "--rows", "1"],
        check=True, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    from benchmarks.gpu_quant_kernels import VARIANTS

    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 + 1 + len(VARIANTS)  # two headers, 2 layers, the variants
    assert len(VARIANTS) > 10  # the GEMV kernels' sweep
    assert "wrong" not in result.stdout
