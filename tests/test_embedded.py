"""The default model's conversion is atomic: an interrupted one is never trusted."""

from __future__ import annotations

import pytest

from shard import embedded


def test_real_conversion_is_complete(smollm_dir):
    assert (smollm_dir / embedded.COMPLETE_MARKER).exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm_dir / name).exists()
    assert "quantization_config" not in (smollm_dir / "config.json").read_text()


def test_transformers_tokenizer_encodes_like_tokenizer_json(smollm_dir):
    """The saved tokenizer class is the original's byte-level BPE, so transformers (4 and 5)
    encodes exactly as the router's tokenizers.Tokenizer does."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_prefix_space"] is False
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Two  spaces,\ta tab, émigré and 東京?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ours = Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == ours.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


def test_format1_folder_is_upgraded_in_place(tmp_path, monkeypatch):
    """A folder converted before format 2 keeps its weights; only the tokenizer class changes."""
    import json

    target = tmp_path / embedded.MODEL_NAME
    target.mkdir()
    (target / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_prefix_space": None, "x": "é"})
    )
    (target / embedded.COMPLETE_MARKER).write_text(json.dumps({"source": "s.gguf"}))
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("converted again"))
    assert embedded.default_model_dir(tmp_path) == target
    config = json.loads((target / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "x": "é"}
    marker = json.loads((target / embedded.COMPLETE_MARKER).read_text())
    assert marker == {"source": "s.gguf", "format": embedded.FORMAT}


def test_killed_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    """The real conversion, interrupted after the tokenizer: no target, no staging left."""
    import transformers

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        embedded.default_model_dir(tmp_path)
    assert not (tmp_path / embedded.MODEL_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{embedded.MODEL_NAME}.lock"]


def test_incomplete_folder_is_replaced_and_complete_one_reused(tmp_path, monkeypatch):
    target = tmp_path / embedded.MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker: untrusted
    calls = []

    def fake_convert(gguf, dest):
        calls.append(dest)
        dest.mkdir(exist_ok=True)
        embedded._mark_complete(dest, {})

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    monkeypatch.setattr(embedded, "find_gguf", lambda: tmp_path / "x.gguf")
    assert embedded.default_model_dir(tmp_path) == target
    assert embedded.default_model_dir(tmp_path) == target
    assert len(calls) == 1


def test_cache_dir_override_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTGI_CACHE_DIR", str(tmp_path / "env"))
    assert embedded.cache_root() == tmp_path / "env"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("PYTGI_CACHE_DIR")
    assert embedded.cache_root().name == "pytgi"
