"""Router start-up: discover and prepare the shards, then build the application state."""

from __future__ import annotations

import logging
from pathlib import Path

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer

from common.allocator import BlockAllocator
from common.config import RouterConfig
from router.chat import ChatTemplate, load_template
from router.client import ShardedClient
from router.core import RouterState, ServerSettings
from router.metrics import Metrics
from router.scheduler import BatchingConfig, Scheduler
from router.types import ShardInfo
from router.validation import Limits, Validator

log = logging.getLogger("router")
DEFAULT_PREFILL_TOKENS = 2048
SHARD_WAIT_SECONDS = 300.0


class StartupError(Exception):
    """A configuration or shard problem that stops the router, said in one paragraph."""


def _special_tokens(tokenizer_dir: Path) -> dict[str, str | None]:
    import json

    config = tokenizer_dir / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.exists() else {}

    def text(value):
        return value.get("content") if isinstance(value, dict) else value

    return {"bos_token": text(data.get("bos_token")), "eos_token": text(data.get("eos_token"))}


def load_tokenizer(name: str) -> tuple[Tokenizer, ChatTemplate | None]:
    directory = Path(name)
    path = directory / "tokenizer.json"
    if not path.exists():
        raise StartupError(f"--tokenizer-name {name}: no tokenizer.json there")
    source = load_template(directory)
    try:
        template = ChatTemplate(source, _special_tokens(directory)) if source else None
    except TemplateError as exc:
        line = getattr(exc, "lineno", "?")
        message = f"the chat template of {name} does not compile: {exc} (line {line})"
        raise StartupError(message) from None
    return Tokenizer.from_file(str(path)), template


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def allowed_hosts(hostname: str, api_key: str | None) -> tuple[str, ...]:
    """Host names a server answers to. A loopback server without an API key trusts anything
    that can reach it, which a web page can through DNS rebinding unless the Host header is
    checked; elsewhere the operator's names are unknown, and any is answered."""
    if api_key is None and hostname in LOOPBACK_NAMES:
        return LOOPBACK_NAMES
    return ()


def exposure_warning(hostname: str, api_key: str | None) -> str | None:
    """The start-up warning of a server that answers beyond this machine with no API key."""
    if api_key is not None or hostname in LOOPBACK_NAMES:
        return None
    return (
        f"listening on {hostname} without --api-key: anyone who can reach this port can "
        "generate (set --api-key, or --hostname 127.0.0.1 to answer this machine only)"
    )


def _check_limits(config: RouterConfig, prefill_tokens: int, chunking: bool) -> None:
    if config.max_input_tokens is not None and config.max_total_tokens is not None:
        if config.max_input_tokens >= config.max_total_tokens:
            raise StartupError(
                f"--max-input-tokens ({config.max_input_tokens}) must be < --max-total-tokens "
                f"({config.max_total_tokens})"
            )
    if (
        config.max_input_tokens is not None
        and not chunking
        and prefill_tokens < config.max_input_tokens
    ):
        raise StartupError(
            f"--max-batch-prefill-tokens ({prefill_tokens}) must be >= --max-input-tokens "
            f"({config.max_input_tokens}) when the shards cannot chunk prompts"
        )


async def _info_after_warmup(client: ShardedClient) -> ShardInfo:
    """Info again: the KV pool and device memory are known only after Warmup."""
    try:
        return await client.info()
    except Exception as exc:  # noqa: BLE001
        raise StartupError(f"Info after Warmup failed: {exc}") from exc


def server_settings(config: RouterConfig) -> ServerSettings:
    """The HTTP layer's part of the router's config."""
    return ServerSettings(
        model_id=config.model_id or Path(config.tokenizer_name).name,
        max_concurrent_requests=config.max_concurrent_requests,
        max_client_batch_size=config.max_client_batch_size,
        api_key=config.api_key,
        cors_allow_origin=config.cors_allow_origin,
        payload_limit=config.payload_limit,
        allowed_hosts=allowed_hosts(config.hostname, config.api_key),
        client_timeout=config.client_timeout,
    )


async def build_state(config: RouterConfig) -> RouterState:
    """ServiceDiscovery, ClearCache, Info, Warmup; Warmup's capacity sets the KV budget."""
    tokenizer, template = load_tokenizer(config.tokenizer_name)
    try:
        tls_ca = Path(config.shard_tls_ca_file).read_bytes() if config.shard_tls_ca_file else None
        client = await ShardedClient.connect(config.master_url, config.shard_secret, tls_ca)
        await client.wait_until_healthy(SHARD_WAIT_SECONDS)  # ranks on other nodes may lag
        await client.clear_cache(None)
        info = await client.info()
    except Exception as exc:  # noqa: BLE001
        raise StartupError(f"cannot reach the shards at {config.master_url}: {exc}") from exc
    prefill_tokens = config.max_batch_prefill_tokens or DEFAULT_PREFILL_TOKENS
    _check_limits(config, prefill_tokens, info.support_chunking)
    try:
        warm = await client.warmup(config.max_input_tokens, prefill_tokens, config.max_total_tokens)
    except Exception as exc:  # noqa: BLE001
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise StartupError(f"Warmup failed: {details}") from exc
    info = await _info_after_warmup(client)
    if not info.support_chunking and prefill_tokens < warm.max_input_tokens:
        prefill_tokens = warm.max_input_tokens
    total_budget = config.max_batch_total_tokens or warm.max_supported_total_tokens
    if total_budget > warm.max_supported_total_tokens:
        raise StartupError(
            f"--max-batch-total-tokens ({total_budget}) exceeds the KV capacity of "
            f"{warm.max_supported_total_tokens} tokens found at Warmup"
        )
    num_blocks = warm.max_supported_total_tokens // info.block_size
    log.info(
        "shards: %d, dtype %s on %s, KV capacity %d tokens (%d blocks of %d)",
        len(client.urls),
        info.dtype,
        info.device_type,
        warm.max_supported_total_tokens,
        num_blocks,
        info.block_size,
    )
    metrics = Metrics()
    scheduler = Scheduler(
        client,
        BlockAllocator(
            num_blocks, info.block_size, config.prefix_caching and info.use_prefix_caching
        ),
        BatchingConfig(
            max_batch_prefill_tokens=prefill_tokens,
            max_batch_total_tokens=total_budget,
            waiting_served_ratio=config.waiting_served_ratio,
            max_waiting_tokens=config.max_waiting_tokens,
            max_batch_size=config.max_batch_size,
            support_chunking=info.support_chunking,
        ),
        metrics,
    )
    metrics.on_blocks(num_blocks, 0)
    metrics.on_shard_info(info)
    metrics.batch_max_total_tokens.set(total_budget)
    limits = Limits(
        max_input_tokens=warm.max_input_tokens,
        max_total_tokens=warm.max_total_tokens,
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        max_top_n_tokens=config.max_top_n_tokens,
        grammar_support=not config.disable_grammar_support,
    )
    return RouterState(
        settings=server_settings(config),
        validator=Validator(tokenizer, limits, config.validation_workers),
        scheduler=scheduler,
        metrics=metrics,
        shard_info=info,
        warmup=warm,
        chat_template=template,
        num_shards=len(client.urls),
    )
