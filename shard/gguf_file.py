"""A GGUF file's metadata and tensor table, read in one pass over its header.

`gguf.GGUFReader` makes a numpy view of every element of every metadata array: a
49,152-token vocabulary and its merges are ~98,000 strings, 8-20 s on one core, paid by
every shard at start-up and by each read of the config. Serving needs the scalars and the
tensor table; here a string array is walked by its lengths and kept as Python strings, a
numeric one is one numpy view, and the tensors are views of one memory map, shaped as
GGUFReader shapes them (numpy order, the last dimension in bytes for block kinds).

Layout (GGUF v2/v3): magic, version u32, tensor count u64, key-value count u64; each key a
string (u64 length, UTF-8) with a u32 value type and its value; each tensor's name, u32
dimension count, u64 dimensions (fastest first), u32 GGML type and u64 offset from the data
section, which starts at the next multiple of `general.alignment` (32 by default).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

# GGUFValueType -> (struct code, numpy dtype) for the fixed-size kinds
_SCALARS = {
    0: ("B", np.uint8),
    1: ("b", np.int8),
    2: ("H", np.uint16),
    3: ("h", np.int16),
    4: ("I", np.uint32),
    5: ("i", np.int32),
    6: ("f", np.float32),
    7: ("?", np.bool_),
    10: ("Q", np.uint64),
    11: ("q", np.int64),
    12: ("d", np.float64),
}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"
# element kinds read as their own dtype; every other kind is blocks of bytes
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: `shape` in GGUF's order (fastest dimension first), `data` a read-only
    view of its bytes in numpy's order (block kinds: uint8, the last dimension in bytes)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GgufFile:
    """`fields`: key -> value (int / float / bool / str; arrays as numpy or a list of str);
    `tensors`: in file order. ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, mode="r")
        self._bytes = self._map.data  # a memoryview: its slices cost no numpy object
        if self._bytes[:4] != _MAGIC:
            raise ValueError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        version = int(np.frombuffer(self._map, "<u4", 1, 4)[0])
        # a big-endian file's version reads 0x0300_0000 here
        self._order: Literal["<", ">"] = "<" if version & 0xFFFF else ">"
        self._at = 8
        try:
            tensor_count, field_count = self._unpack("QQ")
            self.fields = dict(self._field() for _ in range(field_count))
            table = [self._tensor_entry() for _ in range(tensor_count)]
        except struct.error as exc:
            raise ValueError(f"{self.path.name}: the GGUF header is cut short") from exc
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors = [self._tensor(start, *entry) for entry in table]

    def value(self, key: str) -> Any:
        """A metadata value; None when absent."""
        return self.fields.get(key)

    def _unpack(self, codes: str) -> tuple:
        fmt = self._order + codes
        values = struct.unpack_from(fmt, self._bytes, self._at)
        self._at += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (size,) = self._unpack("Q")
        text = str(self._bytes[self._at : self._at + size], "utf-8", "replace")
        self._at += size
        return text

    def _field(self) -> tuple[str, Any]:
        key = self._string()
        (kind,) = self._unpack("I")
        return key, self._value(kind)

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            inner, count = self._unpack("IQ")
            if inner == _STRING:
                return [self._string() for _ in range(count)]
            if inner not in _SCALARS:
                return [self._value(inner) for _ in range(count)]  # arrays of arrays
            dtype = np.dtype(_SCALARS[inner][1]).newbyteorder(self._order)
            values = np.frombuffer(self._map, dtype, count, self._at)
            self._at += values.nbytes
            return values
        if kind not in _SCALARS:
            raise ValueError(f"{self.path.name}: unknown GGUF value type {kind}")
        (value,) = self._unpack(_SCALARS[kind][0])
        return value

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (dims,) = self._unpack("I")
        shape = self._unpack("Q" * dims)
        kind, offset = self._unpack("IQ")
        return name, tuple(int(d) for d in shape), kind, offset

    def _tensor(self, start: int, name: str, shape: tuple, kind: int, offset: int) -> GgufTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        ggml_type = GGMLQuantizationType(kind)
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        dims = tuple(reversed(shape))  # numpy's order: the slowest dimension first
        count = int(np.prod(shape, dtype=np.int64))
        if ggml_type.name in _PLAIN:
            dtype = np.dtype(_PLAIN[ggml_type.name]).newbyteorder(self._order)
        else:
            dtype = np.dtype(np.uint8)
            dims = (*dims[:-1], dims[-1] // block * block_bytes)
            count = count // block * block_bytes
        at = start + offset
        if at + count * dtype.itemsize > len(self._map):
            raise ValueError(f"{self.path.name}: tensor {name} runs past the end of the file")
        data = np.frombuffer(self._map, dtype, count, at).reshape(dims)
        return GgufTensor(name, ggml_type, shape, data)
