"""The feed-forward blocks of a decoder layer: dense SiLU-gated, and sparse mixtures of
experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE), with their weight plans.

Experts are split over tensor-parallel ranks whole (expert parallelism): rank r holds
experts [r * E / W, (r + 1) * E / W), computes their share for the tokens routed to them,
and one all-reduce (the block's, declared here) sums the ranks' outputs. Tokens are
dispatched per expert: an expert computes only the rows routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shard.models.ops import LayerOps
from shard.models.weights import Loader, Param, Projection, Split
from shard.parallel import Parallel
from shard.spec import ModelSpec

Plan = dict[str, Param]


class DenseMLP:
    """x [T, hidden] -> down(SiLU(gate) * up) [T, hidden], summed over ranks."""

    def __init__(self, gate_up: Projection, down: Projection, ops: LayerOps) -> None:
        self.gate_up, self.down, self.ops = gate_up, down, ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.ops.silu_mul(self.gate_up(x)))


class SparseMoE:
    """x [T, hidden] -> the top-k experts' outputs weighted by the router [T, hidden], plus
    a shared expert's (gated by a sigmoid) where the model has one; summed over ranks."""

    def __init__(
        self,
        router: torch.Tensor,  # [E, hidden], whole on every rank
        experts: dict[int, tuple[Projection, Projection]],  # this rank's: e -> (gate_up, down)
        top_k: int,
        normalize: bool,  # renormalize the top-k weights to sum to 1
        ops: LayerOps,
        parallel: Parallel,
        shared: tuple[Projection, Projection] | None = None,  # this rank's rows / columns of it
        shared_gate: torch.Tensor | None = None,  # [1, hidden]
    ) -> None:
        self.router, self.experts, self.top_k, self.normalize = router, experts, top_k, normalize
        self.ops, self.parallel, self.shared, self.shared_gate = ops, parallel, shared, shared_gate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)  # [T, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert, rows, slot in self._routed(chosen):
            gate_up, down = self.experts[expert]
            y = down(self.ops.silu_mul(gate_up(x[rows]))) * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        if self.shared is not None:
            gate_up, down = self.shared
            y = down(self.ops.silu_mul(gate_up(x)))
            if self.shared_gate is not None:
                y = torch.sigmoid(F.linear(x, self.shared_gate)) * y
            out = out + y
        return self.parallel.all_reduce(out)

    def _routed(self, chosen: torch.Tensor):
        """(expert, rows [n], slot [n]) for each of this rank's experts chosen by any row."""
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.router.shape[0]).tolist()
        start = 0
        for expert, count in enumerate(counts):
            picks = order[start : start + count]
            start += count
            if count and expert in self.experts:
                yield expert, picks // self.top_k, picks % self.top_k


def num_experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def is_sparse(config: dict, index: int) -> bool:
    """Whether layer `index` has experts (Qwen-MoE's mlp_only_layers and sparse step)."""
    if not num_experts(config) or index in (config.get("mlp_only_layers") or []):
        return False
    return (index + 1) % config.get("decoder_sparse_step", 1) == 0


def local_experts(spec: ModelSpec, parallel: Parallel) -> range:
    start, stop = parallel.split(num_experts(spec.config))
    return range(start, stop)


def mlp_plan(spec: ModelSpec, index: int, parallel: Parallel) -> Plan:
    """The layer's feed-forward tensors: dense (gate and up by rows, down by columns), or
    the router, this rank's experts whole, and the shared expert split like a dense one."""
    p, config = f"model.layers.{index}.", spec.config
    if not is_sparse(config, index):
        gate, up, down = (f"{p}mlp.{n}_proj." for n in ("gate", "up", "down"))
        return {
            "gate_up": Param.of(gate + "weight", up + "weight", split=Split.ROWS),
            "down": Param.of(down + "weight", split=Split.COLS),
            # Llama's mlp_bias: split as the rows; down's added once, after the sum
            "gate_up_bias": Param.of(gate + "bias", up + "bias", split=Split.ROWS, optional=True),
            "down_bias": Param.of(down + "bias", optional=True),
        }
    mixtral = spec.architecture == "MixtralForCausalLM"
    block = p + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    plan = {"router": Param.of(block + "gate.weight")}
    for e in local_experts(spec, parallel):
        gate, up, down = (f"{block}experts.{e}.{n}.weight" for n in names)
        plan[f"experts.{e}.gate_up"] = Param.of(gate, up)
        plan[f"experts.{e}.down"] = Param.of(down)
    if config.get("shared_expert_intermediate_size"):
        s = block + "shared_expert."
        plan["shared.gate_up"] = Param.of(
            s + "gate_proj.weight", s + "up_proj.weight", split=Split.ROWS
        )
        plan["shared.down"] = Param.of(s + "down_proj.weight", split=Split.COLS)
        plan["shared.gate"] = Param.of(block + "shared_expert_gate.weight")
    return plan


def load_mlp(loader: Loader, spec: ModelSpec, plan: Plan, ops: LayerOps) -> DenseMLP | SparseMoE:
    if "router" not in plan:
        gate_up = loader.linear(plan["gate_up"], plan.get("gate_up_bias"))
        return DenseMLP(gate_up, loader.linear(plan["down"], plan.get("down_bias")), ops)
    config = spec.config
    experts = {
        e: (loader.linear(plan[f"experts.{e}.gate_up"]), loader.linear(plan[f"experts.{e}.down"]))
        for e in local_experts(spec, loader.parallel)
    }
    shared = None
    if "shared.gate_up" in plan:  # partial sums, reduced with the experts' by the block
        down = loader.linear(plan["shared.down"], reduce=False)
        shared = (loader.linear(plan["shared.gate_up"]), down)
    return SparseMoE(
        router=loader.tensor(plan["router"]),
        experts=experts,
        top_k=int(config["num_experts_per_tok"]),
        # Mixtral always renormalizes the top-k weights; Qwen's MoE only when configured
        normalize=spec.architecture == "MixtralForCausalLM" or bool(config.get("norm_topk_prob")),
        ops=ops,
        parallel=loader.parallel,
        shared=shared,
        shared_gate=loader.tensor(plan["shared.gate"]) if "shared.gate" in plan else None,
    )
