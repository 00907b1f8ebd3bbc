"""`pytgi-launcher`: one command to serve a model with TGI's and OpenAI's APIs.

Every flag is also read from the environment variable of the same name in capitals
(`--model-id` / `MODEL_ID`), as in TGI's text-generation-launcher.
"""

from __future__ import annotations

import sys

import click

from common.config import defaults
from common.logs import setup_logging
from launcher.config import LauncherConfig, LaunchError
from launcher.supervisor import Supervisor, check_port_free, resolve_model
from launcher.tgi_flags import TGI_QUANTIZE, TgiCompatibleCommand

LAUNCHER_DEFAULTS = defaults(LauncherConfig)


def option(name: str, *short: str, **kwargs):
    envvar = name.split("/")[0].lstrip("-").replace("-", "_").upper()  # on/off pair: the "on"
    kwargs.setdefault("show_default", True)
    return click.option(name, *short, envvar=envvar, show_envvar=True, **kwargs)


@click.command(
    cls=TgiCompatibleCommand,
    epilog="TGI's flags that pytgi does not support stop the start with a message, also when "
    "set as environment variables (QUANTIZE, REVISION, ...). --version prints the version; "
    "-e/--env prints the environment.",
)
@option(
    "--model-id",
    default=None,
    help="A Hub repository (org/name, fetched once into the Hub cache) or a local model "
    "directory [default: the embedded SmolLM2-135M-Instruct, converted once].",
)
@option("--revision", default=None, help="Branch, tag or commit of a Hub model.")
@option(
    "--huggingface-hub-cache",
    default=None,
    help="Hub cache folder [default: huggingface_hub's, from HF_HOME].",
)
@option(
    "--num-shard",
    type=int,
    default=LAUNCHER_DEFAULTS["num_shard"],
    help="Tensor-parallel shards to start.",
)
@option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=LAUNCHER_DEFAULTS["dtype"],
    help="Weights and KV dtype [default: float32 on CPU, bfloat16 on CUDA].",
)
@option(
    "--max-input-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_input_tokens"],
    help="Longest prompt [default: --max-total-tokens - 1].",
)
@option(
    "--max-total-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_total_tokens"],
    help="Longest prompt + output [default: the model's context, capped by what the KV cache "
    "holds; logged at start-up].",
)
@option(
    "--max-batch-prefill-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_batch_prefill_tokens"],
    help="Prompt tokens per forward (chunks longer prompts) [default: 2048].",
)
@option(
    "--max-batch-total-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_batch_total_tokens"],
    help="KV tokens of the running batch [default: the capacity Warmup finds].",
)
@option(
    "--max-concurrent-requests",
    type=int,
    default=LAUNCHER_DEFAULTS["max_concurrent_requests"],
    help="Requests in flight before 429.",
)
@option(
    "--max-best-of", type=int, default=LAUNCHER_DEFAULTS["max_best_of"], help="Largest best_of."
)
@option(
    "--max-stop-sequences",
    type=int,
    default=LAUNCHER_DEFAULTS["max_stop_sequences"],
    help="Most stop sequences per request.",
)
@option(
    "--max-top-n-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_top_n_tokens"],
    help="Largest top_n_tokens.",
)
@option(
    "--waiting-served-ratio",
    type=float,
    default=LAUNCHER_DEFAULTS["waiting_served_ratio"],
    help="Without chunking: waiting/running ratio that triggers a prefill.",
)
@option(
    "--max-waiting-tokens",
    type=int,
    default=LAUNCHER_DEFAULTS["max_waiting_tokens"],
    help="Without chunking: decode steps before waiting requests are forced in.",
)
@option(
    "--max-batch-size",
    type=int,
    default=LAUNCHER_DEFAULTS["max_batch_size"],
    help="Most requests per batch [default: no limit].",
)
@option(
    "--max-client-batch-size",
    type=int,
    default=LAUNCHER_DEFAULTS["max_client_batch_size"],
    help="Most prompts in one /v1/completions request.",
)
@option(
    "--hostname", default=LAUNCHER_DEFAULTS["hostname"], help="Address the HTTP server listens on."
)
@option(
    "--port",
    "-p",
    type=int,
    default=LAUNCHER_DEFAULTS["port"],
    help="Port the HTTP server listens on.",
)
@option(
    "--validation-workers",
    type=click.IntRange(min=1),
    default=LAUNCHER_DEFAULTS["validation_workers"],
    help="Router threads that tokenize prompts and render chat templates.",
)
@option(
    "--disable-grammar-support",
    is_flag=True,
    default=LAUNCHER_DEFAULTS["disable_grammar_support"],
    help="Refuse requests with a grammar, response_format or tools (422), as TGI's flag.",
)
@option(
    "--otlp-endpoint",
    default=LAUNCHER_DEFAULTS["otlp_endpoint"],
    help="OTLP gRPC collector (e.g. http://127.0.0.1:4317): the router's and the shards' "
    "spans, one trace context across them [default: no tracing].",
)
@option(
    "--otlp-service-name",
    default=LAUNCHER_DEFAULTS["otlp_service_name"],
    help="Service name of the router's spans (the shards': its stem + .shard).",
)
@option(
    "--prometheus-port",
    type=int,
    default=LAUNCHER_DEFAULTS["prometheus_port"],
    help="Also serve /metrics (alone) on this port, as TGI does on 9000 [default: off].",
)
@option(
    "--shard-uds-path",
    default=LAUNCHER_DEFAULTS["shard_uds_path"],
    help="Socket path prefix of the shards [default: in a private temporary directory].",
)
@option(
    "--master-addr",
    default=LAUNCHER_DEFAULTS["master_addr"],
    help="torch.distributed rendezvous address.",
)
@option(
    "--master-port",
    type=int,
    default=LAUNCHER_DEFAULTS["master_port"],
    help="torch.distributed rendezvous port.",
)
@option(
    "--cuda-memory-fraction",
    type=float,
    default=LAUNCHER_DEFAULTS["cuda_memory_fraction"],
    help="Fraction of free GPU memory for the KV cache.",
)
@option(
    "--kv-cache-memory",
    default=LAUNCHER_DEFAULTS["kv_cache_memory"],
    help="KV cache bytes on CPU, e.g. 2GiB [default: 25% of available memory, at most 4GiB].",
)
@option(
    "--kv-cache-dtype",
    type=click.Choice(["fp8_e4m3fn", "fp8_e5m2"]),
    default=LAUNCHER_DEFAULTS["kv_cache_dtype"],
    help="Store the KV cache in fp8 (e4m3, per-tensor scales): half of bf16's memory and "
    "bandwidth, a quarter of float32's [default: --dtype].",
)
@option(
    "--api-key",
    default=LAUNCHER_DEFAULTS["api_key"],
    help="Bearer token required on generation routes.",
)
@option("--cors-allow-origin", multiple=True, help="Allowed CORS origin (repeatable).")
@option(
    "--payload-limit",
    type=int,
    default=LAUNCHER_DEFAULTS["payload_limit"],
    help="Largest request body in bytes.",
)
@option(
    "--prefix-caching/--no-prefix-caching",
    default=LAUNCHER_DEFAULTS["prefix_caching"],
    help="Reuse the K/V of cached prompt prefixes; the chunk budget is --max-batch-prefill-tokens.",
)
@option(
    "--device",
    default=LAUNCHER_DEFAULTS["device"],
    help="Shard device: auto (a GPU per shard when CUDA is there), cpu, cuda.",
)
@option(
    "--attention",
    type=click.Choice(["auto", "reference", "sdpa", "triton", "flash-attn"]),
    default=LAUNCHER_DEFAULTS["attention"],
    help="Attention backend [auto: reference on CPU; flash-attn if installed, else triton].",
)
@option(
    "--cuda-graphs",
    default=LAUNCHER_DEFAULTS["cuda_graphs"],
    help="CUDA: decode batch sizes captured as CUDA graphs; 0 disables.",
)
@option(
    "--quantize",
    type=click.Choice(["int8", "int4", *TGI_QUANTIZE]),
    default=None,
    help="Quantization on load: int8 (per output channel) or int4 (groups of "
    "--quantize-group-size inputs), weight-only, the LM head in int8; fp8 (weights and "
    "activations, GPUs with fp8 products). awq, gptq, compressed-tensors, fp8 checkpoints are "
    "detected from their config; bitsandbytes, marlin, eetq, exl2 are refused.",
)
@option(
    "--quantize-group-size",
    type=int,
    default=LAUNCHER_DEFAULTS["quantize_group_size"],
    help="int4: inputs per group: 32, 64 or 128 (fewer scales to read, more error).",
)
@option(
    "--cpu-gemv/--no-cpu-gemv",
    default=LAUNCHER_DEFAULTS["cpu_gemv"],
    help="CPU: faster batch-1 decode steps for the layers' weight memory once more.",
)
@option(
    "--pack-linear/--no-pack-linear",
    default=LAUNCHER_DEFAULTS["pack_linear"],
    help="CPU: linear weights packed at load (with AVX-512 our panels, quantized ones too where "
    "the CPU has bf16 dot products; else oneDNN's layout): faster batched decode and prefill.",
)
@option(
    "--huge-pages/--no-huge-pages",
    default=LAUNCHER_DEFAULTS["huge_pages"],
    help="CPU: shards keep their weights and KV pool in 2 MiB pages (Linux transparent huge "
    "pages).",
)
@option(
    "--step-ahead/--no-step-ahead",
    default=LAUNCHER_DEFAULTS["step_ahead"],
    help="Shards run a decoding batch's next step before the router asks for it.",
)
@option(
    "--step-ahead-rows",
    type=click.IntRange(min=0),
    default=LAUNCHER_DEFAULTS["step_ahead_rows"],
    help="--step-ahead only for batches of at most this many unfinished requests (0: any): "
    "on 2 CPU cores batches of several served no faster, or slower, with it.",
)
@option(
    "--disable-custom-kernels",
    is_flag=True,
    help="PyTorch's ops only in the shards: no C++ GEMV, no Triton kernels (attention auto "
    "becomes reference on CPU, sdpa on CUDA).",
)
@option("--json-output", is_flag=True, help="Log JSON lines.")
@option(
    "--graceful-termination-timeout",
    "-g",
    type=float,
    default=LAUNCHER_DEFAULTS["graceful_termination_timeout"],
    help="Seconds running requests get after SIGTERM.",
)
@option(
    "--nnodes",
    type=int,
    default=LAUNCHER_DEFAULTS["nnodes"],
    help="Machines in the tensor-parallel group.",
)
@option(
    "--node-rank",
    type=int,
    default=LAUNCHER_DEFAULTS["node_rank"],
    help="This machine's index; node 0 runs the router.",
)
@option(
    "--shard-host",
    default=LAUNCHER_DEFAULTS["shard_host"],
    help="Multi-node: address node 0 reaches this machine on.",
)
@option(
    "--shard-port-base",
    type=int,
    default=LAUNCHER_DEFAULTS["shard_port_base"],
    help="Multi-node: rank r uses TCP port base + r.",
)
@option(
    "--shard-secret",
    default=None,
    help="Secret every shard call must carry; multi-node: the same on every node (prefer the "
    "env var: arguments are visible to other users) [default: a new random one per start].",
)
@option(
    "--shard-tls-cert",
    default=LAUNCHER_DEFAULTS["shard_tls_cert"],
    help="Multi-node: PEM certificate this node's shard ports present (TLS), with its key.",
)
@option(
    "--shard-tls-key",
    default=LAUNCHER_DEFAULTS["shard_tls_key"],
    help="Multi-node: PEM private key of --shard-tls-cert.",
)
@option(
    "--shard-tls-ca",
    default=LAUNCHER_DEFAULTS["shard_tls_ca"],
    help="Multi-node: PEM CA the router checks the shards' certificates against (node 0).",
)
@option(
    "--insecure-shard-ports",
    is_flag=True,
    help="Multi-node: allow shard TCP ports without --shard-secret (anyone reaching them can "
    "read and drop requests).",
)
@option(
    "--startup-timeout",
    type=float,
    default=LAUNCHER_DEFAULTS["startup_timeout"],
    help="Seconds each stage may take to become ready.",
)
def main(cors_allow_origin: tuple[str, ...], **options) -> None:
    """Serve a model: N shards and a router, supervised; Ctrl-C or SIGTERM stops all."""
    log = setup_logging("launcher", options["json_output"])
    config = LauncherConfig(cors_allow_origin=tuple(cors_allow_origin), **options)
    supervisor = None
    try:
        config.check_limits()
        check_port_free(config.hostname, config.port)
        model_dir = resolve_model(
            config.model_id, config.world_size, config.revision, config.huggingface_hub_cache
        )
        supervisor = Supervisor(config, model_dir)
        supervisor.install_signal_handlers()
        supervisor.start()
    except LaunchError as exc:
        log.error("start-up failed: %s", exc)
        if supervisor is not None:
            supervisor.shutdown()
        sys.exit(1)
    sys.exit(supervisor.supervise())


if __name__ == "__main__":
    main()
