"""The greedy choice on CUDA in two Triton launches: each row's first argmax and its
log-probability, max - logsumexp = -log(sum(exp(x - max))).

torch's `max` and `logsumexp` over a row of 128256 logits run as single-row reductions,
~0.1 ms of a Llama-3.2-1B batch-1 decode step on an H200 (1.15 ms of kernels). Here the
first launch cuts each row into CHUNK-logit pieces, one program each (max, first argmax,
sum of exp(x - max)); the second merges a row's pieces. Runs on CUDA, and on CPU tensors
under TRITON_INTERPRET=1 (how CI checks it against torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _pieces_kernel(
    logits_ptr,  # [R, V]
    stride_row,
    V,
    top_ptr,  # float32 [R, C]: each piece's max
    index_ptr,  # int32 [R, C]: its first argmax (an index into V)
    total_ptr,  # float32 [R, C]: sum of exp(x - max) over the piece
    C,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    offs = piece * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row * stride_row + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    top = tl.max(x, axis=0)
    index = tl.argmax(x, axis=0) + piece * CHUNK  # the first of equal maxima
    total = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - top)), axis=0)
    tl.store(top_ptr + row * C + piece, top)
    tl.store(index_ptr + row * C + piece, index)
    tl.store(total_ptr + row * C + piece, total)


@triton.jit
def _merge_kernel(
    top_ptr,
    index_ptr,
    total_ptr,
    C,
    ids_ptr,  # int64 [R]
    logprobs_ptr,  # float32 [R]
    BLOCK: tl.constexpr,  # next power of two >= C
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    top = tl.load(top_ptr + row * C + offs, mask=mask, other=float("-inf"))
    index = tl.load(index_ptr + row * C + offs, mask=mask, other=0)
    total = tl.load(total_ptr + row * C + offs, mask=mask, other=0.0)
    best = tl.max(top, axis=0)
    first = tl.argmax(top, axis=0)  # the earliest piece holding the max: the first argmax
    token = tl.sum(tl.where(offs == first, index, 0), axis=0)
    scaled = tl.where(top == float("-inf"), 0.0, total * tl.exp(top - best))
    tl.store(ids_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, -tl.log(tl.sum(scaled, axis=0)))


def greedy_choice(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (ids int64 [R], log-probabilities float32 [R]) of each row's argmax."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    pieces = triton.cdiv(vocab, CHUNK)
    ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return ids, logprobs
    top = torch.empty(rows, pieces, dtype=torch.float32, device=logits.device)
    total = torch.empty_like(top)
    index = torch.empty(rows, pieces, dtype=torch.int32, device=logits.device)
    _pieces_kernel[(rows, pieces)](logits, logits.stride(0), vocab, top, index, total, pieces,
                                   CHUNK=CHUNK, num_warps=8)  # fmt: skip
    _merge_kernel[(rows,)](top, index, total, pieces, ids, logprobs,
                           BLOCK=triton.next_power_of_2(pieces), num_warps=1)  # fmt: skip
    return ids, logprobs
