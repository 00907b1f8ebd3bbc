"""The batch protocol on a tiny random-weight model: fast, exhaustive checks."""

from __future__ import annotations

import pytest

from shard.errors import BatchNotFound, InvalidRequest, NotReady
from shard.sampling import SamplingParams
from shard.stopping import FinishReason
from tests.helpers import Collector, drive, make_engine, run_to_end, spec

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello",
    "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


def _alone(engine, text, max_new=8, **options):
    return run_to_end(engine, 999, [spec(1, text, max_new, **options)]).tokens[1]


def test_batch_equals_alone(engine):
    alone = [_alone(engine, p, ignore_eos=True) for p in PROMPTS]
    together = run_to_end(engine, 1, [spec(i, p, ignore_eos=True) for i, p in enumerate(PROMPTS)])
    assert [together.tokens[i] for i in range(len(PROMPTS))] == alone
    assert not engine.batches
    assert engine.blocks_all_back()  # every block came back


def test_join_mid_flight_and_leave(engine):
    alone = {i: _alone(engine, p, 10, ignore_eos=True) for i, p in enumerate(PROMPTS)}
    c = Collector()
    first = engine.prefill(1, [spec(0, PROMPTS[0], 10, ignore_eos=True)], None)
    c.add(first)
    step = engine.decode([first.batch.id])
    c.add(step)
    joined = engine.prefill(2, [spec(i, PROMPTS[i], 10, ignore_eos=True) for i in (1, 2, 3)], None)
    c.add(joined)
    batch = engine.decode([step.batch.id, joined.batch.id])  # merge old and new
    c.add(batch)
    assert sorted(batch.batch.request_ids) == [0, 1, 2, 3]
    kept = engine.filter(batch.batch.id, [0, 2, 3])  # request 1 leaves early
    assert kept.request_ids == [0, 2, 3]
    info = kept
    while info is not None:
        result = engine.decode([info.id])
        c.add(result)
        info = result.batch
        if info is not None:
            keep = [i for i in info.request_ids if i not in c.finished]
            if len(keep) < len(info.request_ids):
                info = engine.filter(info.id, keep)
    for i in (0, 2, 3):
        assert c.tokens[i] == alone[i]
    assert c.tokens[1] == alone[1][: len(c.tokens[1])]
    assert engine.blocks_all_back()


def test_chunked_prefill_equals_plain(engine):
    text = PROMPTS[3]
    plain = _alone(engine, text, 6, ignore_eos=True)
    c = Collector()
    n_prompt = len(engine.tokenizer.encode(text, add_special_tokens=False).ids)
    chunk = -(-n_prompt // 3)
    result = engine.prefill(1, [spec(1, text, 6, ignore_eos=True, chunk_len=chunk)], None)
    assert result.generations == []  # no token until the prompt is done
    assert result.batch.current_tokens == chunk
    result = engine.decode([1])
    assert result.generations == []
    result = engine.decode([1])
    c.add(result)
    assert len(c.tokens[1]) == 1
    while result.batch is not None:
        result = engine.decode([result.batch.id])
        c.add(result)
    assert c.tokens[1] == plain


def test_chunk_rides_along_with_decode(engine):
    """A chunked prompt merged into a decoding batch via Prefill(cached_batch)."""
    plain = {i: _alone(engine, p, 6, ignore_eos=True) for i, p in enumerate(PROMPTS[:2])}
    c = Collector()
    first = engine.prefill(1, [spec(0, PROMPTS[0], 6, ignore_eos=True)], None)
    c.add(first)
    merged = engine.prefill(2, [spec(1, PROMPTS[1], 6, ignore_eos=True, chunk_len=1)], 1)
    c.add(merged)
    assert merged.batch.id == 1 and merged.batch.request_ids == [0, 1]
    info = merged.batch
    while info is not None:
        result = engine.decode([info.id])
        c.add(result)
        info = result.batch
        if info is not None and any(i in c.finished for i in info.request_ids):
            info = engine.filter(info.id, [i for i in info.request_ids if i not in c.finished])
    assert c.tokens == plain


def test_prefix_cache_len_equals_plain(engine):
    """Request 2 reuses the blocks request 1 wrote for a shared prefix (cache_len)."""
    bs = engine.block_size
    prefix = PROMPTS[3]
    full = prefix + " 26 27 28"
    plain = _alone(engine, full, 5, ignore_eos=True)
    prefix_ids = engine.tokenizer.encode(prefix, add_special_tokens=False).ids
    cached_blocks = len(prefix_ids) // bs
    assert cached_blocks >= 1
    blocks_a = list(range(1, 8))
    run_to_end(engine, 1, [spec(1, prefix, 1, blocks=blocks_a)])
    blocks_b = blocks_a[:cached_blocks] + list(range(20, 26))
    c = run_to_end(
        engine,
        2,
        [spec(2, full, 5, ignore_eos=True, blocks=blocks_b, cache_len=cached_blocks * bs)],
    )
    assert c.tokens[2] == plain


def test_seeded_sampling_alone_equals_batch_of_8(engine):
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = _alone(engine, PROMPTS[0], 8, sampling=params, ignore_eos=True)
    others = [
        spec(i, PROMPTS[i % 4], 8, ignore_eos=True, sampling=SamplingParams(do_sample=True, seed=i))
        for i in range(2, 9)
    ]
    c = run_to_end(engine, 1, [spec(1, PROMPTS[0], 8, sampling=params, ignore_eos=True), *others])
    assert c.tokens[1] == alone
    assert c.finished[1].seed == 1234


def test_logprobs_top_n_and_prefill_logprobs(engine):
    c = run_to_end(engine, 1, [spec(1, PROMPTS[0], 3, top_n_tokens=3, prefill_logprobs=True)])
    first = c.generations[1][0]
    prompt_ids = engine.tokenizer.encode(PROMPTS[0], add_special_tokens=False).ids
    assert first.prefill_tokens.ids == prompt_ids
    assert len(first.prefill_tokens.logprobs) == len(prompt_ids)
    assert all(lp <= 0 for lp in first.prefill_tokens.logprobs[1:])
    for g in c.generations[1]:
        top = g.top_tokens[0]
        assert len(top.ids) == 3 and top.logprobs == sorted(top.logprobs, reverse=True)
        assert g.tokens.ids[0] == top.ids[0]  # greedy picks the most likely
        assert g.tokens.logprobs[0] == pytest.approx(top.logprobs[0])
    assert c.generations[1][1].prefill_tokens is None


def test_stop_sequence_and_length(engine):
    c = run_to_end(engine, 1, [spec(1, PROMPTS[0], 12, ignore_eos=True)])
    text = c.finished[1].text
    assert c.finished[1].finish_reason == FinishReason.LENGTH
    assert c.finished[1].generated_tokens == 12
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        c2 = run_to_end(
            engine, 2, [spec(2, PROMPTS[0], 12, ignore_eos=True, stop_sequences=[stop])]
        )
        assert c2.finished[2].finish_reason == FinishReason.STOP_SEQUENCE
        assert stop in c2.finished[2].text


def test_only_own_requests_answered(tiny_model_dir):
    """With world_size 2, rank 1 answers only for odd ids (the batch itself advances fully)."""
    from shard.parallel import Parallel

    engine = make_engine(tiny_model_dir)
    engine.runner.parallel = Parallel(rank=1, world_size=2)
    result = engine.prefill(1, [spec(i, PROMPTS[i], 2) for i in range(4)], None)
    assert sorted(g.request_id for g in result.generations) == [1, 3]
    assert result.batch.request_ids == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "make_call, error, message",
    [
        (lambda e: e.decode([424242]), BatchNotFound, "batch 424242 not found"),
        (lambda e: e.filter(424242, []), BatchNotFound, "not found"),
        (lambda e: e.prefill(1, [], None), InvalidRequest, "at least one request"),
    ],
)
def test_bad_call_is_a_clear_error_and_engine_keeps_serving(engine, make_call, error, message):
    with pytest.raises(error, match=message):
        make_call(engine)
    engine.clear(None)
    assert engine.blocks_all_back()
    assert run_to_end(engine, 5, [spec(5, PROMPTS[1], 2)]).finished[5].generated_tokens == 2


BAD_REQUESTS = [
    (spec(1, ""), "input is empty"),
    (spec(1, "hi", 40, blocks=[1]), "needs 3 blocks"),
    (spec(1, "hi", blocks=[0, 1]), "block 0 is reserved"),
    (spec(1, "hi", 0), "max_new_tokens"),
    (spec(1, "hi", cache_len=5), "cache_len"),
    (spec(1, "hi", sampling=SamplingParams(do_sample=True, temperature=0)), "temperature"),
    (spec(1, "hi", sampling=SamplingParams(top_p=1.5)), "top_p"),
    (spec(1, "hi", sampling=SamplingParams(top_p=0.0)), "top_p"),
    (spec(1, "x " * 2000), "max_input_tokens"),
    (spec(1, "hi", 10**6), "max_total_tokens"),
    (spec(1, "hi", blocks=[1, 1]), "appears twice"),
    (spec(1, "hi", blocks=[1], slots=[17]), "slots disagree"),
    (spec(1, "hi", top_n_tokens=2**32 - 1), "top_n_tokens"),
    (spec(1, "hi", input_ids=[5, 2**32 - 1]), "outside the vocabulary"),
    (spec(1, "hi", unsupported="request 1: watermark is not supported"), "watermark"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_a_bad_request_is_refused_alone_while_the_running_batch_goes_on(engine, bad, message):
    """The offender joins a running batch with a good newcomer: only it is refused; the
    others' tokens equal their tokens without it, and every block comes back."""
    import copy

    expected = run_to_end(engine, 9, [spec(7, PROMPTS[0], 6, ignore_eos=True)]).tokens[7]
    expected_new = run_to_end(engine, 9, [spec(8, PROMPTS[2], 4, ignore_eos=True)]).tokens[8]
    c = Collector()
    first = engine.prefill(1, [spec(7, PROMPTS[0], 6, ignore_eos=True)], None)
    c.add(first)
    joined = engine.prefill(
        2, [copy.deepcopy(bad), spec(8, PROMPTS[2], 4, ignore_eos=True)], first.batch.id
    )
    assert [r.request_id for r in joined.refused] == [1]
    assert message in joined.refused[0].message
    assert 1 not in joined.batch.request_ids and 1 not in [g.request_id for g in joined.generations]
    c.add(joined)
    drive(engine, c, joined.batch)
    assert c.tokens[7] == expected and c.tokens[8] == expected_new
    assert not engine.batches
    assert engine.blocks_all_back()


def test_a_prefill_whose_requests_are_all_refused_holds_nothing(engine):
    result = engine.prefill(3, [spec(1, ""), spec(2, "hi", 0)], None)
    assert [r.request_id for r in result.refused] == [1, 2]
    assert result.batch is None and not result.generations and not engine.batches


def test_a_request_id_twice_refuses_the_second(engine):
    result = engine.prefill(3, [spec(1, "hi", 2), spec(1, "yo", 2)], None)
    assert [r.request_id for r in result.refused] == [1]
    assert "already in use" in result.refused[0].message
    assert result.batch.request_ids == [1]
    engine.clear(None)


def test_out_of_blocks_and_not_ready(tiny_model_dir):
    """Shard-numbered blocks (a client without an allocator) run out with a clear refusal."""
    engine = make_engine(tiny_model_dir, kv_bytes=1 << 20).engine
    blocks = engine.runner.kv.num_blocks
    result = engine.prefill(1, [spec(i, "hi", 1000) for i in range(blocks)], None)
    assert result.refused and all("free" in r.message for r in result.refused)
    assert len(result.refused) + len(result.batch.request_ids) == blocks
    engine.clear(None)
    assert len(engine.admission.free_blocks) == blocks - 1


def test_shard_numbered_blocks_come_back_in_ascending_runs(tiny_model_dir):
    """A client without an allocator (TGI's benchmark tool): a request's blocks ascend, and
    a freed run is handed out in the same order again."""
    engine = make_engine(tiny_model_dir, kv_bytes=1 << 20).engine
    first = engine.prefill(1, [spec(1, "hi", 100)], None)
    taken = engine.batches[first.batch.id].requests[0].blocks
    assert len(taken) > 2 and taken == sorted(taken)
    engine.clear(None)
    again = engine.prefill(2, [spec(2, "hi", 100)], None)
    assert engine.batches[again.batch.id].requests[0].blocks == taken
    engine.clear(None)
    from common.config import ShardConfig
    from shard.engine import ShardEngine

    cold = ShardEngine(ShardConfig(model_dir=str(tiny_model_dir)))
    with pytest.raises(NotReady, match="Warmup"):
        cold.prefill(1, [spec(1, "hi")], None)


def test_blocks_a_live_request_writes_are_refused_and_a_computed_prefix_is_shared(
    tiny_model_dir,
):
    """The router owns the pool; the shard still refuses a Prefill whose blocks would
    overwrite a live request's K/V, or read K/V a live request has not written yet."""
    engine = make_engine(tiny_model_dir).engine  # blocks named by hand below
    alone = engine.prefill(9, [spec(9, "hi", 2)], None)  # shard-numbered: a fresh pool
    assert not alone.refused
    engine.clear(None)
    prompt = PROMPTS[3]  # 65 tokens, prefilled 16 at a time: after one step block 1 is done
    assert len(engine.tokenizer.encode(prompt, add_special_tokens=False).ids) == 65
    first = engine.prefill(
        1, [spec(1, prompt, 8, ignore_eos=True, blocks=[1, 2, 3, 4, 5], chunk_len=16)], None
    )
    assert not first.refused
    clash = engine.prefill(2, [spec(2, "hi", 4, blocks=[5])], None)
    assert "KV block 5 is held by live request 1" in clash.refused[0].message
    early = engine.prefill(3, [spec(3, prompt, 2, blocks=[1, 2, 6, 7, 8], cache_len=32)], None)
    assert "KV block 2 is still being written by request 1" in early.refused[0].message
    shared = engine.prefill(4, [spec(4, prompt, 2, blocks=[1, 6, 7, 8, 9], cache_len=16)], None)
    assert not shared.refused  # block 1 holds request 1's computed tokens: read-only
    again = engine.prefill(5, [spec(5, "hi", 4, blocks=[1])], None)
    assert "KV block 1 is held" in again.refused[0].message  # shared, never writable
    engine.clear(None)
    reuse = engine.prefill(6, [spec(6, "hi", 4, blocks=[5])], None)
    assert not reuse.refused  # released with its request
    engine.clear(None)
    assert not engine.admission.claims.held
    # once the router named blocks, the shard numbers none (they could be its cached prefix)
    unnamed = engine.prefill(7, [spec(7, "hi", 2)], None)
    assert "names no KV blocks" in unnamed.refused[0].message
    engine.warmup([], None, 256, 1024)  # a new pool: no owner yet
    assert not engine.prefill(8, [spec(8, "hi", 2)], None).refused


def test_disable_custom_kernels_takes_pytorch_paths_to_the_same_tokens(tiny_model_dir):
    from shard.errors import InvalidRequest
    from shard.models.ops import TorchOps

    plain = make_engine(tiny_model_dir, disable_custom_kernels=True)
    assert (
        isinstance(plain.runner.model.ops, TorchOps) and plain.info().attention_impl == "reference"
    )
    assert all(layer.qkv.kernels is None for layer in plain.runner.model.layers)  # no C++ GEMV
    default = make_engine(tiny_model_dir)
    specs = [spec(0, "The quick brown fox", 6, ignore_eos=True)]
    assert run_to_end(plain, 1, specs).tokens == run_to_end(default, 1, specs).tokens
    with pytest.raises(InvalidRequest, match="--disable-custom-kernels"):
        make_engine(tiny_model_dir, disable_custom_kernels=True, attention="triton")


def test_cpu_bf16_support_is_read_from_the_cpu_flags():
    from shard.cpu_kernels import has_bf16_instructions

    assert has_bf16_instructions("flags : fpu avx2 avx512f avx512_bf16 amx_tile")
    assert has_bf16_instructions("flags : fpu avx2 amx_bf16")
    assert not has_bf16_instructions("flags : fpu avx2 fma avx512f avx512bw")


def test_start_up_log_names_the_kernels_and_warns_of_slow_bf16(tiny_model_dir, caplog, monkeypatch):
    """Without bf16 instructions, bfloat16 layers widen their weights to float32 in our
    kernels (named in the report; the log warns that prefills can take longer than float32's);
    with our kernels off they take oneDNN's slow bfloat16 path, and the log says float32 is
    faster. With bf16 instructions, neither warning."""
    import logging

    from shard import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "has_bf16_instructions", lambda: False)
    with caplog.at_level(logging.INFO, logger="shard"):  # unpacked, as oneDNN leaves bf16 on AVX2
        engine = make_engine(tiny_model_dir, dtype="bfloat16", pack_linear=False)
    report = engine.runner.kernel_report()
    assert f"kernels: {report}" in caplog.text
    assert "attention reference" in report and "CpuOps" in report and "bfloat16 on cpu" in report
    assert "bfloat16 rows widened to float32" in report
    assert "float32 is faster" not in caplog.text
    assert "prefills can take longer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shard"):
        make_engine(tiny_model_dir, dtype="bfloat16", cpu_gemv=False, pack_linear=False)
    assert "--dtype float32 is faster" in caplog.text
    assert "prefills can take longer" not in caplog.text
    caplog.clear()
    monkeypatch.setattr(cpu_kernels, "has_bf16_instructions", lambda: True)
    with caplog.at_level(logging.INFO, logger="shard"):
        native = make_engine(tiny_model_dir, dtype="bfloat16", pack_linear=False)
    assert "float32 is faster" not in caplog.text and "prefills can take longer" not in caplog.text
    assert "widened" not in native.runner.kernel_report()  # native bf16: torch's own path
    plain = make_engine(tiny_model_dir, cpu_gemv=False, pack_linear=False).runner.kernel_report()
    assert "batch-1 rows: as the batched path" in plain
    assert "PyTorch linear (--no-pack-linear)" in plain


def test_start_up_log_names_amx_tiles_where_bfloat16_panels_take_them(tiny_model_dir):
    """bfloat16 panels on a CPU whose build holds AMX tiles (shard/csrc/amx.cpp) say so;
    float32 (the tiles multiply bfloat16 only) and CPUs without them do not."""
    from shard import cpu_kernels

    kernels = cpu_kernels.load()
    if "bfloat16" not in getattr(kernels, "panel_dtypes", ()):
        pytest.skip("no bfloat16 panels in this CPU's build (no AVX-512 BW)")
    report = make_engine(tiny_model_dir, dtype="bfloat16").runner.kernel_report()
    tiles = getattr(kernels, "amx_rows", 0) > 0 and kernels.amx_ready()
    assert "our panels" in report and ("AMX tiles from 1 row" in report) == tiles
    assert "AMX" not in make_engine(tiny_model_dir, dtype="float32").runner.kernel_report()


def test_bfloat16_panels_say_how_they_multiply_and_need_no_warning(tiny_model_dir, caplog):
    """Where the build has bfloat16 panels without bf16 dot products (AVX-512 F and BW alone)
    a bfloat16 model's products of several rows take them, widened to float32 in registers:
    the report says so and the shard does not warn that float32 is faster (oneDNN's bfloat16
    path, which that warning is for, is not taken)."""
    import logging

    from shard import cpu_kernels

    kernels = cpu_kernels.load()
    if "bfloat16" not in getattr(kernels, "panel_dtypes", ()):
        pytest.skip("no bfloat16 panels in this CPU's build (no AVX-512 BW)")
    with caplog.at_level(logging.INFO, logger="shard"):
        engine = make_engine(tiny_model_dir, dtype="bfloat16")
    layer = engine.runner.model.layers[0].qkv
    assert layer.panels is not None and not layer.is_packed and layer.plain is None
    report = engine.runner.kernel_report()
    widened = "bfloat16 widened to float32 multiply-adds" in report
    assert "our panels" in report and widened == kernels.panel_widens_bfloat16
    assert "float32 is faster" not in caplog.text
    assert "widened" not in make_engine(tiny_model_dir, dtype="float32").runner.kernel_report()


def test_fault_hook_files(engine, tmp_path):
    """Test-only hook: an empty file fails the next check once; `.rank<r>` only rank r's; a
    file of markers fails a prompt containing one, once per marker (the file stays)."""
    import dataclasses

    runner = engine.runner
    saved = runner.config
    runner.config = dataclasses.replace(saved, fault_file=str(tmp_path / "f"))
    try:
        (tmp_path / "f.rank0").write_text("")
        (tmp_path / "f.rank1").write_text("")
        with pytest.raises(RuntimeError, match="injected fault"):
            runner.check_fault()
        runner.check_fault()  # once: the file is gone
        assert (tmp_path / "f.rank1").exists()  # another rank's
        (tmp_path / "f").write_text("MARK-A\nMARK-B\n")
        runner.check_fault(("no marker here",))
        with pytest.raises(RuntimeError, match="MARK-B"):
            runner.check_fault(("x MARK-B y",))
        runner.check_fault(("x MARK-B y",))  # fired once for this marker
        with pytest.raises(RuntimeError, match="MARK-A"):
            runner.check_fault(("MARK-A",))
        assert (tmp_path / "f").exists()
    finally:
        runner.config = saved


@pytest.mark.parametrize("kv_bytes, expected", [(64 << 20, "context"), (1 << 18, "capacity")])
def test_unset_limits_follow_the_model_capped_by_the_kv_cache(
    tiny_model_dir, kv_bytes, expected, caplog
):
    """As TGI v3: max_total_tokens is the model's context (1024 here), or what the KV pool
    holds when that is less; max_input_tokens one less; both logged with the reason."""
    from common.config import ShardConfig
    from shard.engine import ShardEngine

    engine = ShardEngine(ShardConfig(model_dir=str(tiny_model_dir), kv_cache_memory=kv_bytes))
    with caplog.at_level("INFO", logger="shard"):
        result = engine.warmup([], None, 64, None)
    capacity = result.max_supported_total_tokens
    if expected == "context":
        assert capacity > 1024 and result.max_total_tokens == 1024
        assert "the model's context (max_position_embeddings)" in caplog.text
    else:
        assert capacity < 1024 and result.max_total_tokens == capacity
        assert "what the KV cache holds (the model's context is 1024)" in caplog.text
    assert result.max_input_tokens == result.max_total_tokens - 1
    assert engine.admission.max_total_tokens == result.max_total_tokens
