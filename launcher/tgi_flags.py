"""TGI's launcher flags that pytgi does not take, read before pytgi's own parser runs.

A TGI deployment brings its flags and environment (`QUANTIZE=awq`, `REVISION=...`). Ignored,
such a setting would silently change what the user planned (an ignored QUANTIZE loads the
model at several times the memory), so each one set, as a flag or as its environment
variable, stops the start with one message naming all of them. A few have nothing to stop:
what they ask for is already how pytgi behaves; those are logged. `--max-input-length` is
TGI's deprecated spelling of `--max-input-tokens`, taken as such; TGI's attention names map
to `auto`; `--version` and `-e/--env` answer as TGI's do.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata

import click

VERSION = "0.1.0"

# flag -> what to do instead (each flag takes a value unless listed in _SWITCHES)
UNSUPPORTED = {
    "--sharded": "use --num-shard",
    "--speculate": "speculative decoding is not supported",
    "--trust-remote-code": "pytgi runs only its own model code",
    "--weights-cache-override": "pass the weights' directory as --model-id",
    "--rope-scaling": "the model's config.json rope_scaling is used",
    "--rope-factor": "the model's config.json rope_scaling is used",
    "--watermark-gamma": "watermarking is not supported",
    "--watermark-delta": "watermarking is not supported",
    "--ngrok": "ngrok tunnels are not supported",
    "--ngrok-authtoken": "ngrok tunnels are not supported",
    "--ngrok-edge": "ngrok tunnels are not supported",
    "--tokenizer-config-path": "the model directory's tokenizer_config.json is used",
    "--lora-adapters": "LoRA adapters are not supported",
}
# TGI's --quantize values: accepted by the parser, then refused with what pytgi has instead
TGI_QUANTIZE = ("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8")  # fmt: skip
_SWITCHES = {"--trust-remote-code", "--ngrok"}
# flag -> why setting it changes nothing (a switch, or a value that is already the case)
ALREADY = {
    "--enable-prefill-logprobs": "prefill log-probabilities (decoder_input_details) are on",
    "--usage-stats": "pytgi sends no usage statistics",
}
_ALREADY_SWITCHES = {"--enable-prefill-logprobs"}
ATTENTION_NAMES = {"paged": "auto", "flashdecoding": "auto", "flashinfer": "auto"}
_FALSE = {"", "0", "false", "no", "off"}


def envvar(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def _flag_of(arg: str) -> str:
    return arg.split("=", 1)[0]


def _set_in_env(flag: str, environ: Mapping[str, str]) -> bool:
    value = environ.get(envvar(flag))
    if value is None:
        return False
    is_switch = flag in _SWITCHES or flag in _ALREADY_SWITCHES
    return value.strip().lower() not in _FALSE if is_switch else True


def unsupported(args: list[str], environ: Mapping[str, str]) -> list[str]:
    """One line per unsupported TGI flag set on the command line or in the environment."""
    given = {_flag_of(a) for a in args}
    return [
        f"{flag} ({envvar(flag)}): {why}"
        for flag, why in UNSUPPORTED.items()
        if flag in given or _set_in_env(flag, environ)
    ]


def _drop(args: list[str], flag: str, takes_value: bool) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = takes_value
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def translate(args: list[str], environ: Mapping[str, str], log) -> list[str]:
    """TGI spellings pytgi takes -> pytgi's own arguments, each logged."""
    for flag, why in ALREADY.items():
        if flag in {_flag_of(a) for a in args} or _set_in_env(flag, environ):
            log(f"{flag} ({envvar(flag)}) changes nothing: {why}")
            args = _drop(args, flag, flag not in _ALREADY_SWITCHES)
    args = _input_length_alias(args, environ, log)
    return _attention_names(args, environ, log)


def _input_length_alias(args: list[str], environ: Mapping[str, str], log) -> list[str]:
    flags = {_flag_of(a) for a in args}
    out = [a.replace("--max-input-length", "--max-input-tokens", 1)
           if _flag_of(a) == "--max-input-length" else a for a in args]  # fmt: skip
    if "--max-input-length" in flags:
        if "--max-input-tokens" in flags:
            raise click.UsageError("give --max-input-tokens or --max-input-length, not both")
        log("--max-input-length is TGI's deprecated name of --max-input-tokens")
    elif "MAX_INPUT_LENGTH" in environ and "--max-input-tokens" not in flags:
        if "MAX_INPUT_TOKENS" in environ:
            raise click.UsageError("set MAX_INPUT_TOKENS or MAX_INPUT_LENGTH, not both")
        log("MAX_INPUT_LENGTH is TGI's deprecated name of MAX_INPUT_TOKENS")
        out += ["--max-input-tokens", environ["MAX_INPUT_LENGTH"]]
    return out


def _attention_names(args: list[str], environ: Mapping[str, str], log) -> list[str]:
    out = list(args)
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[1] if arg.startswith("--attention=") else None
        if arg == "--attention" and i + 1 < len(args):
            name = args[i + 1]
        if name in ATTENTION_NAMES:
            log(f"--attention {name} is TGI's; pytgi picks {ATTENTION_NAMES[name]}")
            out = _drop(out, "--attention", True) + ["--attention", ATTENTION_NAMES[name]]
            return out
    name = environ.get("ATTENTION")
    if name in ATTENTION_NAMES and "--attention" not in {_flag_of(a) for a in args}:
        log(f"ATTENTION={name} is TGI's; pytgi picks {ATTENTION_NAMES[name]}")
        out += ["--attention", ATTENTION_NAMES[name]]
    return out


def environment_report() -> str:
    """What TGI's `--env` prints, from package metadata (nothing imported)."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [
        f"pytgi version: {VERSION}",
        f"Python version: {sys.version.split()[0]}",
        f"Platform: {platform.platform()} ({platform.machine()})",
        f"CPU count: {os.cpu_count()}",
    ] + [
        f"{package} version: {version(package)}"
        for package in ("torch", "transformers", "tokenizers", "grpcio", "triton", "flash-attn")
    ]
    return "\n".join(lines)


class TgiCompatibleCommand(click.Command):
    """pytgi-launcher's command: TGI's flags are sorted out before click parses the rest."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--version" in args:
            click.echo(f"pytgi-launcher {VERSION}")
            ctx.exit(0)
        problems = unsupported(args, os.environ)
        if problems:
            raise click.UsageError(
                "TGI options that pytgi does not support yet (unset them to start):\n  "
                + "\n  ".join(problems)
            )
        if "-e" in args or "--env" in args:
            click.echo(environment_report())
            args = [a for a in args if a not in ("-e", "--env")]
        args = translate(args, os.environ, lambda line: click.echo(f"note: {line}", err=True))
        return super().parse_args(ctx, args)
