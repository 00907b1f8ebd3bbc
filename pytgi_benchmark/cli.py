"""Per batch size: a prefill of `sequence_length` tokens, then `decode_length - 1` decode
steps, `runs` times after `warmups`; prints latency and throughput tables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import click
import grpc
from tqdm import tqdm

from common.allocator import BlockAllocator
from common.paths import default_uds_path
from common.procinfo import peak_rss_mib, pids_with_argument
from common.rpc import SECRET_ENV
from pytgi_benchmark.stats import summary, table
from router.client import ShardedClient
from router.types import Params, ShardRequest

WORD = " hello"


def shard_memory(uds_path: str) -> dict[int, float]:
    """Peak RSS (MiB) of the local shard processes serving `uds_path`."""
    memory = {}
    for pid in pids_with_argument(uds_path):
        if pid == os.getpid():  # this tool's own command line names the path too
            continue
        mib = peak_rss_mib(pid)
        if mib is not None:
            memory[pid] = mib
    return memory  # one token in Llama-family BPE vocabularies; `truncate` fixes the length


async def kv_pool(client: ShardedClient, max_prefill_tokens: int) -> BlockAllocator:
    """The shards' KV pool, allocated as the router allocates it (block 0 reserved); shards
    never warmed up are warmed up first. Run this against shards no router is serving: two
    allocators of one pool would name the same blocks (the shards refuse such requests)."""
    info = await client.info()
    if not info.kv_cache_blocks:
        await client.warmup(None, max(max_prefill_tokens, 1), None)
        info = await client.info()
    return BlockAllocator(info.kv_cache_blocks - 1, info.block_size)


def _allocate(pool: BlockAllocator, batch_size: int, num_tokens: int) -> list[list[int]]:
    blocks: list[list[int]] = []
    for _ in range(batch_size):
        got = pool.allocate(num_tokens)
        if got is None:
            for held in blocks:
                pool.free(held)
            raise click.ClickException(
                f"the KV cache holds {pool.num_blocks} blocks of {pool.block_size} tokens: too "
                f"few for {batch_size} requests of {num_tokens} tokens"
            )
        blocks.append(got)
    return blocks


async def run_batch(
    client: ShardedClient,
    pool: BlockAllocator,
    batch_size: int,
    params: Params,
    seq_len: int,
    runs: int,
    warmups: int,
    bar,
) -> dict:
    prefill_ms, decode_ms = [], []
    for run in range(warmups + runs):
        await client.clear_cache(None)
        blocks = _allocate(pool, batch_size, seq_len + params.max_new_tokens - 1)
        requests = [
            ShardRequest(i, WORD * (seq_len + 8), params, held, pool.block_size)
            for i, held in enumerate(blocks)
        ]
        start = time.perf_counter()
        step = await client.prefill(1, requests, None)
        prefill = (time.perf_counter() - start) * 1000
        steps = []
        batch = step.batch
        while batch is not None:
            start = time.perf_counter()
            step = await client.decode([batch])
            steps.append((time.perf_counter() - start) * 1000)
            batch = step.batch
        for held in blocks:
            pool.free(held)
        if run >= warmups:
            prefill_ms.append(prefill)
            decode_ms.extend(steps)
        bar.update()
    await client.clear_cache(None)
    return {
        "batch_size": batch_size,
        "prefill_latency_ms": prefill_ms,
        "decode_step_latency_ms": decode_ms,
        "prefill_throughput_tokens_per_s": [
            batch_size * seq_len / (ms / 1000) for ms in prefill_ms
        ],
        "decode_throughput_tokens_per_s": [batch_size / (ms / 1000) for ms in decode_ms],
    }


def report(results: list[dict]) -> str:
    def rows(key):
        return [(f"batch {r['batch_size']}", summary(r[key])) for r in results]

    return "\n\n".join(
        [
            table("prefill latency", rows("prefill_latency_ms"), "ms"),
            table("prefill throughput", rows("prefill_throughput_tokens_per_s"), "tokens/s"),
            table("decode latency per token", rows("decode_step_latency_ms"), "ms"),
            table("decode throughput", rows("decode_throughput_tokens_per_s"), "tokens/s"),
        ]
    )


@click.command(context_settings={"show_default": True})
@click.option("--tokenizer-name", required=True, help="Model directory (named in the report).")
@click.option(
    "--uds-path",
    default=None,
    help="Socket prefix of shard 0 (…-0) [default: {tmp}/pytgi-{uid}/server, the shard's].",
)
@click.option(
    "-b",
    "--batch-size",
    "batch_sizes",
    type=int,
    multiple=True,
    help="Batch sizes [default: 1,2,4,8,16,32].",
)
@click.option("-s", "--sequence-length", type=int, default=10, help="Prompt tokens per request.")
@click.option("-d", "--decode-length", type=int, default=8, help="Tokens generated per request.")
@click.option("-r", "--runs", type=int, default=10, help="Measured runs per batch size.")
@click.option("-w", "--warmups", type=int, default=1, help="Unmeasured runs first.")
@click.option("--temperature", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--typical-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--frequency-penalty", type=float, default=None)
@click.option("--do-sample", is_flag=True)
@click.option("--json", "json_path", default=None, help="Write the raw numbers to this file.")
@click.option(
    "--shard-secret",
    envvar=SECRET_ENV,
    default=None,
    help=f"The shards' secret [env {SECRET_ENV}].",
)
def main(
    tokenizer_name,
    uds_path,
    shard_secret,
    batch_sizes,
    sequence_length,
    decode_length,
    runs,
    warmups,
    json_path,
    **sampling,
) -> None:
    """Benchmark a running shard set directly over gRPC (no router)."""
    params = Params(
        max_new_tokens=decode_length,
        temperature=sampling["temperature"] or 1.0,
        top_k=sampling["top_k"] or 0,
        top_p=sampling["top_p"] or 1.0,
        typical_p=sampling["typical_p"] or 1.0,
        do_sample=sampling["do_sample"],
        repetition_penalty=sampling["repetition_penalty"] or 1.0,
        frequency_penalty=sampling["frequency_penalty"] or 0.0,
        ignore_eos=True,
        truncate=sequence_length,
        add_special_tokens=False,
    )
    sizes = list(batch_sizes) or [1, 2, 4, 8, 16, 32]
    uds_path = uds_path or default_uds_path()

    async def go():
        client = await ShardedClient.connect(f"unix://{uds_path}-0", shard_secret)
        try:
            pool = await kv_pool(client, max(sizes) * sequence_length)
            with tqdm(
                total=len(sizes) * (runs + warmups), desc="benchmarking", file=sys.stderr
            ) as bar:
                return [
                    await run_batch(client, pool, b, params, sequence_length, runs, warmups, bar)
                    for b in sizes
                ]
        finally:
            await client.close()

    try:
        results = asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        raise click.ClickException(
            f"shard call failed: {exc.code().name}: {exc.details()}"
        ) from exc
    click.echo(
        f"model: {tokenizer_name}, sequence length {sequence_length}, "
        f"decode length {decode_length}\n"
    )
    click.echo(report(results))
    memory = shard_memory(uds_path)
    if memory:
        click.echo(
            "\n"
            + "\n".join(
                f"peak RSS of shard pid {pid}: {mib:.0f} MiB" for pid, mib in memory.items()
            )
        )
    if json_path:
        settings = {
            "tokenizer_name": tokenizer_name,
            "sequence_length": sequence_length,
            "decode_length": decode_length,
            "runs": runs,
            "warmups": warmups,
        }
        with open(json_path, "w") as f:
            json.dump(
                {"settings": settings, "results": results, "peak_rss_mib": memory}, f, indent=1
            )


if __name__ == "__main__":
    main()
