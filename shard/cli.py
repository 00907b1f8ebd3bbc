"""`pytgi-shard`: serve one rank of a model over gRPC on a Unix socket."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from common.config import (
    DEFAULT_GRAPH_SIZES,
    ShardConfig,
    defaults,
    parse_batch_sizes,
    parse_size,
)
from common.lifetime import die_with_parent
from common.logs import setup_logging
from common.paths import UnsafeDirectory, default_uds_path
from common.rpc import SECRET_ENV
from common.tracing import setup_tracing
from shard.errors import ShardError

SHARD_DEFAULTS = defaults(ShardConfig)


@click.group()
def main() -> None:
    """pytgi shard: the model half of the server (TGI's v3 shard protocol)."""


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option(
    "--uds-path",
    default=None,
    help="Socket path prefix; this rank listens on unix://{uds-path}-{rank} "
    "[default: {tmp}/pytgi-{uid}/server, a directory only this user can enter].",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=SHARD_DEFAULTS["dtype"],
    help="Weights and KV cache dtype [default: float32 on CPU, bfloat16 on CUDA].",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (this rank's GPU when CUDA is there, else cpu), cpu, cuda or cuda:N.",
)
@click.option(
    "--rank",
    type=int,
    default=0,
    envvar="RANK",
    show_default=True,
    help="This shard's tensor-parallel rank.",
)
@click.option(
    "--world-size",
    type=int,
    default=1,
    envvar="WORLD_SIZE",
    show_default=True,
    help="Number of tensor-parallel shards.",
)
@click.option(
    "--master-addr",
    default=SHARD_DEFAULTS["master_addr"],
    envvar="MASTER_ADDR",
    show_default=True,
    help="torch.distributed rendezvous address.",
)
@click.option(
    "--master-port",
    type=int,
    default=SHARD_DEFAULTS["master_port"],
    envvar="MASTER_PORT",
    show_default=True,
    help="torch.distributed rendezvous port.",
)
@click.option(
    "--max-input-tokens",
    type=int,
    default=SHARD_DEFAULTS["max_input_tokens"],
    help="Longest prompt accepted [default: the model's context - 1].",
)
@click.option(
    "--kv-cache-memory",
    default=None,
    help="Bytes for the KV cache on CPU, e.g. 2GiB [default: 25%% of available "
    "memory, at most 4GiB].",
)
@click.option(
    "--cuda-memory-fraction",
    type=float,
    default=SHARD_DEFAULTS["cuda_memory_fraction"],
    show_default=True,
    help="Fraction of free GPU memory the KV cache may take (CUDA).",
)
@click.option(
    "--block-size",
    type=int,
    default=SHARD_DEFAULTS["block_size"],
    show_default=True,
    help="Tokens per KV block.",
)
@click.option(
    "--attention",
    default=SHARD_DEFAULTS["attention"],
    show_default=True,
    help="Attention backend: reference, sdpa, triton, flash-attn, or auto (reference on CPU; "
    "flash-attn when installed, else triton, on CUDA).",
)
@click.option(
    "--cuda-graphs",
    default=DEFAULT_GRAPH_SIZES,
    show_default=True,
    help="CUDA: decode batch sizes captured as CUDA graphs at Warmup; 0 disables.",
)
@click.option(
    "--num-threads",
    type=int,
    default=SHARD_DEFAULTS["num_threads"],
    help="torch CPU threads [default: all].",
)
@click.option(
    "--grpc-host",
    default=SHARD_DEFAULTS["grpc_host"],
    help="Multi-node: also listen on TCP at this address (port --grpc-port-base + rank).",
)
@click.option(
    "--grpc-port-base",
    type=int,
    default=SHARD_DEFAULTS["grpc_port_base"],
    show_default=True,
    help="Multi-node: rank r listens on this port + r.",
)
@click.option(
    "--distributed-timeout",
    "dist_timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for every rank to join, and for each collective.",
)
@click.option(
    "--prefix-caching/--no-prefix-caching",
    "use_prefix_caching",
    default=SHARD_DEFAULTS["use_prefix_caching"],
    show_default=True,
    help="Report prefix caching in Info (the router then reuses cached prompt K/V).",
)
@click.option(
    "--pack-linear/--no-pack-linear",
    default=SHARD_DEFAULTS["pack_linear"],
    show_default=True,
    help="CPU: keep linear weights packed (with AVX-512 in pytgi's panels, else in oneDNN's "
    "layout): faster batched decode and prefill.",
)
@click.option(
    "--quantize",
    default=SHARD_DEFAULTS["quantize"],
    help="Weight-only quantization of the decoder's linear layers on load: int8 (per output "
    "channel) or int4 (per group of --quantize-group-size inputs).",
)
@click.option(
    "--kv-cache-dtype",
    type=click.Choice(["fp8_e4m3fn"]),
    default=SHARD_DEFAULTS["kv_cache_dtype"],
    help="Store the KV cache in fp8 e4m3 with per-tensor scales [default: --dtype].",
)
@click.option(
    "--quantize-group-size",
    type=int,
    default=SHARD_DEFAULTS["quantize_group_size"],
    help="int4: inputs per group: 32, 64 or 128 (fewer scales to read, more error).",
)
@click.option(
    "--cpu-gemv/--no-cpu-gemv",
    default=SHARD_DEFAULTS["cpu_gemv"],
    show_default=True,
    help="CPU: keep plain weights beside the packed ones for faster batch-1 decode steps "
    "(costs the layers' weight memory once more).",
)
@click.option(
    "--huge-pages/--no-huge-pages",
    default=SHARD_DEFAULTS["huge_pages"],
    show_default=True,
    help="CPU: keep the weights and the KV pool in 2 MiB pages (Linux transparent huge "
    "pages), which decode steps read faster.",
)
@click.option(
    "--step-ahead/--no-step-ahead",
    default=SHARD_DEFAULTS["step_ahead"],
    show_default=True,
    help="Run a decoding batch's next step before the router asks for it (the router's "
    "round trip overlaps the step).",
)
@click.option(
    "--step-ahead-rows",
    type=click.IntRange(min=0),
    default=SHARD_DEFAULTS["step_ahead_rows"],
    show_default=True,
    help="--step-ahead only for batches of at most this many unfinished requests (0: any).",
)
@click.option(
    "--shard-secret",
    "secret",
    envvar=SECRET_ENV,
    default=None,
    help=f"Refuse every call without this secret [env {SECRET_ENV}; prefer it: arguments "
    "are visible to other users].",
)
@click.option(
    "--tls-cert-file",
    default=SHARD_DEFAULTS["tls_cert_file"],
    help="Multi-node: PEM certificate; the TCP port then speaks TLS (with --tls-key-file).",
)
@click.option(
    "--tls-key-file",
    default=SHARD_DEFAULTS["tls_key_file"],
    help="Multi-node: PEM private key of the certificate.",
)
@click.option(
    "--fault-file",
    default=SHARD_DEFAULTS["fault_file"],
    hidden=True,
    help="Test-only: an empty file fails the next forward; one holding a marker fails the "
    "Prefill of a prompt containing it, on every rank.",
)
@click.option(
    "--disable-custom-kernels",
    is_flag=True,
    help="PyTorch's ops only: no C++ GEMV, no Triton layer or attention kernels.",
)
@click.option(
    "--otlp-endpoint",
    default=SHARD_DEFAULTS["otlp_endpoint"],
    help="OTLP gRPC collector (e.g. http://127.0.0.1:4317) for traces [default: none].",
)
@click.option(
    "--otlp-service-name",
    default=SHARD_DEFAULTS["otlp_service_name"],
    help="Service name of this shard's spans.",
)
@click.option("--json-output", is_flag=True, help="Log JSON lines instead of text.")
def serve(
    model_dir: str, json_output: bool, kv_cache_memory: str | None, dist_timeout: float, **options
) -> None:
    """Serve MODEL_DIR (a Hugging Face directory with safetensors) until SIGTERM/SIGINT."""
    die_with_parent()
    log = setup_logging(f"shard-{options['rank']}", json_output)
    try:
        import torch

        from shard.engine import ShardEngine
        from shard.parallel import gather_urls, init_distributed, resolve_device
        from shard.server import engine_thread
        from shard.server import serve as serve_async

        setup_tracing(options["otlp_service_name"], options["otlp_endpoint"])
        options["uds_path"] = options["uds_path"] or default_uds_path()
        local_rank = int(os.environ.get("LOCAL_RANK", options["rank"]))
        options["device"] = resolve_device(options["device"], local_rank)
        config = shard_config(model_dir, kv_cache_memory, **options)

        threads = config.num_threads
        if threads is None and config.world_size > 1 and config.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // config.world_size)  # ranks share the cores
        if threads:
            torch.set_num_threads(threads)
        init_distributed(
            config.rank,
            config.world_size,
            config.master_addr,
            config.master_port,
            config.device,
            dist_timeout,
        )
        urls = gather_urls(config.advertised_url, config.world_size)
        worker = engine_thread()  # every torch call on one thread: one OpenMP team
        engine = worker.submit(ShardEngine, config).result()
        asyncio.run(serve_async(config, engine, urls, worker))
    except (ShardError, UnsafeDirectory) as exc:
        log.error("%s", exc)
        sys.exit(1)


def shard_config(model_dir: str, kv_cache_memory: str | None, **options) -> ShardConfig:
    """The config `serve`'s options describe (the device already resolved): a size with
    units becomes bytes, the graph sizes a tuple."""
    try:
        graph_sizes = parse_batch_sizes(options.pop("cuda_graphs"))
        kv_bytes = parse_size(kv_cache_memory) if kv_cache_memory else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return ShardConfig(
        model_dir=model_dir, kv_cache_memory=kv_bytes, cuda_graphs=graph_sizes, **options
    )


@main.command("default-model")
@click.option(
    "--cache-dir", default=None, help="Cache folder [default: $PYTGI_CACHE_DIR or ~/.cache/pytgi]."
)
def default_model(cache_dir: str | None) -> None:
    """Convert the embedded SmolLM2-135M-Instruct once and print its directory."""
    from shard.embedded import default_model_dir

    setup_logging("shard")
    try:
        click.echo(str(default_model_dir(cache_dir)))
    except ShardError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("prepare-gguf")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--cache-dir", default=None, help="Cache folder [default: $PYTGI_CACHE_DIR or ~/.cache/pytgi]."
)
def prepare_gguf(path: str, cache_dir: str | None) -> None:
    """Read a GGUF file's config and tokenizer once and print its serving folder."""
    from shard.embedded import gguf_model_dir

    setup_logging("shard")
    try:
        click.echo(str(gguf_model_dir(path, cache_dir)))
    except ShardError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("convert-pickles")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
def convert_pickles_command(model_dir: str) -> None:
    """Write safetensors beside a directory's pytorch_model*.bin (weights_only loading)."""
    from shard.pickles import convert_pickles

    setup_logging("shard")
    try:
        for path in convert_pickles(model_dir):
            click.echo(str(path))
    except ShardError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
