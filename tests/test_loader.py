"""Loading: the model families match transformers; bad directories fail in one clear line."""

from __future__ import annotations

import json
import shutil

import pytest

from shard.errors import ModelLoadError
from shard.spec import read_spec
from tests.conftest import build_tiny_model
from tests.helpers import make_engine, run_to_end, spec


def test_qwen2_has_qkv_bias(smollm_dir, tmp_path):
    model_dir = build_tiny_model(tmp_path / "q", smollm_dir, "qwen2")
    assert read_spec(model_dir).qkv_bias
    assert make_engine(model_dir).runner.model.layers[0].qkv.bias is not None


def _write_config(path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


def test_unsupported_architecture_names_supported(tmp_path):
    d = _write_config(tmp_path / "m", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(
        ModelLoadError,
        match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ):
        read_spec(d)


@pytest.mark.parametrize(
    "fields, windows",
    [
        ({"sliding_window": 4096}, (4096, 4096, 4096)),  # Mistral v0.1: every layer
        ({"sliding_window": None}, (0, 0, 0)),
        ({"sliding_window": 64, "use_sliding_window": False}, (0, 0, 0)),
        ({"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, (0, 64, 64)),
        (
            {"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"] * 2},
            None,
        ),
        (
            {
                "sliding_window": 8,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            },
            (8, 8, 0),
        ),  # fmt: skip
    ],
)
def test_layer_windows_follow_transformers(fields, windows, tmp_path):
    d = _write_config(
        tmp_path / "m",
        architectures=["MistralForCausalLM"],
        num_attention_heads=4,
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=8,
        vocab_size=10,
        **fields,
    )
    if windows is None:
        with pytest.raises(ModelLoadError, match="layer_types names 4 layers, the model has 3"):
            read_spec(d)
    else:
        assert read_spec(d).layer_windows == windows


def test_unknown_rope_scaling_is_rejected(tmp_path):
    d = _write_config(
        tmp_path / "m",
        architectures=["LlamaForCausalLM"],
        rope_scaling={"type": "mrope", "factor": 4},
        num_attention_heads=4,
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=10,
    )
    with pytest.raises(ModelLoadError, match="rope_scaling type 'mrope'"):
        read_spec(d)


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SHAPE = dict(num_attention_heads=4, hidden_size=64, num_hidden_layers=1, intermediate_size=8)


@pytest.mark.parametrize(
    "fields, theta, scaling",
    [
        ({}, 10000.0, None),
        ({"rope_theta": 5e5, "rope_scaling": None}, 5e5, None),
        ({"rope_theta": 5e5, "rope_scaling": LLAMA3_SCALING}, 5e5, LLAMA3_SCALING),
        # transformers >= 5 writes one rope_parameters dict
        ({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}, 1e5, None),
        (
            {"rope_parameters": {"rope_theta": 5e5, **LLAMA3_SCALING}},
            5e5,
            LLAMA3_SCALING,
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            1e4,  # no theta in either place: the default
            {"rope_type": "linear", "factor": 2.0},
        ),
    ],
)
def test_rope_settings_in_either_config_form(tmp_path, fields, theta, scaling):
    d = _write_config(
        tmp_path / "m", architectures=["LlamaForCausalLM"], vocab_size=10, **SHAPE, **fields
    )
    got = read_spec(d)
    assert got.rope_theta == theta
    assert got.rope_scaling == scaling


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rope_type": "mrope", "factor": 4.0, "rope_theta": 1e4}, "rope_scaling type 'mrope'"),
        (
            {"full_attention": {"rope_theta": 1e4}, "chunked_attention": {"rope_theta": 1e4}},
            "rope_parameters for layer types",
        ),
    ],
)
def test_unsupported_rope_parameters_are_rejected(tmp_path, params, message):
    d = _write_config(
        tmp_path / "m",
        architectures=["LlamaForCausalLM"],
        vocab_size=10,
        rope_parameters=params,
        **SHAPE,
    )
    with pytest.raises(ModelLoadError, match=message):
        read_spec(d)


def test_transformers5_config_form_loads_the_same_model(smollm_dir, tmp_path):
    """The same weights with config.json rewritten the way transformers >= 5 saves it
    (rope_theta and rope_scaling folded into rope_parameters) give the same tokens."""
    old = build_tiny_model(
        tmp_path / "old", smollm_dir, rope_theta=5e5, rope_scaling=LLAMA3_SCALING
    )
    new = tmp_path / "new"
    shutil.copytree(old, new)
    config = json.loads((new / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": 5e5, **LLAMA3_SCALING}
    (new / "config.json").write_text(json.dumps(config))
    text = "Long-context scaling must survive the new config form, token for token."
    a = run_to_end(make_engine(old), 1, [spec(1, text, 12, ignore_eos=True)])
    b = run_to_end(make_engine(new), 1, [spec(1, text, 12, ignore_eos=True)])
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    # and the default-theta model differs, so the test would see the settings dropped
    dropped = tmp_path / "dropped"
    shutil.copytree(old, dropped)
    config.pop("rope_parameters")
    (dropped / "config.json").write_text(json.dumps(config))
    c = run_to_end(make_engine(dropped), 1, [spec(1, text, 12, ignore_eos=True)])
    assert c.logprobs != a.logprobs


@pytest.mark.parametrize(
    "remove, message",
    [
        (
            "model.safetensors",
            "no \\*.safetensors weights \\(pickle .bin files are never loaded\\)",
        ),
        ("tokenizer.json", "has no tokenizer.json"),
    ],
)
def test_missing_files_are_named(tiny_model_dir, tmp_path, remove, message):
    from common.config import ShardConfig
    from shard.engine import ShardEngine

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / remove).unlink()
    if remove == "model.safetensors":
        (copy / "pytorch_model.bin").write_bytes(b"pickle!")
    with pytest.raises(ModelLoadError, match=message):
        ShardEngine(ShardConfig(model_dir=str(copy)))


def test_sharded_safetensors_with_index(smollm_dir, tmp_path):
    """A model saved in several files with model.safetensors.index.json loads the same."""
    import transformers

    source = build_tiny_model(tmp_path / "one", smollm_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    sharded = tmp_path / "many"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    text = "Sharded weights load the same."
    one = run_to_end(make_engine(source), 1, [spec(1, text, 6, ignore_eos=True)]).tokens[1]
    many = run_to_end(make_engine(sharded), 1, [spec(1, text, 6, ignore_eos=True)]).tokens[1]
    assert one == many


def test_tensor_parallel_split_error_names_working_counts(smollm_dir):
    from shard.spec import check_parallel

    with pytest.raises(ModelLoadError, match="shard counts that work: 1, 3"):
        check_parallel(read_spec(smollm_dir), 2)


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            r"quantized \(bitsandbytes\); quantized weights are not",
        ),
        ({"quant_method": "exl2"}, r"quantized \(exl2\)"),
        ({"quant_method": "gptq", "bits": 8}, "has 8-bit weights"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ's gemv layout"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {"g": {"weights": {"type": "int", "num_bits": 8}}},
            },
            "compressed-tensors checkpoint .int-quantized",
        ),  # fmt: skip
    ],
)
def test_a_quantized_checkpoint_is_refused_by_its_method(tmp_path, config, reason):
    d = _write_config(
        tmp_path / "m", architectures=["LlamaForCausalLM"], quantization_config=config
    )
    with pytest.raises(ModelLoadError, match=reason):
        read_spec(d)


def test_a_remote_code_architecture_is_refused_with_why(tmp_path):
    d = _write_config(
        tmp_path / "m",
        architectures=["MyModelForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_my.MyModelForCausalLM"},
    )
    with pytest.raises(ModelLoadError, match="repository's own code, which pytgi never runs"):
        read_spec(d)
