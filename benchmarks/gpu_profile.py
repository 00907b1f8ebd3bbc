"""Where a batch-1 decode step's time goes: torch.profiler over `engine.decode` calls, eager
and with CUDA graphs. Prints, per engine, the wall time per step, the device time per step
(the sum of its kernels) with the kernel count, and the top operations by device and host
time, so a step far over the HBM bound shows whether the host or the kernels hold it.

    python benchmarks/gpu_profile.py MODEL_DIR [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_decode import engine_for, prompts, release, release_memory, sync
from shard.batch import RequestSpec
from shard.engine import ShardEngine
from shard.sampling import SamplingParams


def _start(engine: ShardEngine, steps: int) -> None:
    ids = prompts(1, 128, engine.model_spec.vocab_size)[0]
    spec = RequestSpec(id=0, inputs="", input_ids=ids, sampling=SamplingParams(),
                       max_new_tokens=3 * steps + 16, ignore_eos=True)  # fmt: skip
    engine.prefill(1, [spec], None)
    for _ in range(5):
        engine.decode([1])
    sync()


def _report(name: str, engine: ShardEngine, steps: int, device: str) -> None:
    _start(engine, steps)
    started = time.perf_counter()
    for _ in range(steps):
        engine.decode([1])
    sync()
    wall_ms = (time.perf_counter() - started) / steps * 1000
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.decode([1])
        sync()
    engine.clear(None)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    device_ms = sum(e.device_time for e in kernels) / 1000 / steps  # microseconds in events
    print(f"\n## {name}: wall {wall_ms:.3f} ms/step, device {device_ms:.3f} ms/step in "
          f"{len(kernels) / steps:.0f} kernels/step (batch 1, {steps} steps)")  # fmt: skip
    if device == "cuda":
        print(
            events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60)
        )
    print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script")
    args = parser.parse_args()
    for name, graphs in [("eager", ()), ("CUDA graphs", (1, 2, 4, 8))]:
        engine = engine_for(args.model_dir, graphs, args.device)
        _report(name, engine, args.steps, args.device)
        release(engine)
        del engine
        release_memory()


if __name__ == "__main__":
    main()
