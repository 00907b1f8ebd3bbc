"""Shared fixtures: the real embedded model, and tiny random-weight models built in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (once per machine)."""
    from shard.embedded import default_model_dir

    return default_model_dir()


def build_tiny_model(
    target: Path, tokenizer_dir: Path, architecture: str = "llama", **overrides
) -> Path:
    """A random-weight model of the given family with the SmolLM2 tokenizer, as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    settings = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
    )
    settings.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[architecture]
    model = model_cls(config_cls(**settings)).eval()
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm_dir)
