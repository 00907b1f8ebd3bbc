"""What constrained generation costs in the shard, on SmolLM2 (float32, CPU):

- a decode step of 8 rows under a JSON schema against the same step with 8 free rows
  (median over steps, in one run; the free rows ignore EOS so both batches stay 8 wide);
- compiling a 20-property schema the first time (a fresh compiler: the tokenizer's
  llguidance view is built separately, once per shard) and the second time (cached).

    .venv/bin/python benchmarks/grammar_cost.py [--steps 24]

Run with nothing else on the machine (see ../shared/BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.grammar_engines import schema_with_20_properties  # noqa: E402
from common.config import ShardConfig  # noqa: E402
from common.grammar import json_schema_spec  # noqa: E402
from shard.batch import RequestSpec  # noqa: E402
from shard.embedded import default_model_dir  # noqa: E402
from shard.engine import ShardEngine  # noqa: E402
from shard.grammar import GrammarCompiler  # noqa: E402
from shard.sampling import SamplingParams  # noqa: E402

ROWS = 8
PROMPT = "Describe a record as JSON with the fields asked for:"


def decode_step_ms(engine: ShardEngine, constrained: bool, steps: int) -> float:
    grammar = json_schema_spec(schema_with_20_properties()) if constrained else None
    specs = [
        RequestSpec(id=i, inputs=PROMPT, sampling=SamplingParams(), max_new_tokens=steps + 2,
                    ignore_eos=not constrained, grammar=grammar, add_special_tokens=False)
        for i in range(ROWS)
    ]  # fmt: skip
    result = engine.prefill(1, specs, None)
    batch, times = result.batch, []
    for _ in range(steps):
        assert batch is not None and len(batch.request_ids) == ROWS, "a row ended early"
        start = time.perf_counter()
        result = engine.decode([batch.id])
        times.append(time.perf_counter() - start)
        batch = result.batch
    engine.clear(None)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    model_dir = default_model_dir()
    engine = ShardEngine(ShardConfig(model_dir=str(model_dir), kv_cache_memory=256 << 20))
    engine.warmup([], None, 512, 1024)
    spec = json_schema_spec(schema_with_20_properties())
    compiler = GrammarCompiler(engine.tokenizer, engine.model_spec.vocab_size, [2])
    start = time.perf_counter()
    compiler.compile(json_schema_spec({"type": "object"}))  # builds the tokenizer view
    view_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    compiler.compile(spec)
    first_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    compiler.compile(spec)
    cached_ms = (time.perf_counter() - start) * 1e3
    decode_step_ms(engine, False, 4)  # warm
    free = decode_step_ms(engine, False, args.steps)
    constrained = decode_step_ms(engine, True, args.steps)
    print(f"tokenizer view (once per shard): {view_ms:.0f} ms")
    print(f"20-property schema: first compile {first_ms:.1f} ms, cached {cached_ms:.2f} ms")
    print(f"decode step, {ROWS} rows: free {free:.1f} ms, constrained {constrained:.1f} ms, "
          f"ratio {constrained / free:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
