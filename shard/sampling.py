"""Choosing the next token: penalties, greedy or seeded sampling, log-probabilities, top-n.

Each sampled request owns a `torch.Generator`, so its tokens depend only on its seed and its
own logits, never on which other requests share the batch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from shard.errors import InvalidRequest
from shard.grammar import Grammar


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's: once per token already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias): OpenAI's logit_bias

    def validate(self) -> None:
        """Raises InvalidRequest naming the first bad value.

        As on the wire of TGI, 0 means "off" for top_k (proto3 cannot tell unset from 0).
        """
        for name in (
            "temperature",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequest(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0 or (self.temperature == 0 and self.is_sampling):
            raise InvalidRequest(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise InvalidRequest(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequest(f"logit_bias of token {token} must be in [-100, 100]")

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )

    @property
    def is_sampling(self) -> bool:
        """TGI's rule: sample when asked to or when any warper is set (temperature 0 and
        1 leave greedy decoding alone)."""
        has_warpers = (
            self.temperature not in (0.0, 1.0)
            or self.top_k != 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )
        return self.do_sample or has_warpers


@dataclass(slots=True)
class Choice:
    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


class TokenChooser:
    """Per-request chooser: holds the generator, the counts for the frequency penalty and
    the request's grammar, if any."""

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device | str = "cpu",
        grammar: Grammar | None = None,
    ) -> None:
        self.params = params
        self.grammar = grammar
        self.generator: torch.Generator | None = None
        if params.is_sampling:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.generated_counts: Counter[int] = Counter()

    def apply_penalties(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """logits [V] -> penalised copy. Logit bias first (OpenAI: before anything else);
        repetition: HF's rule over prompt + output; frequency and presence: OpenAI's rule,
        minus penalty x count, and minus penalty once, over generated tokens."""
        p = self.params
        logits = logits.clone()
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            biases = torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype)
            logits[ids] += biases.to(logits.device)
        if p.repetition_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(
                picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty
            )
        if p.frequency_penalty != 0.0 and self.generated_counts:
            ids = torch.tensor(list(self.generated_counts), device=logits.device)
            counts = torch.tensor(
                list(self.generated_counts.values()), dtype=logits.dtype, device=logits.device
            )
            logits[ids] -= p.frequency_penalty * counts
        if p.presence_penalty != 0.0 and self.generated_counts:
            ids = torch.tensor(list(self.generated_counts), device=logits.device)
            logits[ids] -= p.presence_penalty
        return logits

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> logits with filtered tokens at -inf (temperature, top-k/p, typical)."""
        p = self.params
        if p.temperature != 1.0:
            scaled = logits / p.temperature
            if not bool(torch.isfinite(scaled.max())):
                # a tiny temperature overflowed float32: shift first (softmax is unchanged)
                scaled = (logits - logits.max()) / p.temperature
            logits = scaled
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep >= 1 token
            remove_by_id = torch.zeros_like(remove).scatter(0, order, remove)
            logits = logits.masked_fill(remove_by_id, float("-inf"))
        if p.typical_p < 1.0:
            logits = _typical(logits, p.typical_p)
        return logits

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> -inf wherever the grammar forbids the token."""
        assert self.grammar is not None
        allowed = self.grammar.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def record(self, token_id: int) -> None:
        self.generated_counts[token_id] += 1
        if self.grammar is not None:
            self.grammar.advance(token_id)

    @property
    def grammar_complete(self) -> bool:
        return self.grammar is not None and self.grammar.is_complete


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Keeps tokens whose surprise is closest to the entropy until `mass` is covered."""
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(torch.nan_to_num(logp) * probs).sum()
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted)
    cumulative = probs[order].cumsum(-1)
    last = int((cumulative < mass).sum())
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[order[: last + 1]] = True
    return logits.masked_fill(~keep, float("-inf"))


def choose_tokens(
    logits: torch.Tensor,
    choosers: list[TokenChooser],
    histories: list[list[int]],
    top_ns: list[int],
) -> list[Choice]:
    """logits [N, V] float32, one row per request -> one Choice per row.

    Log-probabilities are taken from the distribution the token was chosen from (after
    penalties and, when sampling, the warpers), as TGI reports them.
    """
    rows, changed = [], False
    for i, chooser in enumerate(choosers):
        row = logits[i]
        if chooser.grammar is not None:
            row, changed = chooser.constrain(row), True
        if chooser.params.has_penalties:
            row, changed = chooser.apply_penalties(row, histories[i]), True
        if chooser.params.is_sampling:
            row, changed = chooser.warp(row), True
        rows.append(row)
    final = torch.stack(rows) if changed else logits
    if not any(c.generator is not None or n for c, n in zip(choosers, top_ns, strict=True)):
        return _greedy(final, choosers)
    logprobs = final.log_softmax(-1)
    greedy_ids = logprobs.argmax(-1).tolist()
    choices = []
    for i, chooser in enumerate(choosers):
        token = greedy_ids[i]
        if chooser.generator is not None:
            token = _sample(logprobs[i], chooser.generator, fallback=token)
        choice = Choice(token, float(logprobs[i, token]))
        if top_ns[i]:
            top = torch.topk(logprobs[i], top_ns[i])
            choice.top_ids, choice.top_logprobs = top.indices.tolist(), top.values.tolist()
        chooser.record(token)
        choices.append(choice)
    return choices


def _sample(logprobs: torch.Tensor, generator: torch.Generator, fallback: int) -> int:
    """A token drawn from logprobs [V]; a row whose probabilities are not a distribution
    (NaN, inf, all zero: extreme parameter values) takes `fallback`, the greedy token,
    rather than failing the batch."""
    probs = logprobs.exp()
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return fallback
    return int(torch.multinomial(probs, 1, generator=generator))


def _cpu_kernels() -> Any | None:
    from shard import cpu_kernels

    return cpu_kernels.load()


def _greedy_choice(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (each row's first argmax [N], its log-probability [N])."""
    if logits.is_cuda:
        from shard.sampling_triton import greedy_choice

        return greedy_choice(logits)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(-1) == 1:
        kernels = _cpu_kernels()
        if kernels is not None:
            return kernels.greedy(logits)
    best, ids = logits.max(-1)
    return ids, best - torch.logsumexp(logits, -1)


def _greedy(logits: torch.Tensor, choosers: list[TokenChooser]) -> list[Choice]:
    """Every row greedy and no top-n: argmax and log-sum-exp, no [N, V] log-softmax written
    (on CUDA two Triton launches, shard/sampling_triton.py; on CPU one C++ call of two
    passes a row where the kernels build, torch's four otherwise)."""
    ids, logprobs = _greedy_choice(logits)
    choices = []
    for chooser, token, logprob in zip(choosers, ids.tolist(), logprobs.tolist(), strict=True):
        chooser.record(token)
        choices.append(Choice(token, logprob))
    return choices
