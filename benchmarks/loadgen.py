"""HTTP load generator: streams requests to any TGI- or OpenAI-compatible server and reports
TTFT, TPOT, ITL, E2E percentiles, request and token throughput and failures
(definitions: ../shared/BENCHMARKING.md).

Closed loop (`--concurrency`, each client sends its next request when the last ends) or open
loop (`--rate`, seeded Poisson arrivals); bounded by `--requests` and `--max-seconds`.
Several `--concurrency`/`--rate` values sweep the load and `--plot` draws throughput and
latency against it. Output token counts come from the server (`details.generated_tokens` or
`usage.completion_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workloads import WORKLOADS, Request, single_token_words  # noqa: E402

from common.procinfo import peak_rss_mib  # noqa: E402

API_PATHS = {
    "tgi": "/generate_stream",
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def _body(api: str, request: Request) -> dict:
    if api == "tgi":
        return {
            "inputs": request.prompt,
            "parameters": {
                "max_new_tokens": request.max_new_tokens,
                "ignore_eos": True,
                "details": True,
            },
        }
    common = {"model": "x", "max_tokens": request.max_new_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    if api == "completions":
        return {"prompt": request.prompt, **common}
    return {"messages": [{"role": "user", "content": request.prompt}], **common}


def _event_tokens(api: str, event: dict) -> tuple[bool, int | None]:
    """(carries a token, server's final output-token count if this event has it)."""
    if api == "tgi":
        details = event.get("details")
        return bool(event.get("token")), details["generated_tokens"] if details else None
    usage = event.get("usage")
    count = usage["completion_tokens"] if usage else None
    choices = event.get("choices") or []
    has_token = any(
        (c.get("text") or (c.get("delta") or {}).get("content")) is not None for c in choices
    )
    return has_token and bool(choices), count


def _lines(chunk: bytes, held: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of `held + chunk`, and the unfinished rest (no length limit:
    a final event carries the whole generated text)."""
    *lines, rest = (held + chunk).split(b"\n")
    return lines, rest


async def one(session: aiohttp.ClientSession, url: str, api: str, request: Request) -> Result:
    result = Result(ok=False, prompt_tokens=request.prompt_tokens)
    start = last = time.perf_counter()
    try:
        async with session.post(url + API_PATHS[api], json=_body(api, request)) as reply:
            if reply.status != 200:
                result.error = f"HTTP {reply.status}"
                await reply.read()
                return result
            held = b""
            async for chunk in reply.content.iter_any():
                lines, held = _lines(chunk, held)
                for line in lines:
                    if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        result.error = event.get("error_type", "error")
                        return result
                    has_token, count = _event_tokens(api, event)
                    now = time.perf_counter()
                    if has_token:
                        if result.ttft == 0.0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                    if count is not None:
                        result.output_tokens = count
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = type(exc).__name__
        return result
    result.e2e = last - start
    result.ok = result.output_tokens > 0
    if not result.ok:
        result.error = "no tokens"
    return result


async def run_load(url: str, api: str, requests: list[Request], concurrency: int | None, rate: float | None,
                   max_seconds: float, seed: int = 0) -> tuple[list[Result], float]:  # fmt: skip
    """Closed loop at `concurrency`, or open loop at `rate` requests/s (Poisson, seeded).
    aiohttp streams the events at about a third of httpx's CPU per token: on a small machine
    the client shares the cores with the server it measures."""
    url = url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=(concurrency or 256) + 8)
    timeout = aiohttp.ClientTimeout(total=max_seconds + 60)
    results: list[Result] = []
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if concurrency:
            queue = list(reversed(requests))

            async def worker():
                while queue and time.perf_counter() - started < max_seconds:
                    results.append(await one(session, url, api, queue.pop()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            assert rate, "give a concurrency or a rate"
            rng = random.Random(seed)
            tasks = []
            for request in requests:
                if time.perf_counter() - started >= max_seconds:
                    break
                tasks.append(asyncio.ensure_future(one(session, url, api, request)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - started


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": pct(90),
        "p99": pct(99),
    }


def summarize(results: list[Result], seconds: float, load: str) -> dict:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    failures: dict[str, int] = {}
    for r in results:
        if not r.ok:
            failures[r.error] = failures.get(r.error, 0) + 1
    return {
        "load": load,
        "requests": len(results),
        "completed": len(ok),
        "failures": failures,
        "seconds": seconds,
        "request_throughput": len(ok) / seconds,
        "output_tokens": output,
        "output_token_throughput": output / seconds,
        "total_token_throughput": (output + prompt) / seconds,
        "ttft_s": _stats([r.ttft for r in ok]),
        "tpot_s": _stats(tpot),
        "itl_s": _stats([gap for r in ok for gap in r.itl]),
        "e2e_s": _stats([r.e2e for r in ok]),
    }


def table(summaries: list[dict]) -> str:
    head = ("| load | done | failed | req/s | out tok/s | total tok/s | TTFT p50 | TTFT p99 | TPOT p50 | "
            "ITL p50 | ITL p99 | E2E p50 | E2E p99 |")  # fmt: skip
    lines = [head, "|---" + "|---:" * 12 + "|"]
    for s in summaries:
        lines.append(
            f"| {s['load']} | {s['completed']} | {sum(s['failures'].values())} | {s['request_throughput']:.2f} | "
            f"{s['output_token_throughput']:.1f} | {s['total_token_throughput']:.1f} | {s['ttft_s']['median']:.3f} | "
            f"{s['ttft_s']['p99']:.3f} | {s['tpot_s']['median']:.3f} | {s['itl_s']['median']:.3f} | "
            f"{s['itl_s']['p99']:.3f} | {s['e2e_s']['median']:.3f} | {s['e2e_s']['p99']:.3f} |"
        )
    return "\n".join(lines)


def plot(summaries: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [s["load"] for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(loads, [s["output_token_throughput"] for s in summaries], marker="o")
    left.set_xlabel("load")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput")
    for key, label in (("ttft_s", "TTFT p50"), ("tpot_s", "TPOT p50"), ("e2e_s", "E2E p50")):
        right.plot(loads, [s[key]["median"] for s in summaries], marker="o", label=label)
    right.set_xlabel("load")
    right.set_ylabel("seconds")
    right.set_title("latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--api", choices=sorted(API_PATHS), default="tgi")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
    parser.add_argument(
        "--tokenizer", default=None, help="model directory: prompts of exact token counts"
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--concurrency", type=int, action="append", help="closed loop (repeat to sweep)"
    )
    parser.add_argument(
        "--rate", type=float, action="append", help="open loop, requests/s (repeat to sweep)"
    )
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--plot", default=None, help="PNG of throughput and latency against load")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                        help="report this local server process's peak RSS (repeatable)")  # fmt: skip
    args = parser.parse_args()
    words = single_token_words(args.tokenizer)
    requests = WORKLOADS[args.workload](args.requests, args.seed, words)
    loads = [("concurrency", c) for c in args.concurrency or []] + [
        ("rate", r) for r in args.rate or []
    ]
    summaries = []
    for kind, value in loads or [("concurrency", 1)]:
        concurrency, rate = (value, None) if kind == "concurrency" else (None, value)
        results, seconds = asyncio.run(
            run_load(args.url, args.api, requests, concurrency, rate, args.max_seconds, args.seed)
        )
        summaries.append(summarize(results, seconds, f"{kind} {value}"))
    print(table(summaries))
    memory = {}
    for item in args.pid:
        name, _, pid = item.partition("=")
        memory[name] = peak_rss_mib(int(pid))
        print(f"peak RSS of {name} (pid {pid}): {memory[name]:.0f} MiB")
    if args.json_path:
        report = {"settings": vars(args), "summaries": summaries, "peak_rss_mib": memory}
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(summaries, args.plot)


if __name__ == "__main__":
    main()
