"""The one reader and writer of safetensors files: strict header checks, lazy memory-mapped tensors.

Format: an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import ModelFileError
from ..files import replace_atomically

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIM = 1 << 31

# stored dtype name -> (numpy dtype of the raw bytes, item size)
DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # NumPy has no bfloat16: keep the raw bits, widen on read
    "F64": np.dtype("<f8"),
}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


class SafetensorsFile:
    """One safetensors file, validated on open; tensors are read lazily from a memory map."""

    def __init__(self, path: str):
        self.path = str(path)
        name = os.path.basename(self.path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelFileError(f"{name}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                    raise ModelFileError(f"{name}: not a safetensors file, or truncated "
                                         f"(header length {n}, file size {size})")
                raw = f.read(n)
        except OSError as e:
            raise ModelFileError(f"{name}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the parser's depth
            raise ModelFileError(f"{name}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{name}: corrupt safetensors header")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ModelFileError(f"{name}: corrupt safetensors metadata (not a string map)")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        self.entries = {k: self._check_entry(name, k, v, size - self.data_start)
                        for k, v in header.items()}
        self._check_overlaps(name)
        self._map = None

    @staticmethod
    def _check_entry(name, key, v, data_size):
        try:
            dtype, shape, (begin, end) = v["dtype"], v["shape"], v["data_offsets"]
            ok = isinstance(dtype, str) and isinstance(shape, list)
            ok = ok and all(isinstance(s, int) and 0 <= s < MAX_DIM for s in shape)
            ok = ok and isinstance(begin, int) and isinstance(end, int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(f"{name}: corrupt header entry for tensor {key!r}")
        if dtype not in DTYPES:
            raise ModelFileError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r} "
                                 f"(supported: F32, F16, BF16)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise ModelFileError(
                f"{name}: header lies about tensor {key!r} (shape {shape} {dtype} needs {nbytes} "
                f"bytes at [{begin}, {end}), data is {data_size} bytes): truncated or corrupt file")
        return dtype, tuple(shape), begin, end

    def _check_overlaps(self, name):
        spans = sorted((b, e, k) for k, (_, _, b, e) in self.entries.items() if e > b)
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise ModelFileError(f"{name}: tensors {k0!r} and {k1!r} overlap in the file")

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> str:
        return self.entries[key][0]

    def raw(self, key: str) -> np.ndarray:
        """The stored array as a read-only view of the memory map (no copy)."""
        dtype, shape, begin, end = self.entries[key]
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except OSError as e:
                raise ModelFileError(f"{os.path.basename(self.path)}: cannot map "
                                     f"({e.strerror})") from None
        buf = self._map[self.data_start + begin:self.data_start + end]
        # a plain ndarray view: slicing a memmap subclass costs a Python call every time
        return buf.view(np.ndarray).view(DTYPES[dtype]).reshape(shape)

    def tensor(self, key: str) -> np.ndarray:
        """The tensor as float32: a zero-copy view for F32, a widened copy otherwise."""
        dtype = self.entries[key][0]
        a = self.raw(key)
        if dtype == "F32":
            return a
        if dtype == "BF16":
            return bf16_bits_to_f32(a)
        return a.astype(np.float32)


def stored_dtypes(files: Iterable[SafetensorsFile]) -> str:
    """The dtypes the files' tensors are stored in, e.g. "F32" or "BF16,F32"."""
    return ",".join(sorted({f.dtype(k) for f in files for k in f.entries}))


def write_safetensors(path: str, specs: Iterable[tuple[str, tuple[int, ...]]],
                      get: Callable[[str], np.ndarray], dtype: str = "float32",
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time (never the whole model in memory), atomically.

    specs: (name, shape) in file order; get(name) returns the float32 array for that name.
    """
    code = DTYPE_NAMES[dtype]
    item = DTYPES[code].itemsize
    header, offset = {}, 0
    specs = list(specs)
    for name, shape in specs:
        nbytes = math.prod(shape) * item
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data start to 8 bytes
    with replace_atomically(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            a = np.asarray(get(name), dtype=np.float32)
            if a.shape != tuple(shape):
                raise ValueError(f"{name}: shape {a.shape} != declared {shape}")
            if code == "BF16":
                a = f32_to_bf16_bits(a)
            elif code == "F16":
                a = a.astype(np.float16)
            f.write(np.ascontiguousarray(a).astype(DTYPES[code], copy=False).tobytes())
