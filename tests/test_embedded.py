"""The default model's conversion is atomic: an interrupted one is never trusted."""

from __future__ import annotations

import pytest

from shard import embedded


def test_real_conversion_is_complete(smollm_dir):
    assert (smollm_dir / embedded.COMPLETE_MARKER).exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm_dir / name).exists()
    assert "quantization_config" not in (smollm_dir / "config.json").read_text()


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
        (dest / embedded.COMPLETE_MARKER).write_text("{}")

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
