"""The Llama family (Llama 2/3, SmolLM2, Mistral without sliding window, Qwen2 with qkv bias).

Only math: `forward(input_ids, positions, attention inputs, kv cache) -> hidden`, logits only
for the rows that need them. Weights are loaded already split for tensor parallelism: the
packed QKV projection by heads, gate/up by rows, o/down by columns (then all-reduced),
embedding and LM head by vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.attention import AttentionBackend, AttentionMetadata
from shard.kv_cache import KVCache
from shard.loader import WeightStore
from shard.models.linear import Linear
from shard.models.ops import LayerOps, ops_for
from shard.models.rope import Rotary
from shard.parallel import Parallel
from shard.spec import ModelSpec, check_parallel


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(heads + 2 * kv_heads) * D, hidden] (+ bias), this rank's heads
    o_proj: Linear  # [hidden, heads * D], this rank's columns
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden], this rank's rows
    down: Linear  # [hidden, intermediate], this rank's columns


class LlamaModel:
    def __init__(
        self,
        spec: ModelSpec,
        store: WeightStore,
        dtype: torch.dtype,
        device: torch.device,
        parallel: Parallel,
        pack_linear: bool = True,
        gemv: bool = False,
        ops: LayerOps | None = None,
    ) -> None:
        check_parallel(spec, parallel.world_size)
        self.ops = ops if ops is not None else ops_for(device)
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.parallel = parallel
        self.num_heads = spec.num_heads // parallel.world_size
        self.num_kv_heads = max(1, spec.num_kv_heads // parallel.world_size)
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self._store, self._dtype, self._pack, self._gemv = store, dtype, pack_linear, gemv
        self.vocab_start, self.vocab_stop = parallel.split(spec.vocab_size)
        self.embed = self._rows("model.embed_tokens.weight", spec.vocab_size)
        head_name = "lm_head.weight"
        if spec.tie_word_embeddings or head_name not in store:
            head = self.embed
        else:
            head = self._rows(head_name, spec.vocab_size)
        self.lm_head = Linear(head, pack=pack_linear, gemv=gemv)
        self.layers = [self._load_layer(i) for i in range(spec.num_layers)]
        self.norm = self._full("model.norm.weight")
        self.rotary = Rotary(
            spec.head_dim,
            spec.max_position_embeddings,
            spec.rope_theta,
            spec.rope_scaling,
            dtype,
            device,
        )
        del self._store

    # ---- loading: each rank reads only its own slices ----
    def _to(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype=self._dtype, device=self.device).contiguous()

    def _full(self, name: str) -> torch.Tensor:
        return self._to(self._store.get(name))

    def _rows(self, name: str, size: int) -> torch.Tensor:
        start, stop = self.parallel.split(size)
        return self._to(self._store.get_slice(name, 0, start, stop))

    def _cols(self, name: str, size: int) -> torch.Tensor:
        start, stop = self.parallel.split(size)
        return self._to(self._store.get_slice(name, 1, start, stop))

    def _head_rows(self, name: str, num_heads: int, local_heads: int) -> torch.Tensor:
        """Rows of this rank's heads; KV heads are replicated when fewer than ranks."""
        d = self.head_dim
        first = (self.parallel.rank * num_heads // self.parallel.world_size) * d
        view = self._store.get_slice(name, 0, first, first + local_heads * d)
        return self._to(view)

    def _load_layer(self, i: int) -> _Layer:
        p = f"model.layers.{i}."
        spec = self.spec
        attn = p + "self_attn."
        parts = [
            (attn + "q_proj", spec.num_heads, self.num_heads),
            (attn + "k_proj", spec.num_kv_heads, self.num_kv_heads),
            (attn + "v_proj", spec.num_kv_heads, self.num_kv_heads),
        ]
        qkv = torch.cat([self._head_rows(n + ".weight", h, lh) for n, h, lh in parts])
        bias = None
        if spec.qkv_bias:
            bias = torch.cat([self._head_rows(n + ".bias", h, lh) for n, h, lh in parts])
        inter = spec.intermediate_size
        gate_up = torch.cat(
            [
                self._rows(p + "mlp.gate_proj.weight", inter),
                self._rows(p + "mlp.up_proj.weight", inter),
            ]
        )
        o_proj = self._cols(attn + "o_proj.weight", spec.num_heads * spec.head_dim)
        return _Layer(
            input_norm=self._full(p + "input_layernorm.weight"),
            qkv=Linear(qkv, bias, pack=self._pack, gemv=self._gemv),
            o_proj=Linear(o_proj, pack=self._pack, gemv=self._gemv),
            post_norm=self._full(p + "post_attention_layernorm.weight"),
            gate_up=Linear(gate_up, pack=self._pack, gemv=self._gemv),
            down=Linear(
                self._cols(p + "mlp.down_proj.weight", inter), pack=self._pack, gemv=self._gemv
            ),
        )

    # ---- math ----
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.embed)
        local = input_ids - self.vocab_start
        is_mine = (local >= 0) & (local < self.embed.shape[0])
        out = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed)
        out = out * is_mine.unsqueeze(-1)
        return self.parallel.all_reduce(out)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm.

        `meta` is `backend.prepare(...)` of this forward's layout. No host work happens
        here beyond launching ops, so a decode forward can be captured in a CUDA graph."""
        ops, eps = self.ops, self.spec.rms_norm_eps
        rotary = ops.rotary_state(positions, self.rotary)
        hidden = self._embed(input_ids)  # [T, hidden]: the residual stream
        num_q = self.num_heads * self.head_dim
        num_kv = self.num_kv_heads * self.head_dim
        num_tokens = input_ids.shape[0]
        pending = None  # the last MLP's output, added to the residual by the next norm
        for index, layer in enumerate(self.layers):
            if pending is None:
                x = ops.norm(hidden, layer.input_norm, eps)
            else:
                hidden, x = ops.add_norm(hidden, pending, layer.input_norm, eps)
            qkv = layer.qkv(x)  # [T, (H + 2 KVH) D]
            qk, v = qkv.split([num_q + num_kv, num_kv], dim=-1)
            qk = ops.rotate(qk.view(num_tokens, -1, self.head_dim), rotary)  # q and k heads
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            k_cache, v_cache = kv_cache.layer(index)
            backend.store_kv(k_cache, v_cache, k, v, meta)
            attn = backend.attend(q, k, v, k_cache, v_cache, meta, self.scale)
            out = layer.o_proj(attn.reshape(num_tokens, num_q))
            hidden, x = ops.add_norm(hidden, self.parallel.all_reduce(out), layer.post_norm, eps)
            pending = self.parallel.all_reduce(layer.down(ops.silu_mul(layer.gate_up(x))))
        if pending is None:
            return ops.norm(hidden, self.norm, eps)
        return ops.add_norm(hidden, pending, self.norm, eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab] over the whole vocabulary."""
        local = self.lm_head(hidden).float()
        return self.parallel.all_gather_last_dim(local)
