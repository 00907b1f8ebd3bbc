"""Grammar engines for constrained generation, measured on SmolLM2's 49k vocabulary.

For each engine installed (llguidance, outlines-core): the time to compile a 20-property
JSON schema the first time, and the time to compute one token mask while walking the
tokens of a document that schema accepts (greedy tokenization of the document), mean and
p99. Run with nothing else on the machine:

    .venv/bin/python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time

from tokenizers import Tokenizer

from shard.embedded import default_model_dir


def schema_with_20_properties() -> dict:
    kinds = [
        {"type": "string"},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
        {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
    ]
    properties = {f"field_{i}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": properties, "required": list(properties)}


def document() -> str:
    values: list[object] = ["hello world", 42, 3.5, True, "green", [1, 2], {"x": 1.5}]
    fields = {f"field_{i}": values[i % len(values)] for i in range(20)}
    return json.dumps(fields, separators=(",", ":"))  # compact, as the server's grammars


def stats(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"mean {statistics.mean(seconds) * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us"


def measure_llguidance(tokenizer: Tokenizer, ids: list[int]) -> None:
    """As the server uses it (common/grammar.py): our token bytes, compact JSON."""
    import llguidance

    from common.grammar import GrammarCache, json_schema_spec

    cache = GrammarCache(tokenizer, None, [2])
    start = time.perf_counter()
    cache.matcher(json_schema_spec({"type": "object"}))  # builds the tokenizer view
    tok_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = cache.matcher(json_schema_spec(schema_with_20_properties()))
    compile_s = time.perf_counter() - start
    times = []
    for token in ids:
        start = time.perf_counter()
        mask = matcher.compute_bitmask()
        times.append(time.perf_counter() - start)
        assert mask[token // 8] >> (token % 8) & 1, "the document's token is masked"
        assert matcher.consume_token(token), matcher.get_error()
    assert matcher.is_accepting()
    print(
        f"llguidance {llguidance.get_version() if hasattr(llguidance, 'get_version') else ''}: "
        f"tokenizer set-up {tok_s * 1e3:.0f} ms (once per model); schema compile "
        f"{compile_s * 1e3:.1f} ms; mask per token: {stats(times)} over {len(ids)} tokens"
    )


def byte_level_vocabulary(tokenizer: Tokenizer) -> dict[bytes, list[int]]:
    """outlines-core's vocabulary: each token's bytes (as pytgi reads them) -> its ids."""
    from common.grammar import token_bytes

    tokens, special = token_bytes(tokenizer, tokenizer.get_vocab_size())
    vocab: dict[bytes, list[int]] = {}
    for token_id, raw in enumerate(tokens):
        if token_id not in special and raw:
            vocab.setdefault(raw, []).append(token_id)
    return vocab


def measure_outlines_core(tokenizer: Tokenizer, ids: list[int], eos: int) -> None:
    import outlines_core

    vocab = byte_level_vocabulary(tokenizer)
    vocab.pop(tokenizer.id_to_token(eos).encode(), None)
    start = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(eos, vocab)
    regex = outlines_core.json_schema.build_regex_from_schema(
        json.dumps(schema_with_20_properties())
    )
    index = outlines_core.Index(regex, vocabulary)
    compile_s = time.perf_counter() - start
    guide = outlines_core.Guide(index)
    times = []
    for token in ids:
        start = time.perf_counter()
        allowed = guide.get_tokens()
        times.append(time.perf_counter() - start)
        assert token in allowed, "the document's token is masked"
        guide.advance(token)
    print(
        f"outlines-core: schema compile {compile_s * 1e3:.0f} ms; allowed tokens per token: "
        f"{stats(times)} over {len(ids)} tokens"
    )


def main() -> None:
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(document(), add_special_tokens=False).ids
    print(f"{platform.processor() or platform.machine()}; vocabulary {tokenizer.get_vocab_size()}")
    eos = tokenizer.token_to_id("<|im_end|>")
    for name, run in (
        ("llguidance", lambda: measure_llguidance(tokenizer, ids)),
        ("outlines_core", lambda: measure_outlines_core(tokenizer, ids, eos)),
    ):
        try:
            run()
        except ImportError:
            print(f"{name}: not installed")


if __name__ == "__main__":
    main()
