"""The GGUF container, read strictly: header, key/values and tensor infos; tensors as views of a
memory map. What the keys and tensors mean is gguf.py's business.

Every count and length is checked against the bytes left in the file before it is used, so a
damaged file is refused in time proportional to its size and never makes us allocate what it
merely declares. (The `gguf` package's reader loops on a huge array count and reads past the
end as empty arrays: it is used here only for its tables of quantization types.)

Layout (little-endian): "GGUF", version (uint32, 2 or 3), tensor count and key/value count
(uint64 each); each key/value: key (string), value type (uint32), value; each tensor info: name
(string), n_dims (uint32), dims (uint64 each, innermost first), ggml type (uint32), offset
(uint64, from the data start); padding to the alignment (`general.alignment`, default 32); the
tensor data. A string is a uint64 length and UTF-8 bytes; an array a uint32 item type, a uint64
count and the items.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFileError

VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS

# value types (gguf.GGUFValueType)
STRING, ARRAY, BOOL = 8, 9, 7
SCALARS = {0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
           4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), BOOL: np.dtype("<u1"),
           10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8")}
# ggml types stored as plain arrays; every other type is kept as bytes, a row per innermost row
PLAIN_TENSOR_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}


@dataclass(frozen=True)
class Field:
    """One key's value: str, int, float, bool, or a list of them. `contents()` as gguf's
    ReaderField has it, so that code taking either reader reads both alike."""

    type: int
    value: Any

    def contents(self):
        return self.value


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    tensor_type: Any        # gguf.GGMLQuantizationType
    data: np.ndarray        # float32/float16 [outer..inner], or uint8 [outer.., bytes per row]


class _Cursor:
    """Reads forward through the file's bytes; refuses anything that runs past the end."""

    def __init__(self, buf, name: str):
        self.buf, self.view, self.name, self.pos = buf, memoryview(buf), name, 0

    def fail(self, problem: str):
        raise ModelFileError(f"{self.name}: not a GGUF file, or truncated or corrupt ({problem})")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has "
                      f"{len(self.buf) - self.pos} left")

    def scalar(self, dtype: np.dtype, what: str):
        self.need(dtype.itemsize, what)
        (value,) = struct.unpack_from("<" + dtype.char, self.view, self.pos)
        self.pos += dtype.itemsize
        return value

    def u32(self, what: str) -> int:
        return self.scalar(SCALARS[4], what)

    def u64(self, what: str) -> int:
        return self.scalar(SCALARS[10], what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        raw = self.view[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, kind: int, what: str):
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            return self.array(what)
        if kind not in SCALARS:
            self.fail(f"{what} has unknown value type {kind}")
        value = self.scalar(SCALARS[kind], what)
        return bool(value) if kind == BOOL else value

    def array(self, what: str) -> list:
        kind = self.u32(f"the item type of {what}")
        count = self.u64(f"the length of {what}")
        if kind == STRING:
            self.need(count * 8, f"{count} strings of {what}")  # each has an 8-byte length
            return [self.string(f"item {i} of {what}") for i in range(count)]
        if kind not in SCALARS:
            self.fail(f"{what} is an array of unsupported value type {kind}")
        dtype = SCALARS[kind]
        self.need(count * dtype.itemsize, f"{count} items of {what}")
        items = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += count * dtype.itemsize
        return (items != 0).tolist() if kind == BOOL else items.tolist()


class GGUFFile:
    """A GGUF file's key/values (`fields`, `get_field`) and tensors (`tensors`), checked."""

    def __init__(self, path: str):
        self.path = str(path)
        name = os.path.basename(self.path)
        try:
            size = os.path.getsize(self.path)
            # an empty file cannot be mapped; a 4-byte one is refused below
            buf = np.memmap(self.path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        except OSError as e:
            raise ModelFileError(f"{name}: cannot read ({e.strerror})") from None
        cur = _Cursor(buf, name)
        cur.need(4, "the magic bytes")
        if bytes(buf[:4]) != b"GGUF":
            cur.fail("no GGUF magic bytes")
        cur.pos = 4
        version = cur.u32("the version")
        if version not in VERSIONS:
            cur.fail(f"GGUF version {version}; minillm reads versions 2 and 3, little-endian")
        n_tensors = cur.u64("the tensor count")
        n_fields = cur.u64("the key/value count")
        self.fields: dict[str, Field] = {}
        for _ in range(n_fields):  # each key/value takes at least 13 bytes: bounded by the size
            self._read_field(cur)
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        alignment = self._alignment(cur)
        data_start = cur.pos + (-cur.pos % alignment)
        self.tensors = [self._tensor(cur, buf, data_start, *info) for info in infos]
        self._check_overlaps(cur)

    def get_field(self, key: str) -> Field | None:
        return self.fields.get(key)

    def _read_field(self, cur: _Cursor) -> None:
        key = cur.string("a metadata key")
        kind = cur.u32(f"the value type of {key!r}")
        value = cur.value(kind, f"the value of {key!r}")
        if key in self.fields:
            cur.fail(f"the metadata key {key!r} appears twice")
        self.fields[key] = Field(kind, value)

    @staticmethod
    def _read_tensor_info(cur: _Cursor) -> tuple:
        name = cur.string("a tensor name")
        n_dims = cur.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims))
        ggml_type = cur.u32(f"the type of tensor {name!r}")
        offset = cur.u64(f"the data offset of tensor {name!r}")
        return name, dims, ggml_type, offset

    def _alignment(self, cur: _Cursor) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        a = field.value
        if field.type != 4 or a == 0 or a & (a - 1):
            cur.fail(f"general.alignment is {a!r}, not a power of two stored as uint32")
        return a

    def _tensor(self, cur: _Cursor, buf, data_start: int, name: str, dims: tuple, ggml_type: int,
                offset: int) -> Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            kind = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        if 0 in dims or dims[0] % block:
            cur.fail(f"tensor {name!r} has dimensions {list(dims)}: empty, or rows that are not "
                     f"whole {kind.name} blocks of {block}")
        nbytes = math.prod(dims) // block * type_size
        begin = data_start + offset
        if begin + nbytes > len(buf):
            cur.fail(f"tensor {name!r} ({list(dims)} {kind.name}, {nbytes} bytes at data offset "
                     f"{offset}) runs past the end of the file")
        outer = tuple(reversed(dims[1:]))
        if ggml_type in PLAIN_TENSOR_DTYPES:
            dtype, shape = PLAIN_TENSOR_DTYPES[ggml_type], outer + (dims[0],)
        else:
            dtype, shape = np.dtype(np.uint8), outer + (dims[0] // block * type_size,)
        data = np.frombuffer(buf, dtype, math.prod(shape), begin).reshape(shape)
        return Tensor(name, dims, kind, data)

    def _check_overlaps(self, cur: _Cursor) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            cur.fail("two tensors have the same name")
        spans = sorted((t.data.__array_interface__["data"][0], t.data.nbytes, t.name)
                       for t in self.tensors)
        for (b0, n0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < b0 + n0:
                cur.fail(f"tensors {k0!r} and {k1!r} overlap in the file")
