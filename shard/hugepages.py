"""CPU weights and KV pools in 2 MiB pages (Linux transparent huge pages).

A decode step streams every weight once, and a batch's attention reads K/V blocks that lie
anywhere in the pool. With 4 KiB pages each 4 KiB of those reads costs a TLB entry and the
hardware prefetcher stops at every page's end; in 2 MiB pages the same loops read faster
(benchmarks/RESULTS.md, "Huge pages"). PyTorch's allocator advises huge pages only under
THP_MEM_ALLOC_ENABLE and only for allocations of 2 MiB or more, which most of a small
model's layers are not, so the shard moves what it streams into one arena of its own.

Where the kernel has no transparent huge pages (`never`, other systems), the arena is a
plain allocation and everything works as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor in an arena starts on a cache line
_TRIM_EVERY = 32 << 20  # bytes copied between handing freed memory back
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@cache
def _libc() -> Any:
    """The C library (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@cache
def available() -> bool:
    """Whether arenas here are advised for huge pages."""
    try:
        return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in _THP.read_text()
    except OSError:
        return False


def arena(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] on a 2 MiB boundary in memory of its own (a fresh anonymous mapping,
    no page touched yet: the C heap may hand out pages already mapped small), advised for
    huge pages where the system has them (the first write to each 2 MiB maps a huge one).
    The mapping lives as long as any tensor on it."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared: no THP
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    if available() and nbytes > 0:
        try:
            region.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
        except OSError as exc:  # an old kernel: small pages, as before
            log.debug("madvise(MADV_HUGEPAGE): %s", exc)
    return raw[start : start + nbytes]


Shapes = list[tuple[tuple[int, ...], torch.dtype]]


def _layout(shapes: Shapes) -> tuple[list[int], int]:
    """Byte offsets of tensors of `shapes` laid out one after another, each on a cache
    line, and the bytes they span."""
    offsets, end = [], 0
    for shape, dtype in shapes:
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        end = start + math.prod(shape) * dtype.itemsize
    return offsets, end


def carved(shapes: Shapes) -> list[torch.Tensor]:
    """Uninitialized tensors of `shapes` side by side in one arena."""
    offsets, total = _layout(shapes)
    buffer = arena(total)
    return [
        buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for start, (shape, dtype) in zip(offsets, shapes, strict=True)
    ]


def zeros(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """`count` zeroed tensors of `shape` side by side in one arena (the KV pools)."""
    out = carved([(shape, dtype)] * count)
    for t in out:
        t.zero_()
    return out


def _trim() -> None:
    """Hands the C heap's free pages back to the system: the weights' old copies were
    freed, but glibc keeps freed blocks under its mmap threshold (up to 32 MiB) mapped."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _movable(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and not value.is_mkldnn
        and value.is_contiguous()
        and value.numel() > 0
    )


def _is_model_part(value: Any) -> bool:
    """Objects of shard.models (layers, linear layers, heads) and lists of them are walked;
    anything else (ops, the process group, the spec) is not."""
    module = type(value).__module__ or ""
    return module.startswith("shard.models") and not isinstance(value, type)


def _fields(obj: Any) -> list[str]:
    names = list(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return names


class _Walk:
    """The model's movable tensors: where each is held (an object's attribute or a list's
    item, alone or in a tuple), each distinct tensor once."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}  # key -> tensor, in first-seen order
        self.sites: dict[tuple, list[tuple[Any, Any]]] = {}  # key -> (holder, name) holding it
        self.tuples: list[tuple[Any, Any, tuple]] = []  # (holder, name, keys of its items)
        self._seen: set[int] = set()

    def _note(self, t: torch.Tensor) -> tuple:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        self.tensors.setdefault(key, t)
        return key

    def visit(self, obj: Any) -> None:
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        if isinstance(obj, list):
            items: Any = enumerate(obj)
        else:
            items = ((n, getattr(obj, n, None)) for n in _fields(obj))
        for name, value in items:
            if _movable(value):
                self.sites.setdefault(self._note(value), []).append((obj, name))
            elif isinstance(value, tuple) and value and all(map(_movable, value)):
                self.tuples.append((obj, name, tuple(self._note(t) for t in value)))
            elif isinstance(value, list) or _is_model_part(value):
                self.visit(value)


def _put(holder: Any, name: Any, value: Any) -> None:
    if isinstance(holder, list):
        holder[name] = value
    else:
        setattr(holder, name, value)


def relocate(model: Any) -> int:
    """Moves the model's CPU weights into one huge-page arena, in the order the model holds
    them; returns the bytes moved. Every contiguous tensor its layers hold moves, norms too:
    one tensor left on a checkpoint's mapping would keep the whole file mapped. A tensor
    held in several places stays one tensor. Each old tensor is let go once copied, so the
    weights' memory is held about once, not twice. Call it before anything else keeps
    references to the weights (the C++ decode step does)."""
    walk = _Walk()
    walk.visit(model)
    if not walk.tensors:
        return 0
    keys = list(walk.tensors)
    shapes = [(tuple(t.shape), t.dtype) for t in walk.tensors.values()]
    moved, since_trim = {}, 0
    for key, new in zip(keys, carved(shapes), strict=True):
        new.copy_(walk.tensors.pop(key))
        moved[key] = new
        for holder, name in walk.sites.get(key, ()):
            _put(holder, name, new)
        since_trim += new.numel() * new.element_size()
        if since_trim >= _TRIM_EVERY:  # the peak: about one stretch of copies above the weights
            _trim()
            since_trim = 0
    for holder, name, items in walk.tuples:
        _put(holder, name, tuple(moved[k] for k in items))
    _trim()
    return _layout(shapes)[1]
