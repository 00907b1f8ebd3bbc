"""What a shard port or a shared /tmp would give away: nothing without the secret, no pickle,
no socket name another user can take first."""

from __future__ import annotations

import os

import pytest
import torch

from common import paths
from launcher.config import LauncherConfig, LaunchError
from shard.errors import ModelLoadError
from shard.parallel import URL_BYTES, decode_url


def test_urls_travel_as_bytes_and_only_utf8_comes_back():
    url = "unix:///tmp/pytgi-0/server-3"
    part = torch.zeros(URL_BYTES, dtype=torch.uint8)
    part[: len(url)] = torch.tensor(list(url.encode()), dtype=torch.uint8)
    assert decode_url(part) == url
    bad = torch.full((URL_BYTES,), 0xFF, dtype=torch.uint8)
    with pytest.raises(ModelLoadError, match="not UTF-8"):
        decode_url(bad)


def test_no_pickle_in_the_shards_start_up():
    import inspect

    from shard import cli, parallel

    for module in (cli, parallel):
        source = inspect.getsource(module)
        assert "_object(" not in source and "import pickle" not in source


def test_the_default_socket_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setattr(paths.tempfile, "gettempdir", lambda: str(tmp_path))
    made = paths.private_runtime_dir()
    assert made == tmp_path / f"pytgi-{os.getuid()}"
    assert made.stat().st_mode & 0o777 == 0o700
    assert paths.default_uds_path() == str(made / "server")
    made.chmod(0o755)  # opened to others (or made so by someone else): refused
    with pytest.raises(paths.UnsafeDirectory, match="not a private directory"):
        paths.private_runtime_dir()
    made.rmdir()
    made.symlink_to(tmp_path)  # a link planted in its place: refused
    with pytest.raises(paths.UnsafeDirectory):
        paths.private_runtime_dir()


def test_multi_node_needs_a_secret_or_an_explicit_opt_out():
    base = {"model_id": None, "nnodes": 2, "shard_host": "10.0.0.2"}
    with pytest.raises(LaunchError, match="SHARD_SECRET"):
        LauncherConfig(**base).check_limits()
    LauncherConfig(**base, shard_secret="s").check_limits()
    LauncherConfig(**base, insecure_shard_ports=True).check_limits()
    assert "s3cret" not in repr(LauncherConfig(model_id=None, shard_secret="s3cret"))


def test_the_launcher_gives_each_start_its_own_secret_by_environment(tmp_path):
    from launcher.supervisor import Supervisor

    first = Supervisor(LauncherConfig(model_id=None), tmp_path)
    second = Supervisor(LauncherConfig(model_id=None), tmp_path)
    assert first.secret and second.secret and first.secret != second.secret
    assert first.secret not in " ".join(first._shard_args() + first._router_args())
    assert first._router_env()["PYTGI_SHARD_SECRET"] == first.secret
    given = Supervisor(LauncherConfig(model_id=None, shard_secret="mine"), tmp_path)
    assert given.secret == "mine"
