"""A decoding batch's next step run before its call (ShardEngine.step_ahead): every call
that can follow it returns exactly what it returns without it."""

from __future__ import annotations

import dataclasses

import pytest

from shard.sampling import SamplingParams
from tests.helpers import Collector, make_engine, spec
from tests.test_engine_tiny import PROMPTS


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def _specs(max_new=(9, 4, 12), **options):
    seeded = SamplingParams(do_sample=True, temperature=0.9, top_k=20, seed=7)
    return [
        spec(0, PROMPTS[0], max_new[0], ignore_eos=True, **options),
        spec(1, PROMPTS[1], max_new[1], ignore_eos=True, sampling=seeded, **options),
        spec(2, PROMPTS[2], max_new[2], **options),  # may end at EOS
    ]


def _run(engine, specs, ahead: bool) -> Collector:
    """Prefill then decode to the end as the router does (finished requests filtered away);
    with `ahead`, each reply is followed by step_ahead, as the shard's server queues it."""
    collector = Collector()
    result = engine.prefill(1, specs, None)
    while True:
        collector.add(result)
        if result.batch is None:
            return collector
        if ahead:  # every row decodes one token here (no chunked prompt): it steps
            assert engine.step_ahead(result.batch.id)
        info = result.batch
        keep = [i for i in info.request_ids if i not in collector.finished]
        if len(keep) < len(info.request_ids):
            info = engine.filter(info.id, keep)
        result = engine.decode([info.id])


def test_tokens_and_logprobs_equal_without_it(engine):
    plain = _run(engine, _specs(), ahead=False)
    ahead = _run(engine, _specs(), ahead=True)
    assert ahead.tokens == plain.tokens
    assert ahead.logprobs == plain.logprobs
    assert ahead.finished == plain.finished
    assert not engine.batches and engine._ahead is None
    assert engine.blocks_all_back()


def test_a_filter_drops_the_left_requests_step(engine):
    """A request that leaves (its client went away) after the step ran ahead: its token is
    never reported, the others' are."""
    reference = _run(engine, _specs(max_new=(6, 6, 6)), ahead=False).tokens
    collector = Collector()
    first = engine.prefill(1, _specs(max_new=(6, 6, 6)), None)
    collector.add(first)
    assert engine.step_ahead(1)
    kept = engine.filter(1, [0, 2])
    assert kept.request_ids == [0, 2]
    result = engine.decode([1])
    assert sorted(g.request_id for g in result.generations) == [0, 2]
    collector.add(result)
    while result.batch is not None:
        engine.step_ahead(result.batch.id)
        result = engine.decode([result.batch.id])
        collector.add(result)
    assert collector.tokens[0] == reference[0] and collector.tokens[2][:6] == reference[2][:6]
    assert collector.tokens[1] == reference[1][:1]
    assert not engine.batches and engine.blocks_all_back()


@pytest.mark.parametrize("join", ["prefill-into", "decode-merge"])
def test_new_requests_join_a_batch_that_stepped_ahead(engine, join):
    """The router adds requests to the running batch with a Prefill naming it (chunking
    routers) or with a Prefill of their own and a Decode merging both: the running rows
    take the step that ran ahead, the new ones are computed, all as without it."""
    alone = {
        i: _run(engine, [spec(i, PROMPTS[i], 8, ignore_eos=True)], ahead=False).tokens[i]
        for i in range(3)
    }
    collector = Collector()
    collector.add(engine.prefill(1, [spec(0, PROMPTS[0], 8, ignore_eos=True)], None))
    collector.add(engine.decode([1]))
    assert engine.step_ahead(1)
    new = [spec(i, PROMPTS[i], 8, ignore_eos=True) for i in (1, 2)]
    if join == "prefill-into":
        result = engine.prefill(2, new, 1)
    else:
        collector.add(engine.prefill(2, new, None))
        assert not engine.step_ahead(2)  # one at a time: batch 1's is pending
        result = engine.decode([2, 1])
    assert sorted(g.request_id for g in result.generations) == [0, 1, 2]
    collector.add(result)
    while result.batch is not None:
        engine.step_ahead(result.batch.id)
        keep = [i for i in result.batch.request_ids if i not in collector.finished]
        info = result.batch
        if len(keep) < len(info.request_ids):
            info = engine.filter(info.id, keep)
        result = engine.decode([info.id])
        collector.add(result)
    assert collector.tokens == alone
    assert not engine.batches and engine.blocks_all_back()


def test_a_batch_that_ends_in_its_step_ahead_ends_at_the_next_decode(engine):
    first = engine.prefill(1, [spec(0, PROMPTS[0], 2, ignore_eos=True)], None)
    assert engine.step_ahead(1)
    assert 1 in engine.batches  # kept until the router asks
    result = engine.decode([1])
    assert result.batch is None and result.generations[0].finished is not None
    assert len(first.generations) == 1 and not engine.batches
    assert engine.blocks_all_back()


def test_an_error_in_a_step_ahead_is_the_next_calls(engine, tmp_path):
    runner = engine.runner
    saved = runner.config
    runner.config = dataclasses.replace(saved, fault_file=str(tmp_path / "f"))
    try:
        engine.prefill(1, [spec(0, PROMPTS[0], 8, ignore_eos=True)], None)
        (tmp_path / "f").write_text("")  # the next forward fails
        assert engine.step_ahead(1)  # never raises
        assert isinstance(engine._ahead.error, RuntimeError)
        with pytest.raises(RuntimeError, match="injected fault"):
            engine.decode([1])
    finally:
        runner.config = saved
    engine.clear(1)
    assert not engine.batches and engine._ahead is None and engine.blocks_all_back()


def test_clear_drops_it_and_chunked_prompts_do_not_step_ahead(engine):
    engine.prefill(1, [spec(0, PROMPTS[0], 8, ignore_eos=True)], None)
    assert engine.step_ahead(1)
    engine.clear(None)
    assert engine._ahead is None and not engine.batches
    chunked = engine.prefill(2, [spec(0, PROMPTS[2], 8, ignore_eos=True, chunk_len=4)], None)
    assert not chunked.generations  # the prompt is still being computed
    assert not engine.step_ahead(2)
    engine.clear(None)
    assert engine.blocks_all_back()


def test_a_batch_of_more_rows_than_the_limit_does_not_step_ahead(engine):
    """`max_rows` (--step-ahead-rows) counts the batch's unfinished requests: over it the
    step waits for its call; once requests finish and leave, the batch steps ahead again."""
    engine.prefill(1, _specs(max_new=(2, 6, 6)), None)
    assert not engine.step_ahead(1, max_rows=2)
    assert engine._ahead is None
    result = engine.decode([1])  # request 0's last token: it finished
    assert [g.request_id for g in result.generations if g.finished] == [0]
    assert engine.step_ahead(1, max_rows=2)  # two unfinished rows left
    engine.clear(None)
    engine.prefill(2, _specs(max_new=(6, 6, 6)), None)
    assert engine.step_ahead(2, max_rows=3)
    engine.clear(None)
    assert engine.blocks_all_back()


@pytest.mark.parametrize(
    ("on", "rows", "requests", "ahead"),
    [(True, 2, 1, True), (False, 2, 1, False), (True, 1, 2, False), (True, 0, 2, True)],
)
async def test_the_server_queues_it_before_replying(engine, tmp_path, on, rows, requests, ahead):
    """Through gRPC: after a Prefill's reply the batch's next step has run (or is running)
    on the engine thread, ahead of any later call; `--no-step-ahead` turns it off, and
    `--step-ahead-rows` leaves batches of more unfinished requests to their calls (0: any)."""
    import grpc

    from common.config import ShardConfig
    from common.pb import pb, pb_grpc
    from shard.server import TextGenerationService
    from tests.test_grpc import _request

    config = ShardConfig(
        model_dir=engine.config.model_dir,
        uds_path=str(tmp_path / "s"),
        step_ahead=on,
        step_ahead_rows=rows,
    )
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationService(engine.engine, config), server
    )
    server.add_insecure_port(config.url)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(config.url) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            blocks = [engine.pool.allocate(16) for _ in range(requests)]
            batch = pb.Batch(
                id=9,
                requests=[
                    _request(5 + i, PROMPTS[i], 6, blocks=blocks[i], slots=[])
                    for i in range(requests)
                ],
            )
            pre = await stub.Prefill(pb.PrefillRequest(batch=batch))
            await stub.Health(pb.HealthRequest())  # after whatever the engine thread had queued
            assert (engine._ahead is not None) == ahead
            tokens = [g.tokens.ids[0] for g in pre.generations]
            batch = pre.batch
            while pre.HasField("batch"):
                pre = await stub.Decode(pb.DecodeRequest(batches=[batch]))
                tokens += [g.tokens.ids[0] for g in pre.generations]
                batch = pre.batch
            assert len(tokens) == 6 * requests
            for owned in blocks:
                engine.pool.free(owned)
    finally:
        await server.stop(None)
    assert not engine.batches and engine._ahead is None


@pytest.mark.slow
def test_the_benchmark_fills_its_table(tiny_model_dir):
    """benchmarks/step_ahead.py on the tiny model, briefly (comparing another setting, as
    it can): both settings served every request at each concurrency and every cell holds a
    number."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ahead.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model-id", str(tiny_model_dir), "--prompt", "8",
         "--new", "8", "--rounds", "1", "--requests-per-client", "1", "--concurrency", "1",
         "--concurrency", "2", "--port", str(free_port()), "--flag", "huge-pages"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "cores" in lines[0] and "float32" in lines[0] and "--huge-pages on and off" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line]
    assert [cells[0].strip() for cells in rows[1:]] == ["1", "2"]
    for cells in rows[1:]:
        assert all(cell.strip()[0].isdigit() for cell in cells), cells


@pytest.mark.slow
def test_served_texts_equal_without_it(tiny_model_dir, tmp_path):
    """Through pytgi-launcher and the router, concurrent requests (greedy and seeded, length
    and stop-sequence ends, one cancelled midway) give the same texts with the step ahead."""
    import asyncio

    import httpx

    from tests.conftest import LauncherServer

    bodies = [
        {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 12, "ignore_eos": True}},
        {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 5, "ignore_eos": True}},
        {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 9, "do_sample": True,
                                              "seed": 3, "ignore_eos": True}},
    ]  # fmt: skip

    async def serve(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def cancelled() -> None:  # leaves after its first tokens
                body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 200}}
                async with client.stream("POST", "/generate_stream", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data:"):
                            break

            replies = await asyncio.gather(
                cancelled(), *(client.post("/generate", json=b) for b in bodies)
            )
            return [r.json()["generated_text"] for r in replies[1:]]

    texts = {}
    for setting in ("--no-step-ahead", "--step-ahead"):
        workdir = tmp_path / setting.lstrip("-")
        workdir.mkdir()
        args = ["--model-id", str(tiny_model_dir), "--max-total-tokens", "1024", setting]
        srv = LauncherServer(workdir, [*args, "--max-input-tokens", "100"])
        try:
            texts[setting] = asyncio.run(serve(srv.url))
            texts[setting].append(asyncio.run(serve(srv.url))[0])  # a second round, warm
        finally:
            srv.stop()
    assert texts["--step-ahead"] == texts["--no-step-ahead"]
    assert all(texts["--step-ahead"])
