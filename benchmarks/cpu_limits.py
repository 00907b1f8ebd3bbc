"""pytgi on CPU against this machine's own limits, measured in one run (issue 20).

The machine: read bandwidth (a sum over a 512 MiB float32 tensor, best of 5) and the
matrix-multiply rate at the model's decode shapes (every layer's products at M = 1, 8 and 32
rows) and a prefill shape (M = 128), in the served `--dtype` (run again with `--dtype
bfloat16` on a CPU with bf16 instructions), the faster of torch's `F.linear` and oneDNN's
linear on weights packed once (as the shard multiplies: 1.3-3.4x `F.linear` at 32 rows on a
Zen 5); all with the shard's threads. Then pytgi through `pytgi-launcher`, streaming (TGI's
API, EOS ignored, prefix cache off): TPOT p50 at concurrency 1, output tok/s at 8 and 32 on
the fixed and varied workloads, TTFT p50. Beside the TPOT: the engine's batch-1 decode step
in this process (no gRPC, router or HTTP), and, timed in turn with it, that step's weight
products alone (the model's own layers back to back on one row) against the same bound, so
the table splits the TPOT into the products, the rest of the step and the serving path,
and the router's metrics split that path further: the shard's step as served (its forward
and token choice), the gRPC round trip with the shard's handler, and the router between
calls (at concurrency 1 and 32). The machine is measured again after serving (a shared
machine drifts by tens of percent within an hour) and each bound takes the faster reading:
the stricter one.

Bounds, per figure:
- TPOT at concurrency 1 >= bytes of the weights a step streams / read bandwidth;
- a decode step of 32 rows (ITL p50 at concurrency 32, fixed) >= its FLOPs / the rate at
  M = 32 (the ratio is the share of the machine's matrix-multiply rate the step reaches);
- a 128-token prefill (TTFT p50 at concurrency 1, fixed) >= its FLOPs / the rate at M = 128.
Each of the last two again against the roofline: the larger of that bound and the bytes the
step must read (every weight once; a decode step also its 32 requests' K/V at their mean
context) over the bandwidth. On a CPU whose matrix units outrun its memory (AMX) the rate
alone names a time no step of 32 can reach; the roofline row says which side binds.

    .venv/bin/python benchmarks/cpu_limits.py [--model-id DIR] [--dtype float32] [--append]

Run with nothing else on the machine (../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launched import launcher  # noqa: E402
from loadgen import run_load, summarize  # noqa: E402
from workloads import WORKLOADS, Request, single_token_words  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Shapes:
    """The model's matrix products: (in, out) per layer, the number of layers, the head."""

    layer: list[tuple[int, int]]
    layers: int
    head: tuple[int, int]  # hidden -> vocabulary
    kv_elements: int = 0  # K and V elements a token keeps in the cache, every layer's

    @property
    def params(self) -> int:
        return self.layers * sum(i * o for i, o in self.layer) + self.head[0] * self.head[1]

    def flops(self, rows: int) -> float:
        """A decode step's products over `rows` requests: every weight, the head's too, on
        every row."""
        return 2.0 * self.params * rows

    def prefill_flops(self, tokens: int) -> float:
        """A prefill's products over a prompt of `tokens`: the layers' on every token, the
        head's on the last only (the shard chooses one token). Attention's own products,
        about 2% at 128 SmolLM2 tokens, are left out: the bound is of the weights'."""
        head = self.head[0] * self.head[1]
        return 2.0 * ((self.params - head) * tokens + head)

    def step_bytes(self, dtype_bytes: int, requests: int, context: float) -> float:
        """Bytes a forward must read at least: every weight once, and each of `requests`
        decoding requests' cached K/V (`context` tokens on average, in the model's dtype)
        once (0 requests: a prefill, whose K/V it writes)."""
        return (self.params + requests * context * self.kv_elements) * dtype_bytes


def model_shapes(model_dir: Path) -> Shapes:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    dim = config.get("head_dim") or hidden // heads
    layer = [(hidden, (heads + 2 * kv) * dim), (heads * dim, hidden), (hidden, 2 * inner),
             (inner, hidden)]  # fmt: skip
    layers = config["num_hidden_layers"]
    return Shapes(layer, layers, (hidden, config["vocab_size"]), layers * 2 * kv * dim)


def cpu_line() -> str:
    """The CPU's model, cores and the instruction sets that matter here."""
    from shard.cpu_kernels import cpu_flags

    model, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    present = [f for f in wanted if f in flags.split()]
    return f"{model}, {os.cpu_count()} cores, {' '.join(present) or 'no AVX2'}"


def read_bandwidth(threads: int) -> float:
    """Bytes per second read by a sum over 512 MiB (best of 5)."""
    torch.set_num_threads(threads)
    data = torch.ones(128 << 20, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def _linear_forms(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The ways to multiply by `weight` here: `F.linear`; oneDNN's linear on the weight
    packed once where oneDNN packs its dtype; our panels where the CPU's build takes its
    dtype (the shard's forms: shard/models/linear.py)."""
    from shard.models.linear import _panels, onednn_packed

    forms = {"F.linear": lambda x: F.linear(x, weight)}
    kernels, panels = _panels(weight)
    if panels is not None:
        forms["our panels"] = lambda x: kernels.panel_linear(x, panels, weight.shape[0])
    packed = onednn_packed(weight)
    if packed is not None:
        forms["oneDNN packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        )
    return forms


def matmul_rate(shapes: Shapes, rows: int, dtype: torch.dtype, threads: int) -> tuple[float, str]:
    """FLOP/s over one layer's products and the head at `rows` rows, by the faster of the
    forms in `_linear_forms` (best of 3 rounds each), and that form's name."""
    torch.set_num_threads(threads)
    products = [*shapes.layer, shapes.head]
    layers = [_linear_forms(torch.randn(o, i, dtype=dtype)) for i, o in products]
    inputs = [torch.randn(rows, i, dtype=dtype) for i, _ in products]
    flops = sum(2.0 * rows * i * o for i, o in products)
    best: dict[str, float] = {}
    with torch.inference_mode():
        for name in layers[0]:
            best[name] = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(5):
                    for x, forms in zip(inputs, layers, strict=True):
                        forms[name](x)
                best[name] = min(best[name], (time.perf_counter() - start) / 5)
    fastest = min(best, key=best.__getitem__)
    return flops / best[fastest], fastest


def machine(shapes: Shapes, dtype: torch.dtype, threads: int) -> tuple[float, dict]:
    """(read bandwidth, {rows: (matmul rate, form)}) measured now."""
    rates = {rows: matmul_rate(shapes, rows, dtype, threads) for rows in (1, 8, 32, 128)}
    return read_bandwidth(threads), rates


def _weight_products(runner: Any, shapes: Shapes) -> Callable[[], None] | None:
    """One batch-1 step's weight products alone: each layer's QKV, output, gate/up and down
    projections, then the head, on one row each, back to back, nothing between them (no
    attention, norms, KV writes or token choice), through what the step itself calls: the
    C++ step's projections where the step runs in C++ (`DecodeStack.products`), else the
    model's layers from Python, as the Python forward calls them. None for a model whose
    layers are not named so (a family of its own)."""
    model, widths = runner.model, [i for i, _ in shapes.layer]
    head_row = torch.zeros(1, shapes.head[0], dtype=model.dtype)
    if runner.cpu_step is not None:
        stack = runner.cpu_step.stack

        def in_cpp() -> None:
            with torch.inference_mode():
                stack.products(1, widths)
                model.lm_head(head_row)

        return in_cpp
    names = ("qkv", "o_proj", "mlp.gate_up", "mlp.down")
    try:
        layers = [[attrgetter(n)(layer) for n in names] for layer in model.layers]
    except AttributeError:
        return None
    rows = [torch.zeros(1, i, dtype=model.dtype) for i in widths]

    def in_python() -> None:
        with torch.inference_mode():
            for products in layers:
                for product, x in zip(products, rows, strict=True):
                    product(x)
            model.lm_head(head_row)

    return in_python


def step_ms(
    model_dir: Path, dtype: str, prompt: int, steps: int, shapes: Shapes
) -> tuple[float, float | None]:
    """(median batch-1 decode step of the shard's engine in this process, no gRPC or router,
    after a prompt of `prompt` tokens: what a streamed TPOT would be with a free serving path;
    median of the same step's weight products alone, `_weight_products`, or None), the two
    timed in turn so that both see the machine of the same seconds."""
    import gc

    from quant_step import decode_ms

    from tests.helpers import make_engine, spec

    engine = make_engine(model_dir, kv_bytes=256 << 20, max_total=1024, dtype=dtype)
    products, alone = _weight_products(engine.runner, shapes), []

    def time_products() -> None:
        if products is not None:
            start = time.perf_counter()
            products()
            alone.append(time.perf_counter() - start)

    words = single_token_words(model_dir)  # fewer than `prompt` (49 for SmolLM2): cycled
    text = " ".join(words[i % len(words)] for i in range(prompt))
    step = decode_ms(engine, [spec(0, text, steps + 8, ignore_eos=True)], steps, time_products)
    del engine
    gc.collect()
    # alone[:3]: the warm-up steps' products
    return step, statistics.median(alone[3:]) * 1e3 if alone else None


def _shorter(request: Request, prompt: int, new: int) -> Request:
    """The request with at most `prompt` prompt tokens (its words are single tokens)."""
    words = request.prompt.split()[:prompt]
    return Request("".join(" " + w for w in words), min(new, request.max_new_tokens), len(words))


# the router's histograms of its Decode calls (router/metrics.py): the shards' forward and
# token choice as they report them, and the whole call as the router awaits it
_DECODE_HISTOGRAMS = {
    "tgi_batch_forward_duration": "forward",
    "tgi_batch_decode_duration": "choice",
    "tgi_batch_inference_duration": "call",
}


def decode_totals(url: str) -> dict[str, tuple[float, float]]:
    """(seconds, calls) so far of each Decode histogram of the router at `url`."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    totals = {key: (0.0, 0.0) for key in _DECODE_HISTOGRAMS.values()}
    for family in text_string_to_metric_families(text):
        key = _DECODE_HISTOGRAMS.get(family.name)
        if key is None:
            continue
        samples = [s for s in family.samples if s.labels.get("method") == "decode"]
        total = sum(s.value for s in samples if s.name.endswith("_sum"))
        calls = sum(s.value for s in samples if s.name.endswith("_count"))
        totals[key] = (total, calls)
    return totals


def decode_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean seconds per Decode call between two `decode_totals` readings."""
    return {
        key: (after[key][0] - before[key][0]) / max(1.0, after[key][1] - before[key][1])
        for key in before
    }


def serve(model_dir: Path, dtype: str, port: int, scale: float) -> dict:
    """The end-to-end figures through pytgi-launcher."""
    words = single_token_words(model_dir)
    n = lambda count: max(2, int(count * scale))  # noqa: E731
    new = max(4, int(128 * scale)) if scale < 1 else 128
    prompt = max(8, int(128 * scale)) if scale < 1 else 128
    flags = ["--model-id", str(model_dir), "--dtype", dtype, "--no-prefix-caching",
             "--max-total-tokens", "1024", "--max-input-tokens", "768",
             "--max-batch-prefill-tokens", "1024", "--kv-cache-memory", "2GiB"]  # fmt: skip
    runs = {
        "c1": (1, WORKLOADS["fixed"](n(4), words=words, prompt=prompt, new=new)),
        "c8": (8, WORKLOADS["fixed"](n(16), words=words, prompt=prompt, new=new)),
        "c32": (32, WORKLOADS["fixed"](n(64), words=words, prompt=prompt, new=new)),
        "c32 varied": (32, WORKLOADS["varied"](n(64), words=words)),
    }
    if scale < 1:  # a quick run: the varied requests cut to the fixed ones' sizes
        runs["c32 varied"] = (32, [_shorter(r, prompt, new) for r in runs["c32 varied"][1]])
    out = {}
    with launcher(port, *flags) as server:
        for name, (concurrency, requests) in runs.items():
            before = decode_totals(server.url)
            results, seconds = asyncio.run(
                run_load(server.url, "tgi", requests, concurrency, None, 3600)
            )
            out[name] = summarize(results, seconds, name)
            out[name]["decode_means_s"] = decode_means(before, decode_totals(server.url))
    return out


def table(model_dir: Path, dtype: str, threads: int, port: int, scale: float) -> str:
    shapes = model_shapes(model_dir)
    torch_dtype = getattr(torch, dtype)
    before = machine(shapes, torch_dtype, threads)
    prompt = 128 if scale >= 1 else max(8, int(128 * scale))
    # a median of at least 16 steps, even in a quick run (4 at --scale 0.06 before)
    step, products = step_ms(model_dir, dtype, prompt, max(16, int(64 * scale)), shapes)
    step /= 1e3
    served = serve(model_dir, dtype, port, scale)
    after = machine(shapes, torch_dtype, threads)  # shared machines drift within minutes
    bandwidth = max(before[0], after[0])  # each bound from the faster reading
    rates = {m: max(before[1][m][0], after[1][m][0]) for m in before[1]}
    weight_bytes = shapes.params * BYTES[dtype]
    rows = [
        ("read bandwidth", f"{before[0] / 1e9:.1f} GB/s", "", "", ""),
        ("read bandwidth after serving", f"{after[0] / 1e9:.1f} GB/s", "", "", ""),
        *[
            (
                f"matmul rate, M = {m}, before / after serving",
                f"{before[1][m][0] / 1e9:.1f} / {after[1][m][0] / 1e9:.1f} GFLOP/s",
                "",
                "",
                " / ".join(dict.fromkeys([before[1][m][1], after[1][m][1]])),
            )
            for m in before[1]
        ],
    ]
    tpot = served["c1"]["tpot_s"]["median"]
    bound = weight_bytes / bandwidth
    rows.append(("TPOT p50, concurrency 1", f"{tpot * 1e3:.1f} ms", f"{bound * 1e3:.1f} ms",
                 f"{tpot / bound:.2f}x", "<= 1.25x"))  # fmt: skip
    rows.append(("decode step in-process, batch 1", f"{step * 1e3:.1f} ms",
                 f"{bound * 1e3:.1f} ms", f"{step / bound:.2f}x", ""))  # fmt: skip
    if products is not None:  # the in-process step split: the weights' products and the rest
        products /= 1e3
        rows.append(("its weight products alone, back to back", f"{products * 1e3:.1f} ms",
                     f"{bound * 1e3:.1f} ms", f"{products / bound:.2f}x", ""))  # fmt: skip
        rows.append(("the rest of the in-process step (step - products)",
                     f"{(step - products) * 1e3:.1f} ms", "", "", ""))  # fmt: skip
    rows.append(("serving path at c=1 (TPOT - step)", f"{(tpot - step) * 1e3:.1f} ms", "", "",
                 ""))  # fmt: skip
    rows += _serving_split(served["c1"], "c=1", tpot, bound)
    itl = served["c32"]["itl_s"]["median"]
    bound = shapes.flops(32) / rates[32]
    rows.append(("decode step of 32 (ITL p50, c=32)", f"{itl * 1e3:.1f} ms",
                 f"{bound * 1e3:.1f} ms", f"{bound / itl:.0%} of rate", ">= 60%"))  # fmt: skip
    # the same step against the roofline: its reads (the weights and 32 requests' K/V at
    # their mean context while decoding, prompt + new / 2) bound it as well as its FLOPs
    new = served["c32"]["output_tokens"] / max(1, served["c32"]["completed"])
    read = shapes.step_bytes(BYTES[dtype], 32, prompt + new / 2)
    rows.append(_roofline("decode step of 32, roofline", itl, bound, read / bandwidth, read))
    rows += _serving_split(served["c32"], "c=32", itl, None)
    ttft = served["c1"]["ttft_s"]["median"]
    bound = shapes.prefill_flops(prompt) / rates[128]
    rows.append((f"prefill of {prompt} (TTFT p50, c=1)", f"{ttft * 1e3:.1f} ms",
                 f"{bound * 1e3:.1f} ms", f"{bound / ttft:.0%} of rate", ">= 60%"))  # fmt: skip
    read = shapes.step_bytes(BYTES[dtype], 0, 0)
    rows.append(_roofline(f"prefill of {prompt}, roofline", ttft, bound, read / bandwidth, read))
    for name in ("c8", "c32", "c32 varied"):
        s = served[name]
        rows.append((f"output tok/s, {name}", f"{s['output_token_throughput']:.1f}", "", "",
                     f"TTFT p50 {s['ttft_s']['median']:.2f} s"))  # fmt: skip
    failures = sum(sum(s["failures"].values()) for s in served.values())
    lines = [
        f"{cpu_line()}; {threads} threads; {model_dir.name}, {dtype}; "
        f"{shapes.params / 1e6:.0f}M matmul parameters ({weight_bytes / 1e6:.0f} MB); "
        f"failures {failures}",
        "",
        "| figure | measured | bound | ratio | goal or note |",
        "|---|---:|---:|---:|---|",
        *[f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows],
    ]
    return "\n".join(lines)


def _roofline(
    name: str, measured: float, compute: float, memory: float, read: float
) -> tuple[str, ...]:
    """A row for `measured` seconds against the larger of its FLOPs' time at the measured
    rate (`compute`) and its reads' time at the measured bandwidth (`memory`, `read` bytes):
    the bound the machine sets when a step is bound by memory rather than arithmetic."""
    bound = max(compute, memory)
    side = "memory" if memory > compute else "compute"
    return (name, f"{measured * 1e3:.1f} ms", f"{bound * 1e3:.1f} ms",
            f"{bound / measured:.0%} of roofline",
            f"{side}-bound: FLOPs {compute * 1e3:.1f} ms, reads {read / 1e6:.0f} MB "
            f"{memory * 1e3:.1f} ms")  # fmt: skip


def _serving_split(
    served: dict, load: str, step_gap: float, bound: float | None
) -> list[tuple[str, ...]]:
    """Where a served step's time goes, from the router's means over the run: the shard's
    step (forward and token choice, as it reports them), the gRPC round trip with the
    shard's handler (the router's Decode call less that step), and the router between
    calls (`step_gap`, a TPOT or ITL p50, less the call). On 2 cores the last two also take
    CPU from the forward; `bound`: the step's own bound, for a ratio."""
    means = served["decode_means_s"]
    shard = means["forward"] + means["choice"]
    ratio = f"{shard / bound:.2f}x" if bound else ""
    return [(f"shard step served, {load} (forward + token choice, mean)", f"{shard * 1e3:.1f} ms",
             f"{bound * 1e3:.1f} ms" if bound else "", ratio, ""),
            (f"gRPC and shard handler, {load} (router's Decode call - shard step)",
             f"{(means['call'] - shard) * 1e3:.2f} ms", "", "", ""),
            (f"router between Decode calls, {load} (p50 gap - call)",
             f"{(step_gap - means['call']) * 1e3:.2f} ms", "", "", "")]  # fmt: skip


def main() -> None:
    from shard.embedded import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="model directory [default: SmolLM2]")
    parser.add_argument("--dtype", choices=sorted(BYTES), default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--port", type=int, default=3017)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the requests and tokens (tests use a small one)")  # fmt: skip
    parser.add_argument("--append", action="store_true", help="add the table to RESULTS.md")
    args = parser.parse_args()
    model_dir = Path(args.model_id) if args.model_id else default_model_dir()
    text = table(model_dir, args.dtype, args.threads, args.port, args.scale)
    print(text)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(f"\n### cpu_limits.py ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
