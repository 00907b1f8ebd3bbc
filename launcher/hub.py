"""Models from the Hugging Face Hub, fetched once by the launcher before any shard starts.

`--model-id` names a local directory, or else a Hub repository: what serving needs
(config, safetensors weights and their index, tokenizer and generation files) is downloaded
with huggingface_hub into its cache (`--huggingface-hub-cache`, else HUGGINGFACE_HUB_CACHE /
HF_HOME as huggingface_hub reads them), at `--revision`, with `HF_TOKEN` (or the older
`HUGGING_FACE_HUB_TOKEN`); `HF_HUB_OFFLINE=1` serves from that cache without a network call.
The shards read the snapshot's local path. A repository with only PyTorch pickles is
converted once to safetensors beside them, in a child process (torch loads them with
`weights_only=True`, so no pickled code runs; the launcher itself never imports torch).
Every failure is one line naming the repository and what to do.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from launcher.config import LaunchError

log = logging.getLogger("launcher")

SERVING_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
PICKLES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_local(model_id: str) -> bool:
    """A path (absolute, relative with a dot, or home) rather than a Hub repository id."""
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def fetch(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local snapshot of `model_id` at `revision` with safetensors weights."""
    path = _snapshot(model_id, revision, cache_dir, SERVING_FILES + SAFETENSORS)
    if any(path.glob("*.safetensors")):
        return path
    path = _snapshot(model_id, revision, cache_dir, SERVING_FILES + PICKLES)
    if not any(path.glob("pytorch_model*.bin")):
        raise LaunchError(
            f"{model_id} has neither *.safetensors nor pytorch_model*.bin weights to serve"
        )
    _convert_pickles(path)
    return path


def _snapshot(model_id: str, revision: str | None, cache_dir: str | None, patterns) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    log.info("fetching %s%s from the Hub", model_id, f" at {revision}" if revision else "")
    try:
        return Path(
            snapshot_download(
                model_id,
                revision=revision,
                cache_dir=cache_dir,
                token=token(),
                allow_patterns=patterns,
            )
        )
    except GatedRepoError as exc:  # before RepositoryNotFoundError: it is one
        raise LaunchError(
            f"{model_id} is gated: accept its terms on its Hub page, then set HF_TOKEN to a "
            "token of that account"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise LaunchError(
            f"{model_id} was not found on the Hub (a private repository needs HF_TOKEN; a "
            "local directory must exist)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise LaunchError(
            f"{model_id} has no revision {revision!r}: name a branch, tag or commit it has"
        ) from exc
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise LaunchError(
            f"{model_id} is not in the Hub cache and {why}: download it where the Hub is "
            "reachable (same cache), or pass a local directory as --model-id"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise LaunchError(f"the Hub answered {status} for {model_id}: {exc}") from exc
    except OSError as exc:
        raise LaunchError(f"{model_id} could not be fetched from the Hub: {exc}") from exc


def _convert_pickles(model_dir: Path) -> None:
    """`pytgi-shard convert-pickles` in a child (the launcher never imports torch)."""
    log.warning(
        "%s has only PyTorch pickle weights: converting them once to safetensors beside them "
        "(loaded with weights_only=True)",
        model_dir,
    )
    result = subprocess.run(
        [sys.executable, "-m", "shard.cli", "convert-pickles", str(model_dir)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise LaunchError(f"the pickle weights of {model_dir} cannot be converted: {lines[-1]}")
