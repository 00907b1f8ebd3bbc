"""Declared weight plans, and the one loader that applies them for every family.

A family says, for each of its parameters, which checkpoint tensors feed it and how it is
split over tensor-parallel ranks (`Param`); `Loader` reads only this rank's slices. Where
the math must combine ranks is declared by the split, never written in the model:

- `Split.ROWS` / `Split.HEADS`: a column-parallel linear; each rank computes its own
  output features (heads), nothing to combine.
- `Split.COLS`: a row-parallel linear; each rank holds some input features, so its output
  is a partial sum: `Loader.linear` returns a layer that all-reduces it.
- `Split.NONE`: every rank holds the whole tensor (norms, routers).
- The embedding and LM head are split by vocabulary (`VocabEmbedding`, `VocabHead`), which
  all-reduce and all-gather themselves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard.errors import ModelLoadError
from shard.loader import Store
from shard.models.fp8 import Fp8Linear
from shard.models.linear import Linear
from shard.models.quant import METHODS, QuantLinear, group_for
from shard.parallel import Parallel


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


class Split(enum.Enum):
    NONE = "replicated"
    ROWS = "rows"  # dim 0 split evenly
    HEADS = "heads"  # dim 0 split by heads; KV heads repeated when fewer than ranks
    COLS = "cols"  # dim 1 split evenly; the linear's output is all-reduced


@dataclass(frozen=True, slots=True)
class Part:
    """One checkpoint tensor, or the rows `rows[0]:rows[1]` of a fused one (Phi-3's
    qkv_proj), holding `heads` heads when split by heads."""

    name: str
    rows: tuple[int, int] | None = None
    heads: int = 0


@dataclass(frozen=True, slots=True)
class Param:
    """A parameter: its parts, each split alike, then concatenated along dim 0."""

    parts: tuple[Part, ...]
    split: Split = Split.NONE
    optional: bool = False  # absent from a checkpoint: the parameter is None (a bias)

    @classmethod
    def of(cls, *names: str, split: Split = Split.NONE, optional: bool = False) -> Param:
        return cls(tuple(Part(n) for n in names), split, optional)

    @classmethod
    def heads(cls, *parts: tuple[str, int]) -> Param:
        """(name, heads) parts split by heads: a q/k/v projection, or its bias."""
        return cls(tuple(Part(n, heads=h) for n, h in parts), Split.HEADS)


def local_heads(heads: int, parallel: Parallel) -> tuple[int, int]:
    """(first head, count) of this rank's share of `heads`: an even split, or, when there
    are fewer heads than ranks (KV heads), the one head this rank shares with others."""
    return parallel.rank * heads // parallel.world_size, max(1, heads // parallel.world_size)


class RowParallel:
    """A linear over this rank's input features; its output summed over ranks, then the
    bias (whole on every rank) added once."""

    __slots__ = ("linear", "bias", "parallel")

    def __init__(
        self,
        linear: Linear | QuantLinear | Fp8Linear,
        bias: torch.Tensor | None,
        parallel: Parallel,
    ) -> None:
        self.linear, self.bias, self.parallel = linear, bias, parallel

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias


# What Loader.linear gives: a layer over this rank's slice, summed over ranks if row-parallel
Projection = Linear | QuantLinear | Fp8Linear | RowParallel


class VocabEmbedding:
    """Token ids [T] -> embeddings [T, hidden]; this rank holds rows `start:start + n`."""

    def __init__(self, name: str, weight: torch.Tensor, start: int, parallel: Parallel) -> None:
        self.name, self.weight, self.start, self.parallel = name, weight, start, parallel

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        rows = self.weight.shape[0]
        local = input_ids - self.start
        is_mine = (local >= 0) & (local < rows)
        out = F.embedding(local.clamp(0, rows - 1), self.weight) * is_mine.unsqueeze(-1)
        return self.parallel.all_reduce(out)


class VocabHead:
    """Hidden [N, hidden] -> float32 logits [N, vocab]: each rank's vocabulary slice,
    gathered."""

    def __init__(self, linear: Linear | QuantLinear | Fp8Linear, parallel: Parallel) -> None:
        self.linear, self.parallel = linear, parallel

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_gather_last_dim(self.linear(hidden).float())


class Loader:
    """Reads planned parameters from a `Store`: this rank's slices only, in the
    model's dtype, on its device. `linear` packs them for the CPU's fast paths."""

    def __init__(
        self,
        store: Store,
        parallel: Parallel,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        pack: bool = True,
        gemv: bool = False,
        quantize: str | None = None,
        group_size: int = 32,
        kernels: bool = True,
    ) -> None:
        self.store, self.parallel, self.head_dim = store, parallel, head_dim
        self.dtype, self.device, self.pack, self.gemv = dtype, device, pack, gemv
        self.quantize, self.group_size = quantize, group_size
        # False: quantized layers dequantize per call, plain ones take no panels of ours
        self.kernels = kernels
        self.nbytes = 0  # bytes of every tensor loaded so far (quantized ones: packed)

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def present(self, param: Param) -> bool:
        """Whether the checkpoint holds `param` (a missing required one fails on reading)."""
        return not param.optional or all(p.name in self.store for p in param.parts)

    def _to(self, tensor: torch.Tensor, count: bool = True) -> torch.Tensor:
        out = tensor.to(dtype=self.dtype, device=self.device).contiguous()
        if count:
            self.nbytes += out.numel() * out.element_size()
        return out

    def _bounds(self, part: Part, split: Split) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """This rank's rows of one part (within its rows of a fused tensor) and, split by
        columns, its columns."""
        shape = self.store.shape(part.name)
        base, stop = part.rows or (0, shape[0])
        if split is Split.COLS:
            return (base, stop), self.parallel.split(shape[1])
        if split is Split.NONE:
            return (base, stop), None
        if split is Split.HEADS:
            first, count = local_heads(part.heads, self.parallel)
            start, end = first * self.head_dim, (first + count) * self.head_dim
        else:  # ROWS
            start, end = self.parallel.split(stop - base)
        return (base + start, base + end), None

    def _read(self, part: Part, split: Split) -> torch.Tensor:
        """This rank's slice of one part (its rows of a fused tensor first)."""
        (start, stop), cols = self._bounds(part, split)
        if cols is not None:
            view = self.store.get_slice(part.name, 1, *cols)
            return view if part.rows is None else view[start:stop]
        if part.rows is None and split is Split.NONE:
            return self.store.get(part.name)
        return self.store.get_slice(part.name, 0, start, stop)

    def _packed(self, param: Param, bias: torch.Tensor | None) -> QuantLinear | Fp8Linear | None:
        """The layer from a store's own quantized forms (a GGUF file's Q8_0/Q4 tensors, a
        GPTQ/AWQ checkpoint's, fp8 weights on a GPU with fp8 products), this rank's rows and
        columns cut from the packed data; None if it has none."""
        packed = getattr(self.store, "packed", None)
        if packed is None:
            return None
        forms = [f for f in (packed(p.name) for p in param.parts) if f is not None]
        if len(forms) != len(param.parts) or len({(f[0], f[2][0].shape[1]) for f in forms}) != 1:
            return None  # a part in another type: quantized on the fly like the rest
        order = forms[0][3]
        if any(not _same(f[3], order) for f in forms):
            raise ModelLoadError(
                f"{param.parts[0].name}: fused parts reorder their inputs differently"
            )
        pairs = zip(param.parts, forms, strict=True)
        pieces = [self._cut(part, param.split, *form) for part, form in pairs]
        joined = [torch.cat(ts).contiguous().to(self.device) for ts in zip(*pieces, strict=True)]
        if order is not None:
            order = order.to(self.device)
        layer: QuantLinear | Fp8Linear
        if forms[0][0] == "fp8":
            layer = Fp8Linear(joined[0], joined[1], bias)
        else:
            layer = self._paneled(
                QuantLinear(
                    forms[0][0], joined[0], tuple(joined[1:]), bias, order, kernels=self.kernels
                )
            )
        self.nbytes += layer.nbytes
        return layer

    def _cut(
        self, part: Part, split: Split, method: str, q: torch.Tensor, params: tuple, order
    ) -> list[torch.Tensor]:
        """[q, *params] of one part, this rank's share; columns only at group boundaries."""
        (start, stop), cols = self._bounds(part, split)
        tensors = [t[start:stop] for t in (q, *params)]
        if cols is None:
            return tensors
        if order is not None and self.parallel.world_size > 1:
            raise ModelLoadError(
                f"{part.name}: act-order (desc_act) GPTQ groups span the inputs, so this "
                "layer cannot be split by columns over shards; serve it with --num-shard 1"
            )
        if method == "fp8":  # one scale per output row: any columns
            return [tensors[0][:, cols[0] : cols[1]], *tensors[1:]]
        k = self.store.shape(part.name)[1]
        group = k // params[0].shape[1]
        if cols[0] % group or cols[1] % group:
            raise ModelLoadError(
                f"{part.name}: {k} inputs in groups of {group} cannot be split evenly over "
                f"{self.parallel.world_size} shards; choose a --num-shard that divides "
                f"{k // group}"
            )
        per_byte = 2 if method == "int4" else 1
        first = tensors[0][:, cols[0] // per_byte : cols[1] // per_byte]
        return [first, *(t[:, cols[0] // group : cols[1] // group] for t in tensors[1:])]

    def tensor(self, param: Param, count: bool = True) -> torch.Tensor:
        parts = [self._read(p, param.split) for p in param.parts]
        return self._to(parts[0] if len(parts) == 1 else torch.cat(parts), count)

    def linear(self, weight: Param, bias: Param | None = None, reduce: bool = True) -> Projection:
        """A linear layer (weight-only quantized with --quantize); row-parallel (output
        all-reduced) when split by columns, unless the caller declares its own reduction
        (`reduce=False`: a mixture of experts)."""
        b = self.tensor(bias) if bias is not None and self.present(bias) else None
        if weight.split is Split.COLS and not reduce and b is not None:
            raise ModelLoadError(f"{weight.parts[0].name}: a bias on partial sums would be summed")
        if weight.split is not Split.COLS or not reduce:
            return self._layer(weight, b)
        return RowParallel(self._layer(weight, None), b, self.parallel)

    def _layer(self, param: Param, bias: torch.Tensor | None) -> Linear | QuantLinear | Fp8Linear:
        stored = self._packed(param, bias)
        if stored is not None:
            return stored
        if self.quantize is None:
            weight = self.tensor(param)
            return Linear(weight, bias, pack=self.pack, gemv=self.gemv, panels=self.kernels)
        if self.quantize == "fp8":  # this rank's rows or columns, per output channel
            fp8 = Fp8Linear.quantize(self.tensor(param, count=False), bias)
            self.nbytes += fp8.nbytes
            return fp8
        whole_rows = self.quantize == "int8" and param.split is Split.COLS
        if whole_rows:  # per-channel scales over whole rows, then this rank's columns
            param = Param(param.parts, Split.NONE, param.optional)
        weight = self.tensor(param, count=False)  # one layer's full weights at a time
        group = 0
        if self.quantize == "int4":
            group = group_for(weight.shape[1], self.group_size, param.parts[0].name)
        layer = QuantLinear.quantize(weight, bias, self.quantize, group, kernels=self.kernels)
        if whole_rows and self.parallel.world_size > 1:
            layer.keep_inputs(*self.parallel.split(weight.shape[1]))
        layer = self._paneled(layer)
        self.nbytes += layer.nbytes
        return layer

    def _paneled(self, layer: QuantLinear) -> QuantLinear:
        """A quantized layer repacked into our quantized panels where this CPU's build takes
        the model's dtype (AVX-512 F and BW: float32 and bfloat16, the latter by bf16 dot
        products or widened to float32; the build's `qpanel_dtypes`); `--no-pack-linear` keeps
        the row-major codes."""
        dtype = str(self.dtype).removeprefix("torch.")
        if self.pack and dtype in getattr(layer.kernels, "qpanel_dtypes", ()):
            layer.into_panels()
        return layer

    def embedding(self, name: str, vocab_size: int) -> VocabEmbedding:
        start, _ = self.parallel.split(vocab_size)
        weight = self.tensor(Param.of(name, split=Split.ROWS))
        return VocabEmbedding(name, weight, start, self.parallel)

    def head(self, name: str, embedding: VocabEmbedding, tied: bool) -> VocabHead:
        """The LM head: the embedding's own tensor when tied or absent. With --quantize int8
        or int4 it is int8 per output channel (4 bits would cost the head too much); with
        fp8 it stays in the serving dtype (as TGI's)."""
        source = embedding.name if tied or name not in self.store else name
        stored = self._packed(Param.of(source, split=Split.ROWS), None)
        if stored is not None:  # a GGUF's own Q8_0 head
            return VocabHead(stored, self.parallel)
        if source == embedding.name:
            weight = embedding.weight
        else:
            quantized = self.quantize in METHODS
            weight = self.tensor(Param.of(name, split=Split.ROWS), count=not quantized)
        if self.quantize in METHODS:
            layer = QuantLinear.quantize(weight, None, "int8", 0, kernels=self.kernels)
            layer = self._paneled(layer)
            self.nbytes += layer.nbytes
            return VocabHead(layer, self.parallel)
        head = Linear(weight, pack=self.pack, gemv=self.gemv, panels=self.kernels)
        return VocabHead(head, self.parallel)
