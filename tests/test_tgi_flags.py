"""TGI's launcher flags and environment variables that pytgi does not take stop the start
with one clear message; the ones that are already how pytgi behaves are logged; TGI's
aliases and names (--max-input-length, ATTENTION=paged, -p, -g, --version, -e) work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.tgi_flags import UNSUPPORTED, envvar, translate, unsupported

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


def _value(flag: str) -> list[str]:
    from launcher.tgi_flags import _SWITCHES

    return [flag] if flag in _SWITCHES else [flag, "x"]


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED))
def test_each_unsupported_flag_stops_the_start_as_flag_and_as_env(flag):
    for args, env in ((_value(flag), {}), ([], {envvar(flag): "1"})):
        result = _run(args, env)
        assert result.exit_code == 2, (flag, result.output)
        assert f"{flag} ({envvar(flag)}): {UNSUPPORTED[flag]}" in result.output
        assert "not support" in result.output


def test_all_unsupported_settings_are_named_at_once():
    result = _run(["--lora-adapters", "a", "--rope-factor=2"], {"SPECULATE": "2"})
    assert result.exit_code == 2
    for flag in ("--lora-adapters", "--rope-factor", "--speculate"):
        assert f"{flag} ({envvar(flag)})" in result.output


def test_switches_set_false_in_the_environment_are_not_set():
    assert unsupported([], {"TRUST_REMOTE_CODE": "false", "NGROK": "0"}) == []
    assert unsupported([], {"TRUST_REMOTE_CODE": "true"}) != []
    assert unsupported(["--model-id", "m"], {"QUANTIZE_SOMETHING": "x"}) == []


def test_settings_that_change_nothing_are_logged_and_dropped():
    notes: list[str] = []
    args = translate(["--usage-stats", "off", "--port", "1"],
                     {"ENABLE_PREFILL_LOGPROBS": "true"}, notes.append)  # fmt: skip
    assert args == ["--port", "1"]
    assert len(notes) == 2 and all("changes nothing" in n for n in notes)


def test_max_input_length_is_the_alias_of_max_input_tokens():
    notes: list[str] = []
    assert translate(["--max-input-length", "7"], {}, notes.append) == ["--max-input-tokens", "7"]
    assert translate(["--max-input-length=7"], {}, notes.append) == ["--max-input-tokens=7"]
    assert translate([], {"MAX_INPUT_LENGTH": "9"}, notes.append) == ["--max-input-tokens", "9"]
    assert all("deprecated" in n for n in notes)
    with pytest.raises(Exception, match="not both"):
        translate(["--max-input-length", "7", "--max-input-tokens", "8"], {}, notes.append)
    with pytest.raises(Exception, match="not both"):
        translate([], {"MAX_INPUT_LENGTH": "9", "MAX_INPUT_TOKENS": "9"}, notes.append)
    # the alias reaches the launcher's own limit check, which names pytgi's flag
    result = _run(["--max-input-length", "10", "--max-total-tokens", "5"])
    assert result.exit_code == 1 and "--max-input-tokens (10)" in result.output


@pytest.mark.parametrize("name", ["paged", "flashdecoding", "flashinfer"])
def test_tgi_attention_names_map_to_auto(name):
    notes: list[str] = []
    assert translate(["--attention", name], {}, notes.append) == ["--attention", "auto"]
    assert translate([], {"ATTENTION": name}, notes.append) == ["--attention", "auto"]
    assert len(notes) == 2 and name in notes[0]
    assert translate(["--attention", "sdpa"], {"ATTENTION": name}, notes.append) == [
        "--attention",
        "sdpa",
    ]


def test_version_env_report_and_short_forms():
    version = _run(["--version"])
    assert version.exit_code == 0 and version.output.strip() == "pytgi-launcher 0.1.0"
    names = {p.name: p.opts for p in main.params}
    assert "-p" in names["port"] and "-g" in names["graceful_termination_timeout"]
    report = _run(["-e", "--max-input-tokens", "10", "--max-total-tokens", "5"])
    assert "Python version:" in report.output and "torch version:" in report.output
    assert report.exit_code == 1  # -e reports, then the start goes on (here to its limit check)


def test_a_real_launcher_process_refuses_quantize_from_its_environment():
    """QUANTIZE=bitsandbytes (a TGI deployment's environment) stops the start by name, before
    any process starts: an ignored QUANTIZE would load the model at several times the memory."""
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli"],
        env={"PATH": "/usr/bin:/bin", "QUANTIZE": "bitsandbytes"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--quantize bitsandbytes is not supported yet; supported: int8, int4" in result.stderr
