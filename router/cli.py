"""`pytgi-router`: the HTTP front of pytgi, driving the shards over gRPC."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading

import click
import uvicorn

from common.config import RouterConfig, defaults
from common.lifetime import die_with_parent
from common.logs import setup_logging
from common.paths import UnsafeDirectory, default_uds_path
from common.rpc import SECRET_ENV
from common.tracing import setup_tracing
from router.app import create_app, create_metrics_app
from router.startup import StartupError, build_state, exposure_warning

log = logging.getLogger("router")
ROUTER_DEFAULTS = defaults(RouterConfig)


def run_loop(main):
    """Runs `main` on uvloop's event loop where uvloop is installed (with httptools, which
    uvicorn then picks, the router spends about a fifth less CPU per streamed token:
    benchmarks/router_throughput.py), on asyncio's own loop otherwise; returns its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(config: RouterConfig) -> None:
    state = await build_state(config)
    app = create_app(state)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.hostname,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=int(config.graceful_termination_timeout),
            limit_concurrency=config.connection_limit,
        )
    )
    loop_task = asyncio.ensure_future(state.scheduler.run())
    original_exit = server.handle_exit
    loop = asyncio.get_running_loop()

    async def drain_then_exit() -> None:
        """New requests get 503 while running ones finish (up to the timeout); then exit."""
        deadline = loop.time() + config.graceful_termination_timeout
        while state.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained (%d requests still running); stopping", state.in_flight)
        server.should_exit = True

    def on_exit(sig, frame):
        if state.is_draining:  # a second signal: stop now
            original_exit(sig, frame)
            return
        log.info("signal received: refusing new requests, finishing running ones")
        state.is_draining = True
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain_then_exit()))

    server.handle_exit = on_exit  # type: ignore[method-assign]
    metrics_server = start_metrics_server(state, config) if config.prometheus_port else None
    log.info("router listening on http://%s:%d", config.hostname, config.port)
    warning = exposure_warning(config.hostname, config.api_key)
    if warning:
        log.warning(warning)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's own exit when it cannot bind: ours below says what to do
        if server.started:
            raise
    finally:
        loop_task.cancel()
        if metrics_server is not None:
            metrics_server.should_exit = True
    if not server.started:
        raise StartupError(
            f"cannot listen on {config.hostname}:{config.port} (is the port in use?)"
        )


def start_metrics_server(state, config: RouterConfig) -> uvicorn.Server:
    """/metrics alone on --prometheus-port, served from a thread of its own (uvicorn takes
    signals only in the main thread, where the API server drains on SIGTERM). The socket is
    bound here, so a port in use fails the start at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.hostname else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.hostname.strip("[]"), config.prometheus_port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {config.hostname}:{config.prometheus_port} for "
            f"--prometheus-port: {exc.strerror}"
        ) from exc
    server = uvicorn.Server(
        uvicorn.Config(create_metrics_app(state.metrics), log_level="warning", lifespan="off")
    )
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", config.hostname, config.prometheus_port)
    return server


@click.command(context_settings={"show_default": True})
@click.option(
    "--master-shard-uds-path",
    default=None,
    help="Socket prefix of shard 0 (…-0) [default: {tmp}/pytgi-{uid}/server, the shard's].",
)
@click.option(
    "--shard-secret",
    envvar=SECRET_ENV,
    default=None,
    help=f"Secret sent on every shard call [env {SECRET_ENV}; prefer it: arguments are "
    "visible to other users].",
)
@click.option("--tokenizer-name", required=True, help="Model directory holding tokenizer.json.")
@click.option(
    "--model-id",
    default=ROUTER_DEFAULTS["model_id"],
    help="Name shown in /info and /v1/models [default: the directory name].",
)
@click.option("--hostname", default=ROUTER_DEFAULTS["hostname"], help="Address to listen on.")
@click.option("--port", type=int, default=ROUTER_DEFAULTS["port"], help="Port to listen on.")
@click.option(
    "--prometheus-port",
    type=int,
    default=ROUTER_DEFAULTS["prometheus_port"],
    help="Also serve /metrics (alone) on this port, as TGI does on 9000 [default: off].",
)
@click.option(
    "--max-concurrent-requests",
    type=int,
    default=ROUTER_DEFAULTS["max_concurrent_requests"],
    help="Requests in flight before 429.",
)
@click.option(
    "--max-best-of",
    type=int,
    default=ROUTER_DEFAULTS["max_best_of"],
    help="Largest best_of accepted.",
)
@click.option(
    "--max-stop-sequences",
    type=int,
    default=ROUTER_DEFAULTS["max_stop_sequences"],
    help="Most stop sequences per request.",
)
@click.option(
    "--max-top-n-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_top_n_tokens"],
    help="Largest top_n_tokens accepted.",
)
@click.option(
    "--max-input-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_input_tokens"],
    help="Longest prompt [default: from the shards].",
)
@click.option(
    "--max-total-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_total_tokens"],
    help="Longest prompt + output [default: from the shards].",
)
@click.option(
    "--waiting-served-ratio",
    type=float,
    default=ROUTER_DEFAULTS["waiting_served_ratio"],
    help="Without chunking: waiting/running ratio that triggers a prefill.",
)
@click.option(
    "--max-batch-prefill-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_batch_prefill_tokens"],
    help="Prompt tokens per forward [default: 2048].",
)
@click.option(
    "--max-batch-total-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_batch_total_tokens"],
    help="KV tokens of the running batch [default: the capacity Warmup finds].",
)
@click.option(
    "--max-waiting-tokens",
    type=int,
    default=ROUTER_DEFAULTS["max_waiting_tokens"],
    help="Without chunking: decode steps before waiting requests are forced in.",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=ROUTER_DEFAULTS["max_batch_size"],
    help="Most requests per batch [default: no limit].",
)
@click.option(
    "--max-client-batch-size",
    type=int,
    default=ROUTER_DEFAULTS["max_client_batch_size"],
    help="Most prompts in one /v1/completions request.",
)
@click.option(
    "--validation-workers",
    type=click.IntRange(min=1),
    default=ROUTER_DEFAULTS["validation_workers"],
    help="Threads that tokenize prompts and render chat templates.",
)
@click.option(
    "--disable-grammar-support",
    is_flag=True,
    default=ROUTER_DEFAULTS["disable_grammar_support"],
    help="Refuse requests with a grammar, response_format or tools (422), as TGI's flag.",
)
@click.option(
    "--api-key",
    default=ROUTER_DEFAULTS["api_key"],
    envvar="API_KEY",
    help="Bearer token required on generation routes.",
)
@click.option("--cors-allow-origin", multiple=True, help="Allowed CORS origin (repeatable).")
@click.option(
    "--payload-limit",
    type=int,
    default=ROUTER_DEFAULTS["payload_limit"],
    help="Largest request body in bytes (413 past it).",
)
@click.option(
    "--graceful-termination-timeout",
    type=float,
    default=ROUTER_DEFAULTS["graceful_termination_timeout"],
    help="Seconds running requests get after SIGTERM.",
)
@click.option(
    "--prefix-caching/--no-prefix-caching",
    default=ROUTER_DEFAULTS["prefix_caching"],
    help="Reuse the K/V of cached prompt prefixes (when the shards support it).",
)
@click.option(
    "--shard-tls-ca-file",
    default=ROUTER_DEFAULTS["shard_tls_ca_file"],
    help="PEM certificate(s) that TCP shards' TLS certificates must chain to (multi-node).",
)
@click.option(
    "--client-timeout",
    type=float,
    default=ROUTER_DEFAULTS["client_timeout"],
    help="Seconds a request body may take to arrive, and a client may leave a reply unread.",
)
@click.option(
    "--max-connections",
    type=int,
    default=ROUTER_DEFAULTS["max_connections"],
    help="Open HTTP connections before 503 [default: 4 x --max-concurrent-requests + 64].",
)
@click.option(
    "--otlp-endpoint",
    default=ROUTER_DEFAULTS["otlp_endpoint"],
    help="OTLP gRPC collector (e.g. http://127.0.0.1:4317) for traces [default: none].",
)
@click.option(
    "--otlp-service-name",
    default=ROUTER_DEFAULTS["otlp_service_name"],
    help="Service name of the router's spans.",
)
@click.option("--json-output", is_flag=True, help="Log JSON lines.")
def main(cors_allow_origin: tuple[str, ...], **options) -> None:
    """Serve TGI's and OpenAI's HTTP APIs over the shards at --master-shard-uds-path."""
    die_with_parent()
    setup_logging("router", options["json_output"])
    try:
        options["master_shard_uds_path"] = options["master_shard_uds_path"] or default_uds_path()
        config = RouterConfig(cors_allow_origin=tuple(cors_allow_origin), **options)
        setup_tracing(config.otlp_service_name, config.otlp_endpoint)
        run_loop(serve(config))
    except (StartupError, UnsafeDirectory) as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
