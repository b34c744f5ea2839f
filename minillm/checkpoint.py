"""Session checkpoints: the cache slots in use plus one flat metadata record, written atomically.

File: a NumPy .npz holding `k`, `v`, `k_raw`, `pos`, `last_hidden` and `meta`, the UTF-8 JSON of
a flat record: `format`, `model` (the model's fingerprint), the attention settings (`preset`,
`n_global`, `n_local`, `ceiling`), `position`, and whatever flat keys the caller adds (the
scorer adds its sums and where it is in the input). Checkpoints of format 1 (minillm 0.1 before
this module) nested a second JSON inside; they are refused with a message saying so.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tokenize
import warnings
import zipfile

import numpy as np

from .backend import to_device, to_host
from .errors import MiniLLMError, one_line
from .files import replace_atomically

FORMAT = 2
ARRAYS = ("k", "v", "k_raw", "pos", "last_hidden")
CHECKPOINT_KEYS = ("format", "model", "preset", "n_global", "n_local", "ceiling", "position")


def write_checkpoint(path: str, session, record: dict | None = None) -> None:
    """Write `session` and the caller's flat `record` to `path` atomically (minillm.files): a
    crash, a full disk or a signal leaves either the old checkpoint or the new one."""
    record = dict(record or {})
    flat = (str, int, float, bool, type(None))
    clash = [k for k in record if k in CHECKPOINT_KEYS or not isinstance(record[k], flat)]
    if clash:
        raise ValueError(f"checkpoint record keys must be flat and not {CHECKPOINT_KEYS}: {clash}")
    spec = session.spec
    meta = {"format": FORMAT, "model": session.model.fingerprint, "preset": spec.preset,
            "n_global": spec.n_global, "n_local": spec.n_local, "ceiling": spec.ceiling,
            "position": session.position, **record}
    last = session.last_hidden
    arrays = dict(session.cache.used_slots(),
                  last_hidden=to_host(last) if last is not None else np.zeros(0, np.float32))
    with replace_atomically(path) as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def read_checkpoint(path: str, model):
    """(the saved session for `model`, the flat record). One clear MiniLLMError otherwise.

    Nothing in the file is believed before it is checked: every member's size against the
    file's, the record's types, and the arrays against what a session with the record's
    settings holds at its position (shapes, dtypes, and which position each slot holds).
    """
    from .session import AttentionWarning, Session

    arrays = _read_arrays(path)
    meta = _read_meta(path, arrays.pop("meta"), model)
    spec = _attention_spec(path, meta, model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttentionWarning)
            session = Session(model, spec.preset, spec.n_global, spec.n_local, spec.ceiling)
    except MiniLLMError as e:  # a cache larger than the memory there is
        raise MiniLLMError(f"{path}: {e}") from None
    _check_arrays(path, arrays, session, meta["position"])
    session.cache.restore(arrays["k"], arrays["v"], arrays["k_raw"], arrays["pos"],
                          meta["position"])
    if arrays["last_hidden"].size:
        session.last_hidden = to_device(model.xp, arrays["last_hidden"])
    return session, meta


# what np.savez writes for each member (write_checkpoint): name -> dtype
_MEMBERS = {"meta": np.dtype(np.uint8), "k": np.dtype("<f4"), "v": np.dtype("<f4"),
            "k_raw": np.dtype("<f4"), "pos": np.dtype("<i8"), "last_hidden": np.dtype("<f4")}
# positions past 2**53 are not exact in the float64 rotary angles
MAX_POSITION = 1 << 53


class _Damaged(Exception):
    """Inside the reader: the file is not a readable checkpoint, for the reason given."""


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    """The members np.savez wrote, each checked before it is read: stored (not compressed),
    no larger than the file, an .npy header of the expected dtype whose shape fits its data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            return {name: _read_member(z, name, dtype, size) for name, dtype in _MEMBERS.items()}
    # NotImplementedError: a zip feature zipfile does not read (a newer zip version, ...)
    except (OSError, EOFError, ValueError, struct.error, zipfile.BadZipFile,
            NotImplementedError) as e:
        reason = getattr(e, "strerror", None) or one_line(e)
        raise MiniLLMError(f"{path}: not a minillm checkpoint ({reason})") from None
    except _Damaged as e:
        raise MiniLLMError(f"{path}: not a minillm checkpoint ({e})") from None


def _read_member(z: zipfile.ZipFile, name: str, dtype: np.dtype, file_size: int) -> np.ndarray:
    try:
        info = z.getinfo(f"{name}.npy")
    except KeyError:
        raise _Damaged(f"no {name} array") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise _Damaged(f"{name} is compressed or encrypted")
    if info.file_size > file_size:
        raise _Damaged(f"{name} claims {info.file_size} bytes, the file has {file_size}")
    raw = z.read(info)  # also checks the CRC
    member = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise _Damaged(f"{name} is an .npy file of version {version}")
        shape, fortran_order, stored = read_header(member)
    except (ValueError, SyntaxError, tokenize.TokenError):  # what NumPy's header parser raises
        raise _Damaged(f"the .npy header of {name} is corrupt") from None
    data = raw[member.tell():]
    if stored != dtype:
        raise _Damaged(f"{name} is {stored}, not {dtype}")
    if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize != len(data):
        raise _Damaged(f"{name} holds {len(data)} bytes, not the {stored} {list(shape)} its "
                       f"header says")
    # np.savez writes a Fortran-ordered array (k, a transposed view) in that order
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy()


def _read_meta(path: str, raw: np.ndarray, model) -> dict:
    try:
        meta = json.loads(raw.tobytes())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the parser's depth
        raise MiniLLMError(f"{path}: not a minillm checkpoint (its record is not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise MiniLLMError(f"{path}: a checkpoint of format {version}, this minillm reads format "
                           f"{FORMAT} only: start the run again")
    if meta.get("model") != model.fingerprint:
        raise MiniLLMError(f"{path}: the checkpoint was made with another model")
    flat = (str, int, float, bool, type(None))
    nested = [k for k, v in meta.items() if not isinstance(v, flat)]
    if nested:
        raise MiniLLMError(f"{path}: a damaged minillm checkpoint ({nested[0]} is not a flat "
                           f"value)")
    return meta


def _attention_spec(path: str, meta: dict, model):
    """The session settings the record names, exactly as attention_spec resolves them."""
    from .attention import AttentionSpec, attention_spec

    def integer(key: str, optional: bool = False, low: int = 0, high: int = MAX_POSITION):
        v = meta.get(key)
        if v is None and optional and key in meta:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise MiniLLMError(f"{path}: a damaged minillm checkpoint ({key} is {v!r}, not an "
                               f"integer in [{low}, {high}])")
        return v

    integer("position")
    spec = AttentionSpec(meta.get("preset"), integer("n_global"), integer("n_local", True, 1),
                         integer("ceiling", True))
    try:
        resolved = attention_spec(model.config, spec.preset, spec.n_global, spec.n_local,
                                  spec.ceiling)
    except (TypeError, ValueError) as e:
        raise MiniLLMError(f"{path}: a damaged minillm checkpoint ({e})") from None
    if resolved != spec:
        raise MiniLLMError(f"{path}: a damaged minillm checkpoint (attention settings {spec} "
                           f"are not those of a session)")
    return spec


def _check_arrays(path: str, arrays: dict, session, position: int) -> None:
    """The arrays are the used slots of `session`'s cache at `position` (KVCache.used_slots)."""
    cache, cfg = session.cache, session.model.config
    used = min(position, cache.n_slots) if cache.bounded else position
    layers, kv, d = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
    want = {"k": (layers, kv, used, d), "v": (layers, kv, used, d),
            "k_raw": (layers, kv, cache.n_global, d), "pos": (used,),
            "last_hidden": (cfg.hidden_size,) if arrays["last_hidden"].size else (0,)}
    for name, shape in want.items():
        if arrays[name].shape != shape:
            raise MiniLLMError(f"{path}: a damaged minillm checkpoint ({name} has shape "
                               f"{list(arrays[name].shape)}, the session at position {position} "
                               f"holds {list(shape)})")
    if not np.array_equal(arrays["pos"], _slot_positions(cache, position, used)):
        raise MiniLLMError(f"{path}: a damaged minillm checkpoint (its slots do not hold the "
                           f"positions a session at position {position} holds)")


def _slot_positions(cache, position: int, used: int) -> np.ndarray:
    """The position each used slot holds: the global ones, and the newest ring positions."""
    n_global = min(cache.n_global, position)
    kept = np.concatenate([np.arange(n_global, dtype=np.int64),
                           np.arange(max(n_global, position - (used - n_global)), position,
                                     dtype=np.int64)])
    out = np.empty(used, np.int64)
    out[cache.slot_of(kept)] = kept
    return out
