"""GGUF files of the Llama, Qwen2 and Qwen3 architectures, written by the test as llama.cpp's
converter writes them (its tensor names and metadata; Llama's q/k rows interleaved; the
packaged SmolLM2 GGUF's tokenizer fields), served through `--model-id file.gguf`'s
preparation: float32 tensors give the tokens of the safetensors model they came from, Q8_0
ones those of its dequantized twin, packed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shard.embedded import find_gguf, gguf_model_dir
from shard.errors import ModelLoadError
from shard.gguf import _LAYER_NAMES, _TOP_NAMES, ARCHITECTURES, unpermute_rows
from tests.conftest import build_tiny_model
from tests.helpers import make_engine
from tests.test_prequantized import _assert_same, _run

_TO_GGUF = {**{v: k for k, v in _TOP_NAMES.items()}}


def gguf_name(name: str) -> str:
    if name in _TO_GGUF:
        return _TO_GGUF[name]
    parts = name.split(".")  # model.layers.N.<module>.<proj>.<kind>
    module = ".".join(parts[3:-1])
    short = next(k for k, v in _LAYER_NAMES.items() if v == module)
    return f"blk.{parts[2]}.{short}.{parts[-1]}"


def _copy_tokenizer(writer) -> None:
    import gguf

    reader = gguf.GGUFReader(find_gguf())
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_gguf(model_dir: Path, path: Path, kind: str = "F32") -> dict[str, torch.Tensor]:
    """The model as a GGUF file; returns the weights it stands for (Q8_0: dequantized)."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _copy_tokenizer(writer)
    served = {}
    for name, weight in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        data = weight.float()
        if ARCHITECTURES[arch] and name.endswith(("q_proj.weight", "k_proj.weight")):
            count = heads if "q_proj" in name else kv_heads
            stored = torch.empty_like(data)
            stored[unpermute_rows(data.shape[0], count)] = data  # llama.cpp's interleaving
        else:
            stored = data
        if kind == "Q8_0" and data.dim() == 2 and "embed" not in name:
            blocks = gguf.quants.quantize(stored.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
            back = torch.from_numpy(np.array(back)).reshape(data.shape)
            served[name] = back if stored is data else back[unpermute_rows(data.shape[0], count)]
        else:
            writer.add_tensor(gguf_name(name), stored.numpy())
            served[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return served


FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 128},  # transformers reads no head_dim from a GGUF: Qwen3's 128
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_a_gguf_file_serves_the_tokens_of_its_model(arch, smollm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    tiny = build_tiny_model(tmp_path / arch, smollm_dir, arch, **FAMILIES[arch])
    write_gguf(tiny, tmp_path / f"{arch}.gguf")
    served = gguf_model_dir(tmp_path / f"{arch}.gguf")
    config = json.loads((served / "config.json").read_text())
    assert config["model_type"] == arch and not list(served.glob("*.safetensors"))
    _assert_same(_run(make_engine(served)), _run(make_engine(tiny)))


def test_q8_0_tensors_of_a_qwen2_gguf_are_served_packed(smollm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "cache"))
    tiny = build_tiny_model(tmp_path / "qwen2", smollm_dir, "qwen2")
    weights = write_gguf(tiny, tmp_path / "q8.gguf", kind="Q8_0")
    twin = tmp_path / "twin"
    shutil.copytree(tiny, twin)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(twin / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    engine = make_engine(gguf_model_dir(tmp_path / "q8.gguf"))
    layer = engine.runner.model.layers[0].qkv
    assert layer.method == "int8" and layer.group_size == 32  # the file's blocks, packed
    _assert_same(_run(engine), _run(make_engine(twin)))


def test_an_unserved_gguf_architecture_is_refused_by_name(tmp_path):
    import gguf

    from shard.gguf import GgufStore

    writer = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'phi3' is not served"):
        GgufStore(tmp_path / "phi3.gguf")
