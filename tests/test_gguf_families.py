"""GGUF files of the Llama, Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3 architectures, written
by the test as llama.cpp's converter writes them (its tensor names and metadata; Llama's q/k
rows interleaved; Gemma's norms stored as 1 + w; the packaged SmolLM2 GGUF's tokenizer
fields, or its vocabulary as a sentencepiece-style one for the families that have those),
served through `--model-id file.gguf`'s preparation: float32 tensors give the tokens of the
safetensors model they came from (RoPE scaling read back from llama.cpp's tensors and keys),
Q8_0, Q4_K and Q6_K ones those of its dequantized twin, packed."""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shard.embedded import find_gguf, gguf_model_dir
from shard.errors import ModelLoadError
from shard.gguf import gguf_config, unpermute_rows
from tests.conftest import build_tiny_model
from tests.helpers import make_engine
from tests.test_families import LONG, SHORT
from tests.test_prequantized import PROMPTS, _assert_same, _run

# llama.cpp's converter, written out here apart from shard/gguf.py's tables: Hugging Face's
# names -> GGUF's, per family
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LLAMA = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PHI3 = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA = {
    **_LLAMA,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# GGUF architecture: (names, q/k rows interleaved, norm weights stored as 1 + w)
LLAMA_CPP = {
    "llama": (_LLAMA, True, False),
    "qwen2": (_LLAMA, False, False),
    "qwen3": (_LLAMA, False, False),
    "phi3": (_PHI3, False, False),
    "gemma2": (_GEMMA, False, True),
    "gemma3": (_GEMMA, False, True),
}
# transformers' model type -> llama.cpp's architecture name
_GGUF_ARCH = {"gemma3_text": "gemma3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def gguf_name(name: str, names: dict[str, str]) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")  # model.layers.N.<module>.<proj>.<kind>
    return f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"


@functools.cache
def _smollm_tokenizer_fields() -> dict[str, tuple]:
    """The packaged GGUF's tokenizer fields: key -> (value, type, array element type), read
    once a run (GGUFReader takes 8-20 s over its 98,000 strings)."""
    import gguf

    fields = {}
    for key, field in gguf.GGUFReader(find_gguf()).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), vtype, sub)
    return fields


def _copy_tokenizer(writer, sentencepiece: bool) -> None:
    """SmolLM2's GGUF tokenizer fields; `sentencepiece`: its vocabulary as a llama-style
    (sentencepiece) one, as Phi-3's and Gemma's files hold: "▁" for the space marker, a
    score per token, the merges kept so transformers need not rebuild them."""
    fields = _smollm_tokenizer_fields()
    for key, (value, vtype, sub) in fields.items():
        if sentencepiece and key == "tokenizer.ggml.model":
            value = "llama"
        elif sentencepiece and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            value = [v.replace("Ġ", "▁") for v in value]
        elif sentencepiece and key == "tokenizer.ggml.pre":
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if sentencepiece:
        count = len(fields["tokenizer.ggml.tokens"][0])
        writer.add_token_scores([-float(i) for i in range(count)])


def _theta_scaling(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling or {}) of a config.json in either transformers' form."""
    from common.model_spec import _rope

    theta, scaling = _rope(copy.deepcopy(config))
    return theta, scaling or {}


def _llama_cpp_rope_freqs(config: dict) -> list[float]:
    """llama.cpp's rope_freqs for a Llama 3 RoPE scaling (its converter's arithmetic)."""
    theta, scaling = _theta_scaling(config)
    dim = config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _write_rope(writer, config: dict) -> None:
    """RoPE scaling as llama.cpp writes it: Llama 3's as rope_freqs divisors, Phi-3's longrope
    as factor tensors and the original context; linear as metadata."""
    scaling = _theta_scaling(config)[1]
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        writer.add_tensor("rope_freqs.weight", np.array(_llama_cpp_rope_freqs(config), np.float32))
    elif kind == "longrope":
        original = scaling.get("original_max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(original or config["original_max_position_embeddings"])
        for which in ("long", "short"):
            factors = np.array(scaling[f"{which}_factor"], np.float32)
            writer.add_tensor(f"rope_factors_{which}.weight", factors)
    elif kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def write_gguf(model_dir: Path, path: Path, kind: str = "F32") -> dict[str, torch.Tensor]:
    """The model as a GGUF file; returns the weights it stands for (Q8_0: dequantized)."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch = _GGUF_ARCH.get(config["model_type"], config["model_type"])
    names, interleaved, one_plus = LLAMA_CPP[arch]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_theta_scaling(config)[0])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch.startswith("gemma"):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("partial_rotary_factor", 1.0) < 1.0:
        head_dim = config["hidden_size"] // heads
        writer.add_rope_dimension_count(int(head_dim * config["partial_rotary_factor"]))
    _copy_tokenizer(writer, sentencepiece=arch in ("phi3", "gemma2", "gemma3"))
    _write_rope(writer, config)
    served = {}
    for name, weight in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        data = weight.float()
        stored = data
        if interleaved and name.endswith(("q_proj.weight", "k_proj.weight")):
            count = heads if "q_proj" in name else kv_heads
            stored = torch.empty_like(data)
            stored[unpermute_rows(data.shape[0], count)] = data  # llama.cpp's interleaving
        if one_plus and name.endswith("norm.weight"):
            stored = data + 1.0  # llama.cpp folds Gemma's 1 + w in
        if kind == "Q8_0" and data.dim() == 2 and "embed" not in name:
            blocks = gguf.quants.quantize(stored.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name, names), blocks,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
            back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
            back = torch.from_numpy(np.array(back)).reshape(data.shape)
            served[name] = back if stored is data else back[unpermute_rows(data.shape[0], count)]
        else:
            writer.add_tensor(gguf_name(name, names), stored.numpy())
            served[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return served


# prompts pass the original 16 positions, so the long factors are read too
LONGROPE = {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
_GEMMA_CONFIG = {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8}
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 128}),  # transformers reads no head_dim from it: 128
    "phi3": ("phi3", {}),
    "phi3-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5}),  # Phi-4-mini's kind
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": 16, "rope_scaling": LONGROPE}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),  # Llama 3.1+: rope_freqs
    "gemma2": (
        "gemma2",
        {**_GEMMA_CONFIG, "attn_logit_softcapping": 20.0, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (  # layers 0-4 sliding, 5 global (its pattern), linear RoPE scaling (4B's)
        "gemma3_text",
        {
            **_GEMMA_CONFIG,
            "num_hidden_layers": 6,
            "query_pre_attn_scalar": 16,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
    ),  # fmt: skip
}


def _rope(config: dict) -> tuple:
    """A config's RoPE scaling: kind, factor, original context, long factors (float32's)."""
    scaling = _theta_scaling(config)[1]
    original = scaling.get("original_max_position_embeddings")
    return (
        scaling.get("rope_type", scaling.get("type")),
        scaling.get("factor"),
        original or (config.get("original_max_position_embeddings") if scaling else None),
        [round(v, 5) for v in scaling.get("long_factor", [])],
    )


def _random_norms(model_dir: Path) -> Path:
    """Norm weights drawn at random (transformers starts Gemma's at 0, so 1 + w = 1 would
    hide a wrong offset)."""
    path = model_dir / "model.safetensors"
    weights = load_file(str(path))
    gen = torch.Generator().manual_seed(1)
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.randn(value.shape, generator=gen) * 0.3
    save_file(weights, str(path), metadata={"format": "pt"})
    return model_dir


def _with_tokenizer_of(model_dir: Path, served: Path, target: Path) -> Path:
    """A copy of model_dir reading served's tokenizer (the GGUF's, as transformers made it)."""
    shutil.copytree(model_dir, target)
    for name in TOKENIZER_FILES:
        (target / name).unlink(missing_ok=True)
        if (served / name).exists():
            shutil.copy(served / name, target / name)
    return target


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_a_gguf_file_serves_the_tokens_of_its_model(case, smollm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    model_type, overrides = FAMILIES[case]
    tiny = _random_norms(
        build_tiny_model(tmp_path / case, smollm_dir, model_type, **copy.deepcopy(overrides))
    )
    write_gguf(tiny, tmp_path / f"{case}.gguf")
    served = gguf_model_dir(tmp_path / f"{case}.gguf")
    config = json.loads((served / "config.json").read_text())
    assert config["model_type"] == model_type and not list(served.glob("*.safetensors"))
    want = json.loads((tiny / "config.json").read_text())
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "partial_rotary_factor"):
        assert config.get(key) == want.get(key), key  # the file's values, not defaults
    assert _rope(config) == _rope(want)
    twin = _with_tokenizer_of(tiny, served, tmp_path / "twin")
    _assert_same(_run(make_engine(served)), _run(make_engine(twin)))


def test_gemma_norms_are_read_back_from_one_plus_w(smollm_dir, tmp_path):
    from shard.gguf import GgufStore

    tiny = _random_norms(build_tiny_model(tmp_path / "g", smollm_dir, "gemma2", **_GEMMA_CONFIG))
    write_gguf(tiny, tmp_path / "g.gguf")
    store, weights = GgufStore(tmp_path / "g.gguf"), load_file(str(tiny / "model.safetensors"))
    for name in ("model.norm.weight", "model.layers.1.post_feedforward_layernorm.weight"):
        assert torch.allclose(store.get(name), weights[name].float(), rtol=0, atol=1e-6)
        assert not torch.equal(store.get(name), torch.zeros_like(store.get(name)))


def test_gguf_config_follows_llama_cpp_for_gemma_27b(tmp_path):
    """llama.cpp scales a 27B Gemma's queries by hidden / heads (not head_dim)."""
    import gguf

    for arch, layers, expected in (("gemma2", 46, 144), ("gemma2", 26, 128), ("gemma3", 62, 168)):
        path = tmp_path / f"{arch}-{layers}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_block_count(layers)
        writer.add_embedding_length(144 * 32 if expected != 168 else 5376)
        writer.add_head_count(32)
        writer.add_key_length(128)
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert gguf_config(path)["query_pre_attn_scalar"] == expected, (arch, layers)


@pytest.mark.parametrize("case", ["qwen2", "phi3", "gemma2"])
def test_q8_0_tensors_of_a_gguf_are_served_packed(case, smollm_dir, tmp_path, monkeypatch):
    """Q8_0 blocks (Phi-3's fused q/k/v and gate/up cut into their parts, packed) give the
    tokens of the dequantized twin."""
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    model_type, overrides = FAMILIES[case]
    tiny = _random_norms(
        build_tiny_model(tmp_path / case, smollm_dir, model_type, **copy.deepcopy(overrides))
    )
    weights = write_gguf(tiny, tmp_path / "q8.gguf", kind="Q8_0")
    served = gguf_model_dir(tmp_path / "q8.gguf")
    twin = _with_tokenizer_of(tiny, served, tmp_path / "twin")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(twin / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    engine = make_engine(served)
    layer = engine.runner.model.layers[0].qkv
    assert layer.method == "int8" and layer.group_size == 32  # the file's blocks, packed
    _assert_same(_run(engine), _run(make_engine(twin)))


def _bare_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in tensors.items():
        writer.add_tensor(name, np.asarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unserved_gguf_architecture_is_refused_by_name(tmp_path):
    from shard.gguf import GgufStore

    path = _bare_gguf(tmp_path / "b.gguf", "bloom", {"token_embd.weight": np.zeros((4, 32))})
    with pytest.raises(ModelLoadError, match="GGUF architecture 'bloom' is not served"):
        GgufStore(path)


def test_rotary_tensors_a_family_does_not_read_are_refused(tmp_path):
    from shard.gguf import GgufStore

    tensors = {"token_embd.weight": np.zeros((4, 32)), "rope_freqs.weight": np.ones(8)}
    path = _bare_gguf(tmp_path / "q.gguf", "qwen2", tensors)
    with pytest.raises(ModelLoadError, match="rotary tensors rope_freqs.weight"):
        GgufStore(path)


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "llama")
    writer.add_embedding_length(32)
    writer.add_head_count(4)  # heads of 8: 4 frequencies
    writer.add_tensor("rope_freqs.weight", np.array([1.0, 3.0, 1.0, 8.0], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "r.gguf"
    with pytest.raises(ValueError, match="not Llama 3's RoPE scaling"):
        gguf_config(path)


def test_llama3_rope_freqs_of_a_published_shape_give_its_config():
    """Llama 3.1's scaling (factor 8, original 8192, theta 500000, head 128) is read back;
    all-ones divisors are no scaling."""
    from shard.gguf import _llama3_scaling

    config = {"rope_theta": 500000.0, "hidden_size": 4096, "num_attention_heads": 32}
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    scaling = _llama3_scaling(_llama_cpp_rope_freqs(config), 128, 500000.0)
    assert scaling == config["rope_scaling"]
    assert _llama3_scaling([1.0] * 64, 128, 500000.0) is None


def q4_k_blocks(rows: int, k: int, gen: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """Random Q4_K blocks [rows, k / 256 * 144] packed by the test from known parts (float16
    d and dmin, 6-bit scales and mins, nibbles) as ggml lays them out, and the weights
    d s q - dmin m they stand for (float32)."""
    supers = k // 256
    d = (torch.rand(rows, supers, 1, generator=gen) * 4e-4 + 1e-4).half()
    dmin = (torch.rand(rows, supers, 1, generator=gen) * 4e-4).half()
    sc = torch.randint(0, 64, (rows, supers, 8), generator=gen, dtype=torch.uint8)
    mn = torch.randint(0, 64, (rows, supers, 8), generator=gen, dtype=torch.uint8)
    codes = torch.randint(0, 16, (rows, supers, 8, 32), generator=gen, dtype=torch.uint8)
    packed_scales = torch.cat(
        [
            (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6),
            (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4),
        ],
        dim=-1,
    )
    # 32-byte chunk c: group 2c in the low nibbles, group 2c + 1 in the high ones
    pairs = codes.view(rows, supers, 4, 2, 32)
    qs = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(rows, supers, 128)
    raw = [d.view(torch.uint8), dmin.view(torch.uint8), packed_scales, qs]
    blocks = torch.cat(raw, dim=-1).reshape(rows, supers * 144)
    weights = d.float()[..., None] * sc.float()[..., None] * codes.float()
    weights = weights - (dmin.float()[..., None] * mn.float()[..., None])
    return blocks.numpy(), weights.reshape(rows, k)


def test_q4_k_blocks_packed_from_known_values_unpack_to_them(tmp_path):
    """Q4_K super-blocks come back as exactly their weights (as the gguf package's own
    dequantization gives them too), packed as int4 in groups of 32 with float32 scales,
    q rows in Hugging Face's order; the CPU kernel multiplies by them."""
    import gguf

    from shard.gguf import GgufStore
    from shard.models.quant import QuantLinear, dequantize_int4
    from tests.test_quant import _relative_error, _write_gguf

    gen = torch.Generator().manual_seed(4)
    n, k = 8, 512  # q: 2 heads of 4 rows
    blocks, expected = q4_k_blocks(n, k, gen)
    reference = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert torch.equal(torch.from_numpy(np.array(reference)).reshape(n, k), expected)
    kind = "Q4_K"
    _write_gguf(
        tmp_path / "k.gguf",
        {"blk.0.ffn_down.weight": (blocks, kind), "blk.0.attn_q.weight": (blocks, kind)},
    )
    store = GgufStore(tmp_path / "k.gguf")
    down, q = "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    method, packed, params, _ = store.packed(down)
    assert method == "int4" and params[0].dtype == torch.float32 and params[0].shape == (n, 16)
    assert torch.equal(dequantize_int4(packed, *params), expected)
    q_method, q_packed, q_params, _ = store.packed(q)
    assert torch.equal(dequantize_int4(q_packed, *q_params), expected[unpermute_rows(n, 2)])
    layer = QuantLinear(method, packed, params)
    assert layer.kernels is not None
    for rows in (1, 9):  # one row per packed row, and the register-blocked rows
        x = torch.randn(rows, k, generator=gen)
        assert _relative_error(layer(x), x.double() @ expected.double().T) < 1e-6
    assert torch.equal(layer._dequantized(0, n, x), expected)  # the C++ dequantization


def _q4_k_m_file(smollm_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A Q4_K_M-like GGUF (Q4_K layers, a Q6_K LM head, a float32 embedding) of a tiny Qwen2
    with 256 inputs per layer (K-quants need them), and its dequantized safetensors twin."""
    import gguf

    sizes = {"hidden_size": 256, "intermediate_size": 512}
    tiny = build_tiny_model(tmp_path / "qwen2", smollm_dir, "qwen2", **sizes)
    weights = load_file(str(tiny / "model.safetensors"))
    config = json.loads((tiny / "config.json").read_text())
    path, gen = tmp_path / "k.gguf", torch.Generator().manual_seed(5)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(_theta_scaling(config)[0])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _copy_tokenizer(writer, sentencepiece=False)
    served = {}
    for name, value in sorted(weights.items()):
        target = gguf_name(name, _LLAMA)
        if value.dim() == 2 and "embed" not in name and "lm_head" not in name:
            blocks, served[name] = q4_k_blocks(*value.shape, gen)
            writer.add_tensor(target, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        elif "lm_head" in name:  # Q6_K: random bytes, a small float16 d ending each block
            blocks = torch.randint(0, 256, (value.shape[0], 210), generator=gen, dtype=torch.uint8)
            blocks[:, 208:] = torch.full((value.shape[0], 1), 1e-3).half().view(torch.uint8)
            writer.add_tensor(target, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
            back = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q6_K)
            served[name] = torch.from_numpy(np.array(back)).reshape(value.shape)
        else:
            writer.add_tensor(target, value.float().numpy())
            served[name] = value.float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    twin = tmp_path / "twin"
    shutil.copytree(tiny, twin)
    save_file({k: v.contiguous() for k, v in served.items()}, str(twin / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return path, twin


def test_q4_k_tensors_of_a_gguf_are_served_packed(smollm_dir, tmp_path, monkeypatch):
    """A Q4_K_M-like file serves the tokens of its dequantized twin, its layers packed as
    int4 and its head as int8 in groups of 16."""
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    path, twin = _q4_k_m_file(smollm_dir, tmp_path)
    engine = make_engine(gguf_model_dir(path))
    layer = engine.runner.model.layers[0].qkv
    assert layer.method == "int4" and layer.group_size == 32
    head = engine.runner.model.lm_head.linear
    assert head.method == "int8" and head.group_size == 16 and head.kernels is not None
    _assert_same(_run(engine), _run(make_engine(twin)))


def test_q4_k_and_q6_k_tensors_over_two_shards(smollm_dir, tmp_path, monkeypatch):
    """Each rank cuts its rows, and its columns at group boundaries, from the K-quant
    blocks."""
    from tests.test_tensor_parallel import ShardGroup

    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    path, twin = _q4_k_m_file(smollm_dir, tmp_path)
    group = ShardGroup(gguf_model_dir(path), 2, tmp_path, [])
    try:
        got = group.generate(PROMPTS, 8)
    finally:
        group.stop()
    _assert_same(got, _run(make_engine(twin)))


def test_q6_k_blocks_unpack_to_the_gguf_package_s_weights(tmp_path):
    """Q6_K super-blocks of random bytes (a float16 d set) come back as int8 codes in groups
    of 16 with float32 scales giving exactly the gguf package's dequantized weights; the CPU
    kernel multiplies by them at 1 and 9 rows."""
    import gguf

    from shard.gguf import GgufStore
    from shard.models.quant import QuantLinear, dequantize_int8
    from tests.test_quant import _relative_error, _write_gguf

    gen = torch.Generator().manual_seed(6)
    n, k = 8, 512
    blocks = torch.randint(0, 256, (n, k // 256, 210), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n, k // 256, 1, generator=gen) * 1e-3 + 1e-4).half()
    blocks[..., 208:] = d.view(torch.uint8)
    blocks = blocks.reshape(n, -1).numpy()
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K)
    expected = torch.from_numpy(np.array(expected)).reshape(n, k)
    _write_gguf(tmp_path / "k.gguf", {"blk.0.ffn_down.weight": (blocks, "Q6_K")})
    store = GgufStore(tmp_path / "k.gguf")
    method, q, params, _ = store.packed("model.layers.0.mlp.down_proj.weight")
    assert method == "int8" and q.dtype == torch.int8 and params[0].shape == (n, k // 16)
    assert int(q.min()) >= -32 and int(q.max()) <= 31
    assert torch.equal(dequantize_int8(q, *params), expected)
    layer = QuantLinear(method, q, params)
    assert layer.kernels is not None and layer.group_size == 16
    for rows in (1, 9):
        x = torch.randn(rows, k, generator=gen)
        assert _relative_error(layer(x), x.double() @ expected.double().T) < 1e-6
    assert torch.equal(layer._dequantized(0, n, x), expected)  # the C++ dequantization
