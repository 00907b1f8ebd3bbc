"""Every model family against transformers' own implementation.

Each case is a tiny random-weight model built by transformers from the family's config class
(real head layouts: GQA, one KV head, tied and untied embeddings) and saved with
`save_pretrained`. Greedy tokens for several prompts (one longer than any sliding window)
must equal transformers' `generate` in float32, log-probabilities within 1e-4: each prompt
alone, all in one batch, with chunked prefill and over a cached prefix; and at 2 shards
where the heads divide.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_model
from tests.helpers import Collector, drive, make_engine, run_to_end, spec
from tests.test_tensor_parallel import ShardGroup

PROMPTS = [
    "The rain in Spain stays mainly in the plain, said the professor twice.",
    "Once upon a time",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32",
]
NEW_TOKENS = 10
TOLERANCE = 1e-4

SHORT = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8]  # longrope factors for 16-dim heads
LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]
# id -> (model_type, config overrides). The defaults (tests/conftest.py): hidden 64,
# 4 heads, 2 KV heads, 2 layers, untied embeddings.
CASES = {
    "llama": ("llama", {}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama-yarn-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),  # o and MLP too
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "mistral-window": ("mistral", {"sliding_window": 8}),  # every layer; prompts pass it
    "qwen2-window": (  # layer 0 full, layer 1 windowed
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
    "qwen2": ("qwen2", {}),
    "qwen2-odd-heads": (  # 6 heads, 3 KV heads (odd), no head_dim in the config
        "qwen2",
        {
            "hidden_size": 96,
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "intermediate_size": 192,
        },
    ),
    "qwen3": ("qwen3", {"head_dim": 24}),  # per-head q/k norms; head_dim not hidden / heads
    "qwen3-bias-1kv-tied": (
        "qwen3",
        {"attention_bias": True, "tie_word_embeddings": True, "num_key_value_heads": 1},
    ),
    "phi3": ("phi3", {}),
    "phi3-longrope": (  # prompts past the original 16 positions read the long factors
        "phi3",
        {
            "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
            "tie_word_embeddings": True,
        },
    ),
    "phi3-mini-4k-window": ("phi3", {"sliding_window": 8}),  # Phi-3-mini-4k: 2047 of 4096
    "phi4-mini-partial-rotary": (  # RoPE on 12 of 16 dimensions, longrope, one KV head
        "phi3",
        {
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 16,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": SHORT[:6],
                "long_factor": LONG[:6],
            },
            "num_key_value_heads": 1,
        },
    ),
    "mixtral": (
        "mixtral",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "initializer_range": 0.1,
        },
    ),
    "qwen2-moe": (  # layer 0 dense; layer 1: 4 experts, top 2 unnormalized, a gated shared one
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "mlp_only_layers": [0],
            "initializer_range": 0.1,
        },
    ),
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 24,
            "norm_topk_prob": True,
            "head_dim": 16,
            "initializer_range": 0.1,
        },
    ),
    "gemma": ("gemma", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": (  # alternating windows (8 keys), scores and logits soft-capped (small caps)
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 1.0,
            "final_logit_softcapping": 5.0,
            "query_pre_attn_scalar": 24,
            "tie_word_embeddings": True,
            "initializer_range": 0.3,  # weights large enough for scores to reach the cap
        },
    ),
    "gemma3": (  # q/k norms; local layers on their own RoPE base, global ones linearly scaled
        "gemma3_text",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "rope_local_base_freq": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "num_key_value_heads": 1,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": True,
        },
    ),
}
# Cases checked over 2 shard processes too (one per family: each start costs seconds).
TWO_SHARDS = (
    "llama", "mistral-window", "qwen2-window", "qwen3-bias-1kv-tied", "phi3-longrope", "gemma2",
    "gemma3", "mixtral", "qwen2-moe", "qwen3-moe", "llama-biases",
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(smollm_dir, tmp_path_factory):
    built: dict = {}

    def get(case: str):
        if case not in built:
            model_type, overrides = CASES[case]
            target = tmp_path_factory.mktemp(case)
            built[case] = build_tiny_model(target, smollm_dir, model_type, **overrides)
        return built[case]

    return get


def reference(model_dir, prompt_ids: list[list[int]]) -> tuple[list, list]:
    """transformers' greedy tokens and the log-probabilities of each, per prompt."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    # soft-capped scores need transformers' eager attention; elsewhere SDPA, as its eager
    # path mis-masks Phi-3's recomputation when longrope switches to the long factors
    eager = getattr(config, "attn_logit_softcapping", None) is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager" if eager else "sdpa"
    )
    tokens, logprobs = [], []
    for ids in prompt_ids:
        out = model.eval().generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        new = out.sequences[0, len(ids) :].tolist()
        tokens.append(new)
        logprobs.append(
            [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, new, strict=True)]
        )
    return tokens, logprobs


def assert_same(got_tokens, got_logprobs, want_tokens, want_logprobs, how: str) -> None:
    assert got_tokens == want_tokens, how
    worst = max(abs(a - b) for a, b in zip(got_logprobs, want_logprobs, strict=True))
    assert worst < TOLERANCE, f"{how}: log-probabilities differ by {worst}"


@pytest.mark.parametrize("case", list(CASES))
def test_family_matches_transformers(case, model_dirs):
    model_dir = model_dirs(case)
    engine = make_engine(model_dir)
    ids = [engine.tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    want_tokens, want_logprobs = reference(model_dir, ids)

    def request(i: int, **options):
        return spec(i, PROMPTS[i], NEW_TOKENS, ignore_eos=True, **options)

    for i in range(len(PROMPTS)):  # alone
        c = run_to_end(engine, 10 + i, [request(i)])
        assert_same(c.tokens[i], c.logprobs[i], want_tokens[i], want_logprobs[i], "alone")
    c = run_to_end(engine, 20, [request(i) for i in range(len(PROMPTS))])  # one batch
    for i in range(len(PROMPTS)):
        assert_same(c.tokens[i], c.logprobs[i], want_tokens[i], want_logprobs[i], "batched")
    last = len(PROMPTS) - 1
    c = Collector()  # chunked: the longest prompt in chunks of 5 tokens
    result = engine.prefill(30, [request(last, chunk_len=5)], None)
    c.add(result)
    drive(engine, c, result.batch)
    assert_same(c.tokens[last], c.logprobs[last], want_tokens[last], want_logprobs[last], "chunked")
    assert engine.blocks_all_back()
    _check_prefix_cache(engine, ids[last], request(last), want_tokens[last], want_logprobs[last])


def _check_prefix_cache(engine, prompt_ids, request, want_tokens, want_logprobs) -> None:
    """The prompt's first blocks written by one request, read by the next (cache_len)."""
    bs = engine.block_size
    cached = (len(prompt_ids) - 1) // bs
    assert cached >= 1, "the prompt must fill a block"
    blocks = list(range(1, 1 + -(-(len(prompt_ids) + NEW_TOKENS) // bs)))
    first = spec(50, request.inputs, 1, ignore_eos=True, blocks=blocks)
    run_to_end(engine.engine, 40, [first])  # the bare engine: these blocks are ours to name
    reuse = blocks[:cached] + [b + 100 for b in blocks[cached:]]
    again = spec(51, request.inputs, NEW_TOKENS, ignore_eos=True, blocks=reuse,
                 cache_len=cached * bs)  # fmt: skip
    c = run_to_end(engine.engine, 41, [again])
    assert_same(c.tokens[51], c.logprobs[51], want_tokens, want_logprobs, "prefix cache")


@pytest.mark.slow
@pytest.mark.parametrize("case", TWO_SHARDS)
def test_family_over_two_shards_matches_transformers(case, model_dirs, tmp_path):
    model_dir = model_dirs(case)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    want_tokens, want_logprobs = reference(model_dir, ids)
    group = ShardGroup(model_dir, 2, tmp_path)
    try:
        tokens, logprobs = group.generate(PROMPTS, NEW_TOKENS)
    finally:
        group.stop()
    for i in range(len(PROMPTS)):
        assert_same(tokens[i], logprobs[i], want_tokens[i], want_logprobs[i], "2 shards")
