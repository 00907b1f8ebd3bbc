"""Models from the Hub: fetched through a loopback Hub (HF_ENDPOINT), served offline from
the cache it filled, pickle-only repositories converted, and each failure one clear line.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported, so each fetch runs in a
fresh process, as the launcher's does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file

from shard.pickles import convert_pickles
from tests.conftest import LauncherServer, build_tiny_model
from tests.fake_hub import COMMIT, FakeHub
from tests.helpers import make_engine, run_to_end, spec
from tests.test_families import CASES

REPO = "pytgi-test/tiny"


def fetch(env: dict, model_id: str = REPO, revision: str | None = None):
    code = (
        "import sys; from launcher.hub import fetch; from launcher.config import LaunchError\n"
        "try: print(fetch(sys.argv[1], sys.argv[2] or None))\n"
        "except LaunchError as e: sys.exit(f'LaunchError: {e}')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, model_id, revision or ""],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.fixture
def repos(tiny_model_dir, tmp_path):
    """The tiny model as a Hub repository (plus a file serving does not need), and the same
    weights as a pickle-only repository."""
    plain = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "README.md").write_text("not needed to serve")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(plain / "model.safetensors")), pickled / "pytorch_model.bin")
    return {REPO: plain, "pytgi-test/pickled": pickled, "pytgi-test/gated": plain}


@pytest.fixture
def hub(repos):
    server = FakeHub(repos, gated=("pytgi-test/gated",))
    yield server
    server.stop()


def test_a_hub_model_is_fetched_once_then_served_from_the_cache_offline(hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    first = fetch(env)
    assert first.returncode == 0, first.stderr
    snapshot = first.stdout.strip().splitlines()[-1]
    assert snapshot.endswith(f"snapshots/{COMMIT}")
    names = set(os.listdir(snapshot))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "README.md" not in names  # only what serving needs
    hub.stop()
    hub.requests.clear()
    offline = fetch({**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip().splitlines()[-1] == snapshot and hub.requests == []


@pytest.mark.parametrize(
    "model_id, revision, env, message",
    [
        ("pytgi-test/nope", None, {}, "pytgi-test/nope was not found on the Hub"),
        ("pytgi-test/gated", None, {}, "pytgi-test/gated is gated: accept its terms"),
        (REPO, "v9", {}, "has no revision 'v9'"),
        (REPO, None, {"HF_HUB_OFFLINE": "1"}, "not in the Hub cache and HF_HUB_OFFLINE is set"),
        (REPO, None, {"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub cannot be reached"),
    ],
)
def test_hub_failures_are_one_line_naming_the_repo(hub, tmp_path, model_id, revision, env, message):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), **env}
    result = fetch(env, model_id, revision)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("LaunchError: ") and message in line and model_id in line


def test_a_pickle_only_repo_is_converted_once_and_gives_the_same_tokens(
    hub, tmp_path, tiny_model_dir
):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = fetch(env, "pytgi-test/pickled")
    assert result.returncode == 0, result.stderr
    snapshot = result.stdout.strip().splitlines()[-1]
    assert "pytorch_model.bin" in os.listdir(snapshot) and "model.safetensors" in os.listdir(
        snapshot
    )
    assert "converting them once to safetensors" in result.stderr
    requests = [{"text": "The quick brown fox", "n": 6}, {"text": "Hello there", "n": 4}]

    def tokens(model_dir):
        engine = make_engine(model_dir)
        specs = [spec(i, r["text"], r["n"], ignore_eos=True) for i, r in enumerate(requests)]
        return run_to_end(engine, 1, specs).tokens

    assert tokens(snapshot) == tokens(tiny_model_dir)
    again = fetch(env, "pytgi-test/pickled")  # cached safetensors now: no second conversion
    assert again.returncode == 0 and "converting" not in again.stderr


def test_sharded_pickles_and_their_index_are_converted(tmp_path):
    weights = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    tied = {"c": weights["a"]}  # shares storage with a: written as its own copy
    torch.save({"a": weights["a"], **tied}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": weights["b"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"a": "pytorch_model-00001-of-00002.bin", "c": "pytorch_model-00001-of-00002.bin",
             "b": "pytorch_model-00002-of-00002.bin"}  # fmt: skip
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index}))
    written = {p.name for p in convert_pickles(tmp_path)}
    assert written == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    }
    new_index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"]["b"] == "model-00002-of-00002.safetensors"
    first = load_file(str(tmp_path / "model-00001-of-00002.safetensors"))
    assert torch.equal(first["a"], weights["a"]) and torch.equal(first["c"], weights["a"])


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Payload()}, tmp_path / "pytorch_model.bin")
    result = subprocess.run(
        [sys.executable, "-m", "shard.cli", "convert-pickles", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "pwned" not in result.stdout
    assert "cannot be loaded as plain tensors" in result.stderr


@pytest.mark.slow
def test_the_launcher_serves_a_hub_model_then_serves_it_offline(smollm_dir, tmp_path, monkeypatch):
    """A Gemma 2 model (soft-capping, sliding layers) from the Hub, through the launcher, by
    TGI's API and the OpenAI client; then again offline from the cache, the same tokens."""
    import openai

    model_type, overrides = CASES["gemma2"]
    gemma = build_tiny_model(tmp_path / "gemma2", smollm_dir, model_type, **overrides)
    hub = FakeHub({"pytgi-test/gemma2": gemma})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    args = ["--model-id", "pytgi-test/gemma2", "--max-total-tokens", "512",
            "--max-input-tokens", "256"]  # fmt: skip
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 5}}
    texts = []
    for offline in (False, True):
        if offline:
            hub.stop()
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        server = LauncherServer(tmp_path, args)
        try:
            assert httpx.get(server.url + "/info").json()["model_id"] == "pytgi-test/gemma2"
            reply = httpx.post(server.url + "/generate", json=body, timeout=60)
            assert reply.status_code == 200
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
            chat = client.completions.create(
                model="pytgi-test/gemma2", prompt="The quick brown fox", max_tokens=5, temperature=0
            )
            texts.append((reply.json()["generated_text"], chat.choices[0].text))
        finally:
            server.stop()
    assert texts[0] == texts[1] and texts[0][0] == texts[0][1]
