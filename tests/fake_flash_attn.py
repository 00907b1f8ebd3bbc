"""A stand-in for the `flash_attn` package on machines without it: the same
`flash_attn_varlen_func` contract (bottom-right causal, GQA, optional block table, a left
window, soft-capped scores),
computed with PyTorch SDPA one sequence at a time. Tests install it in sys.modules."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

calls: list[dict] = []  # what each call was given, for assertions


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale=None,
    causal=False,
    block_table=None,
    window_size=(-1, -1),
    softcap=0.0,
    **_ignored,
):
    calls.append({"paged": block_table is not None, "rows": q.shape[0]})
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        n, ctx = q1 - q0, k1 - k0
        if block_table is None:
            keys, values = k[k0:k1], v[k0:k1]
        else:  # k, v: [num_blocks, block_size, kv_heads, D]
            bs = k.shape[1]
            blocks = block_table[i, : -(-ctx // bs)].long()
            keys = k[blocks].reshape(-1, k.shape[2], k.shape[3])[:ctx]
            values = v[blocks].reshape(-1, v.shape[2], v.shape[3])[:ctx]
        key_pos, query_pos = torch.arange(ctx)[None, :], torch.arange(ctx - n, ctx)[:, None]
        visible = key_pos <= query_pos
        if window_size[0] >= 0:  # keys at most window_size[0] to the left of the query
            visible &= key_pos >= query_pos - window_size[0]
        group = q.shape[1] // keys.shape[1]
        q_f = q[q0:q1].transpose(0, 1).float()
        k_f = keys.repeat_interleave(group, 1).transpose(0, 1).float()
        v_f = values.repeat_interleave(group, 1).transpose(0, 1).float()
        if softcap > 0:
            scores = torch.tanh(q_f @ k_f.transpose(1, 2) * softmax_scale / softcap) * softcap
            scores = scores.masked_fill(~visible, float("-inf")) if causal else scores
            result = torch.softmax(scores, -1) @ v_f
        else:
            result = F.scaled_dot_product_attention(
                q_f, k_f, v_f, attn_mask=visible if causal else None, scale=softmax_scale
            )
        out[q0:q1] = result.transpose(0, 1).to(q.dtype)
    return out


def as_module() -> types.ModuleType:
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    return module
