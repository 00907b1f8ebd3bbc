"""Admission: a new request becomes a request state, or is refused alone with its reason.

Checks each request on its own (values, lengths, token ids, KV blocks) in the limits Warmup
set, and records which live request holds each KV block (`BlockClaims`), so a request that
would overwrite another's K/V is refused.

One owner numbers the blocks of a pool: the router (a request names its blocks, as the
router's allocator gave them) or the shard itself (a request names none: Warmup, and
clients without an allocator such as TGI's `text-generation-benchmark`). Invariant: once a
request has named blocks, the pool is the router's until the next Warmup, and a request
naming none is refused, so shard numbers never land on a block the router's prefix cache
keeps. Block 0 is reserved (liveness prefills and padding) and owned by neither.
"""

from __future__ import annotations

import logging

import torch
from tokenizers import Tokenizer

from shard.batch import Refusal, RequestSpec, RequestState
from shard.claims import BlockClaims
from shard.detokenize import IncrementalDetokenizer
from shard.errors import InvalidRequest, OutOfBlocks, ShardError
from shard.grammar import Grammar, GrammarCompiler
from shard.sampling import TokenChooser
from shard.spec import ModelSpec
from shard.stopping import StoppingCriteria

log = logging.getLogger("shard")


class Admission:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model_spec: ModelSpec,
        block_size: int,
        device: torch.device,
        max_input_tokens: int,
        max_total_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_spec = model_spec
        self.block_size = block_size
        self.device = device
        self.max_input_tokens = max_input_tokens  # set again by Warmup
        self.max_total_tokens = max_total_tokens
        self.num_blocks = 0  # the KV pool's blocks, block 0 reserved
        self.claims = BlockClaims(block_size)  # blocks of every live request
        self.free_blocks: list[int] = []  # shard-numbered blocks not in use
        self.grammars = GrammarCompiler(
            tokenizer, model_spec.vocab_size, list(model_spec.eos_token_ids)
        )
        self.router_numbered = False  # a request named its blocks since the last Warmup

    def reset_pool(self, num_blocks: int) -> None:
        """A new KV pool (Warmup): no live request, every block but 0 free."""
        self.num_blocks = num_blocks
        self.claims = BlockClaims(self.block_size)
        self.free_blocks = list(range(num_blocks - 1, 0, -1))
        self.router_numbered = False

    def admit_all(
        self, specs: list[RequestSpec], live_ids: set[int]
    ) -> tuple[list[RequestState], list[Refusal]]:
        """Checks each request on its own: the ones that pass are admitted, the others are
        refused with their reason, and no refused request changes any state."""
        seen = set(live_ids)
        admitted: list[RequestState] = []
        refused: list[Refusal] = []
        for spec in specs:
            try:
                if spec.id in seen:
                    raise InvalidRequest(f"request id {spec.id} is already in use")
                prompt = self._validate(spec)
                grammar = self.grammars.compile(spec.grammar) if spec.grammar else None
                clash = spec.blocks != [0] and self.claims.conflict(spec.blocks, spec.cache_len)
                if clash:
                    raise InvalidRequest(f"request {spec.id}: {clash}")
            except Exception as exc:  # noqa: BLE001 - any bad value refuses this request only
                if not isinstance(exc, ShardError):
                    log.warning("request %d refused: %r", spec.id, exc)
                refused.append(Refusal(spec.id, _refusal_message(spec.id, exc)))
                continue
            seen.add(spec.id)
            request = self._admit(spec, prompt, grammar)
            self.claims.add(request)
            self.router_numbered |= bool(spec.blocks) and spec.blocks != [0]
            admitted.append(request)
        return admitted, refused

    def tokenize(self, spec: RequestSpec) -> list[int]:
        """The prompt's ids: as sent (the router's tokenization), else from the text."""
        if spec.input_ids is not None:
            ids = list(spec.input_ids)
        else:
            ids = self.tokenizer.encode(spec.inputs, add_special_tokens=spec.add_special_tokens).ids
        if spec.truncate and len(ids) > spec.truncate:
            ids = ids[-spec.truncate :]
        return ids

    def _blocks_needed(self, prompt_len: int, spec: RequestSpec) -> int:
        # The last generated token is never fed back, so its K/V needs no slot.
        return -(-(prompt_len + spec.max_new_tokens - 1) // self.block_size)

    def _validate(self, spec: RequestSpec) -> list[int]:
        if spec.unsupported:
            raise InvalidRequest(spec.unsupported)
        spec.sampling.validate()
        prompt = self.tokenize(spec)
        rid = spec.id
        if prompt and max(prompt) >= self.model_spec.vocab_size:
            raise InvalidRequest(
                f"request {rid}: token id {max(prompt)} is outside the vocabulary of "
                f"{self.model_spec.vocab_size}"
            )
        biased = [t for t, _ in spec.sampling.logit_bias if t >= self.model_spec.vocab_size]
        if biased:
            raise InvalidRequest(
                f"request {rid}: logit_bias names token {biased[0]}, outside the vocabulary "
                f"of {self.model_spec.vocab_size}"
            )
        if spec.top_n_tokens > self.model_spec.vocab_size:
            raise InvalidRequest(
                f"request {rid}: top_n_tokens {spec.top_n_tokens} exceeds the vocabulary "
                f"of {self.model_spec.vocab_size}"
            )
        if not prompt:
            raise InvalidRequest(f"request {rid}: the input is empty")
        if spec.max_new_tokens < 1:
            raise InvalidRequest(f"request {rid}: max_new_tokens must be at least 1")
        if len(prompt) > self.max_input_tokens:
            raise InvalidRequest(
                f"request {rid}: {len(prompt)} input tokens exceed max_input_tokens "
                f"{self.max_input_tokens}"
            )
        if len(prompt) + spec.max_new_tokens > self.max_total_tokens:
            raise InvalidRequest(
                f"request {rid}: input + max_new_tokens = {len(prompt) + spec.max_new_tokens} "
                f"exceeds max_total_tokens {self.max_total_tokens}"
            )
        if spec.cache_len >= len(prompt):
            raise InvalidRequest(
                f"request {rid}: cache_len {spec.cache_len} must be below the prompt length "
                f"{len(prompt)} (at least one prompt token is computed)"
            )
        if spec.chunk_len is not None and spec.chunk_len < 1:
            raise InvalidRequest(f"request {rid}: chunk_len must be at least 1")
        if spec.blocks:
            self._validate_blocks(spec, len(prompt))
        elif self.router_numbered:
            raise InvalidRequest(
                f"request {rid} names no KV blocks, but this shard's blocks are numbered by "
                "the router that named them (until the next Warmup); send blocks and slots"
            )
        elif self._blocks_needed(len(prompt), spec) > len(self._unheld_free_blocks()):
            raise OutOfBlocks(
                f"request {rid} needs {self._blocks_needed(len(prompt), spec)} KV blocks but "
                f"the shard has {len(self._unheld_free_blocks())} free"
            )
        return prompt

    def _validate_blocks(self, spec: RequestSpec, prompt_len: int) -> None:
        rid, blocks = spec.id, spec.blocks
        if blocks == [0]:  # a liveness prefill: block 0 is reserved for it (and padding)
            if prompt_len + spec.max_new_tokens - 1 > self.block_size:
                raise InvalidRequest(
                    f"request {rid}: a liveness prefill on block 0 must fit one block"
                )
            return
        bad = [b for b in blocks if not 0 < b < self.num_blocks]
        if bad:
            raise InvalidRequest(
                f"request {rid}: block ids {bad[:5]} are outside 1..{self.num_blocks - 1} "
                "(block 0 is reserved)"
            )
        needed = self._blocks_needed(prompt_len, spec)
        if len(blocks) < needed:
            raise InvalidRequest(
                f"request {rid}: {len(blocks)} blocks hold {len(blocks) * self.block_size} "
                f"tokens but input + max_new_tokens needs {needed} blocks"
            )
        if len(set(blocks)) != len(blocks):
            raise InvalidRequest(f"request {rid}: a block id appears twice")
        bs = self.block_size
        if spec.slots and any(s != blocks[p // bs] * bs + p % bs for p, s in enumerate(spec.slots)):
            raise InvalidRequest(f"request {rid}: slots disagree with blocks")

    def _admit(self, spec: RequestSpec, prompt: list[int], grammar: Grammar | None) -> RequestState:
        blocks, owns = list(spec.blocks), False
        if not blocks:  # shard-numbered (Warmup, a client without an allocator)
            count = self._blocks_needed(len(prompt), spec)
            blocks = self._unheld_free_blocks()[:count]
            taken = set(blocks)
            self.free_blocks = [b for b in self.free_blocks if b not in taken]
            owns = True
        stopping = StoppingCriteria(
            max_new_tokens=spec.max_new_tokens,
            stop_sequences=[s for s in spec.stop_sequences if s],
            eos_token_ids=frozenset(self.model_spec.eos_token_ids),
            ignore_eos=spec.ignore_eos,
        )
        return RequestState(
            id=spec.id,
            prompt_len=len(prompt),
            all_ids=prompt,
            blocks=blocks,
            num_computed=spec.cache_len,
            chunk_len=spec.chunk_len,
            chooser=TokenChooser(spec.sampling, self.device, grammar),
            stopping=stopping,
            detokenizer=IncrementalDetokenizer(len(prompt)),
            top_n_tokens=spec.top_n_tokens,
            prefill_logprobs=spec.prefill_logprobs,
            owns_blocks=owns,
            prompt_logprobs=[float("nan")] * (spec.cache_len + 1) if spec.prefill_logprobs else [],
        )

    def _unheld_free_blocks(self) -> list[int]:
        """Shard-numbered candidates that no live request holds (the router's requests may
        name any block of the pool): a new pool's lowest first, then the last freed, each
        freed run in its order (a request's K/V ascending in memory, as attention reads
        them; see common/allocator.py)."""
        held = self.claims.held
        return [b for b in reversed(self.free_blocks) if b not in held]

    def release(self, requests: list[RequestState]) -> None:
        """The requests leave: their blocks are no longer theirs."""
        for request in requests:
            self.claims.remove(request)
            if request.owns_blocks:  # last first: handed out again in their order
                self.free_blocks.extend(reversed(request.blocks))
            request.blocks = []


def _refusal_message(request_id: int, exc: Exception) -> str:
    if isinstance(exc, ShardError):
        return str(exc)
    return f"request {request_id}: its input could not be processed ({type(exc).__name__})"
