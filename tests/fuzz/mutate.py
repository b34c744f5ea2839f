"""Damaged files as data: hypothesis strategies that describe them, and `apply` that makes them.

A description is JSON: {"seed": a seed's name, "ops": [[kind, *args], ...]}. `apply` runs the
ops in three stages, whatever their order in the list:

1. structure: edits of the parsed file, which is then written again (a safetensors header's
   JSON, the minillm.* metadata, a GGUF's key/values and tensor infos, a checkpoint's meta
   record and arrays);
2. layout: one binary field of the written file set to any value (a GGUF count, length or type
   field, a zip header field, the safetensors header length);
3. bytes: truncation, flips, overwrites, insertions, deletions anywhere.

Offsets and indices are taken modulo what they index, so every description applies to every
seed of its reader.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import io
import json
import struct
import zipfile

import numpy as np
from hypothesis import strategies as st

from .seeds import CHECKPOINT_SEEDS, GGUF_SEEDS, SAFETENSORS_SEEDS, Seeds

# --- values -----------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, -1, -2, 7, 31, 32, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**12, -(2**63)]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 300), st.integers(-2**70, 2**70))
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.text(max_size=24)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=8)
u64 = st.one_of(st.sampled_from([v % 2**64 for v in EDGE_INTS]), st.integers(0, 2**64 - 1),
                st.integers(0, 4096))
offsets = st.one_of(st.integers(0, 64), st.integers(0, 8192), st.integers(0, 2**20))
raw_bytes = st.binary(min_size=1, max_size=16)


def _hex(b: bytes) -> str:
    return b.hex()


# --- stage 3: raw bytes (every reader) ---------------------------------------------------------

def _at(data: bytes, offset: int) -> int:
    return offset % len(data) if data else 0


def _truncate(data, n):
    return data[:n % (len(data) + 1)]


def _flip(data, offset, mask):
    if not data:
        return data
    i = _at(data, offset)
    return data[:i] + bytes([data[i] ^ (mask or 1)]) + data[i + 1:]


def _overwrite(data, offset, hexed):
    i, new = _at(data, offset), bytes.fromhex(hexed)
    return data[:i] + new + data[i + len(new):]


def _insert(data, offset, hexed):
    i = _at(data, offset)
    return data[:i] + bytes.fromhex(hexed) + data[i:]


def _delete(data, offset, n):
    i = _at(data, offset)
    return data[:i] + data[i + n:]


def _integer(data, offset, size, value):
    """An integer of `size` bytes (little-endian, two's complement) written at `offset`."""
    i = _at(data, offset)
    return data[:i] + (value % 2**(8 * size)).to_bytes(size, "little") + data[i + size:]


BYTE_OPS = {"truncate": _truncate, "flip": _flip, "overwrite": _overwrite, "insert": _insert,
            "delete": _delete, "integer": _integer}

byte_ops = st.one_of(
    st.tuples(st.just("truncate"), offsets),
    st.tuples(st.just("flip"), offsets, st.integers(1, 255)),
    st.tuples(st.just("overwrite"), offsets, raw_bytes.map(_hex)),
    st.tuples(st.just("insert"), offsets, raw_bytes.map(_hex)),
    st.tuples(st.just("delete"), offsets, st.integers(1, 64)),
    st.tuples(st.just("integer"), offsets, st.sampled_from([1, 2, 4, 8]), ints),
).map(list)


# --- safetensors: the header's JSON ------------------------------------------------------------

def st_split(data: bytes) -> tuple[dict, bytes] | None:
    """(header, tensor data) of a safetensors file, or None when it no longer parses."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError, RecursionError):
        return None
    return (header, data[8 + n:]) if isinstance(header, dict) else None


def st_join(header, blob: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob


def _tensor_key(header: dict, index: int) -> str | None:
    keys = sorted(k for k in header if k != "__metadata__")
    return keys[index % len(keys)] if keys else None


def _entry_set(header, blob, index, field, value):
    key = _tensor_key(header, index)
    if key is not None and isinstance(header[key], dict):
        header[key][field] = value
    return header, blob


def _entry_del(header, blob, index, field):
    key = _tensor_key(header, index)
    if key is not None and isinstance(header[key], dict):
        header[key].pop(field, None)
    return header, blob


def _entry_replace(header, blob, index, value):
    key = _tensor_key(header, index)
    if key is not None:
        header[key] = value
    return header, blob


def _entry_drop(header, blob, index):
    key = _tensor_key(header, index)
    if key is not None:
        del header[key]
    return header, blob


def _entry_copy(header, blob, index, new_name):
    """A second name for the same bytes: overlapping tensors, or an unexpected one."""
    key = _tensor_key(header, index)
    if key is not None:
        header[new_name] = copy.deepcopy(header[key])
    return header, blob


def _entry_rename(header, blob, index, new_name):
    key = _tensor_key(header, index)
    if key is not None:
        header[new_name] = header.pop(key)
    return header, blob


def _entry_shift(header, blob, index, delta_begin, delta_end):
    """Offsets that lie: moved by a few bytes, into a neighbour or past the end."""
    key = _tensor_key(header, index)
    entry = header.get(key) if key is not None else None
    if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) \
            and len(entry["data_offsets"]) == 2:
        b, e = entry["data_offsets"]
        if isinstance(b, int) and isinstance(e, int):
            entry["data_offsets"] = [b + delta_begin, e + delta_end]
    return header, blob


def _entry_like(header, blob, index, other):
    """Tensor `index` claims the bytes of tensor `other` (same size: only the overlap is wrong)."""
    key, src = _tensor_key(header, index), _tensor_key(header, other)
    if key is not None and isinstance(header[key], dict) and isinstance(header[src], dict):
        header[key]["data_offsets"] = copy.deepcopy(header[src].get("data_offsets"))
    return header, blob


def _whole_header(header, blob, value):
    return value, blob


def _meta_whole(header, blob, value):
    header["__metadata__"] = value
    return header, blob


def _meta_set(header, blob, key, value):
    """Any JSON value under a metadata key (safetensors allows strings only)."""
    meta = header.setdefault("__metadata__", {})
    if isinstance(meta, dict):
        meta[key] = value
    return header, blob


ST_STRUCTURE = {"entry_set": _entry_set, "entry_del": _entry_del,
                "entry_replace": _entry_replace, "entry_drop": _entry_drop,
                "entry_copy": _entry_copy, "entry_rename": _entry_rename,
                "entry_shift": _entry_shift, "entry_like": _entry_like,
                "header": _whole_header, "meta_whole": _meta_whole, "meta_set": _meta_set}

indices = st.integers(0, 63)
dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL",
                                    "F8_E4M3", "f32", ""]), json_values)
shapes = st.one_of(
    st.lists(st.one_of(st.integers(0, 70), st.sampled_from(EDGE_INTS)), max_size=4),
    json_values)
data_offsets = st.one_of(st.lists(st.one_of(st.integers(-10, 200_000), st.sampled_from(EDGE_INTS)),
                                  min_size=2, max_size=2),
                         json_values)
tensor_names = st.one_of(st.sampled_from(["model.norm.weight", "lm_head.weight", "extra.weight",
                                          "__metadata__", ""]), texts)
entry_field = st.one_of(
    st.tuples(st.just("dtype"), dtypes), st.tuples(st.just("shape"), shapes),
    st.tuples(st.just("data_offsets"), data_offsets),
    st.tuples(st.sampled_from(["other", "Dtype"]), json_values))

safetensors_structure_ops = st.one_of(
    st.tuples(st.just("entry_set"), indices, entry_field).map(lambda t: [t[0], t[1], *t[2]]),
    st.tuples(st.just("entry_del"), indices, st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("entry_replace"), indices, json_values),
    st.tuples(st.just("entry_drop"), indices),
    st.tuples(st.just("entry_copy"), indices, tensor_names),
    st.tuples(st.just("entry_rename"), indices, tensor_names),
    st.tuples(st.just("entry_shift"), indices, st.integers(-300, 300), st.integers(-300, 300)),
    st.tuples(st.just("entry_like"), indices, indices),
    st.tuples(st.just("header"), json_values.filter(lambda v: not isinstance(v, dict))),
    st.tuples(st.just("meta_whole"), json_values),
    st.tuples(st.just("meta_set"), st.sampled_from(["minillm.format", "minillm.config", "x"]),
              json_values),
).map(list)


def _header_length(data, value):
    return _integer(data, 0, 8, value)


def _header_bytes(data, hexed):
    """The header replaced by raw bytes (not JSON, not UTF-8), its length field kept true."""
    parts = st_split(data)
    if parts is None:
        return data
    raw = bytes.fromhex(hexed)
    return struct.pack("<Q", len(raw)) + raw + parts[1]


def _header_nested(data, depth):
    """A header of `depth` nested arrays: deeper than any JSON parser recurses."""
    return _header_bytes(data, (b"[" * depth).hex())


ST_LAYOUT = {"header_length": _header_length, "header_bytes": _header_bytes,
             "header_nested": _header_nested}
nesting = st.sampled_from([100, 5000, 100_000])
safetensors_layout_ops = st.one_of(
    st.tuples(st.just("header_length"), ints),
    st.tuples(st.just("header_nested"), nesting),
    st.tuples(st.just("header_bytes"),
              st.one_of(st.binary(max_size=40),
                        texts.map(lambda t: ("{" + t).encode("utf-8", "surrogatepass"))).map(_hex)),
).map(list)


# --- the minillm.* metadata inside a single file ------------------------------------------------

METADATA_KEYS = ["minillm.format", "minillm.config", "minillm.tokenizer_config",
                 "minillm.tokenizer_json", "minillm.sentencepiece_b64", "minillm.chat_template"]
JSON_KEYS = ["minillm.config", "minillm.tokenizer_config", "minillm.tokenizer_json"]
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
               "rope_theta", "rope_scaling", "rope_parameters", "head_dim", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "hidden_act", "architectures", "model_type",
               "attention_bias", "mlp_bias"]
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta"]
TOKENIZER_PATHS = [["model", "vocab", "<s>"], ["model", "vocab"], ["model", "merges"],
                   ["model", "merges", 0], ["model", "type"], ["model"], ["added_tokens"],
                   ["added_tokens", 0], ["added_tokens", 0, "id"], ["added_tokens", 1, "content"],
                   ["pre_tokenizer"], ["pre_tokenizer", "type"], ["post_processor"],
                   ["post_processor", "type"], ["decoder"], ["normalizer"], ["version"]]
TOKENIZER_CONFIG_KEYS = ["add_bos_token", "bos_token", "eos_token", "chat_template"]
rope_values = st.one_of(json_values, st.dictionaries(st.sampled_from(ROPE_KEYS), json_values,
                                                     max_size=5))


def _metadata(header: dict) -> dict | None:
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else None


def _md_del(header, blob, key):
    meta = _metadata(header)
    if meta is not None:
        meta.pop(key, None)
    return header, blob


def _md_text(header, blob, key, text):
    meta = _metadata(header)
    if meta is not None:
        meta[key] = text
    return header, blob


def _md_json(header, blob, key, value):
    return _md_text(header, blob, key, json.dumps(value))


def _set_path(doc, path, value):
    """doc with doc[path[0]][path[1]]... = value where every step exists (else doc unchanged)."""
    node = doc
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return doc
    step = path[-1]
    in_list = isinstance(node, list) and isinstance(step, int) and -len(node) <= step < len(node)
    if in_list or (isinstance(node, dict) and isinstance(step, str)):
        node[step] = value
    return doc


def _md_edit(header, blob, key, path, value):
    """One value inside a metadata key's JSON replaced."""
    meta = _metadata(header)
    if meta is None or key not in meta:
        return header, blob
    try:
        doc = json.loads(meta[key])
    except (TypeError, ValueError, RecursionError):
        return header, blob
    meta[key] = json.dumps(_set_path(doc, path, value) if path else value)
    return header, blob


def _md_spm(header, blob, offset, hexed):
    """Bytes of the SentencePiece model overwritten (then base64 again)."""
    meta = _metadata(header)
    try:
        model = base64.b64decode(meta["minillm.sentencepiece_b64"], validate=True)
    except (TypeError, KeyError, ValueError):  # ValueError: not base64, not ASCII
        return header, blob
    meta["minillm.sentencepiece_b64"] = base64.b64encode(
        _overwrite(model, offset, hexed)).decode()
    return header, blob


def _md_b64(header, blob, hexed):
    meta = _metadata(header)
    if meta is not None:
        meta["minillm.sentencepiece_b64"] = base64.b64encode(bytes.fromhex(hexed)).decode()
    return header, blob


def _md_nested(header, blob, key, depth):
    return _md_text(header, blob, key, "[" * depth)


MD_STRUCTURE = {"md_del": _md_del, "md_text": _md_text, "md_json": _md_json,
                "md_edit": _md_edit, "md_spm": _md_spm, "md_b64": _md_b64,
                "md_nested": _md_nested}

jinja_texts = st.one_of(
    texts,
    st.sampled_from(["{% for %}", "{{ messages[0]['content'] }}", "{{ raise_exception('no') }}",
                     "{% if x %}", "{{ bos_token * 3 }}{{ eos_token }}", "{{ 1/0 }}",
                     "{{ messages|length }}{% for m in messages %}{{ m.role }}{% endfor %}",
                     "{{ ''.__class__ }}", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}"]))
metadata_structure_ops = st.one_of(
    st.tuples(st.just("md_del"), st.sampled_from(METADATA_KEYS)),
    st.tuples(st.just("md_text"), st.sampled_from(METADATA_KEYS), texts),
    st.tuples(st.just("md_text"), st.just("minillm.chat_template"), jinja_texts),
    st.tuples(st.just("md_json"), st.sampled_from(METADATA_KEYS), json_values),
    st.tuples(st.just("md_edit"), st.just("minillm.config"),
              st.sampled_from(CONFIG_KEYS).map(lambda k: [k]), json_values),
    st.tuples(st.just("md_edit"), st.just("minillm.config"),
              st.sampled_from(["rope_scaling", "rope_parameters"]).map(lambda k: [k]),
              rope_values),
    st.tuples(st.just("md_edit"), st.just("minillm.tokenizer_config"),
              st.sampled_from(TOKENIZER_CONFIG_KEYS).map(lambda k: [k]), json_values),
    st.tuples(st.just("md_edit"), st.just("minillm.tokenizer_json"),
              st.sampled_from(TOKENIZER_PATHS), json_values),
    st.tuples(st.just("md_edit"), st.sampled_from(JSON_KEYS), st.just([]), json_values),
    st.tuples(st.just("md_spm"), offsets, raw_bytes.map(_hex)),
    st.tuples(st.just("md_b64"), st.binary(max_size=64).map(_hex)),
    st.tuples(st.just("md_nested"), st.sampled_from(JSON_KEYS), nesting),
).map(list)


# --- GGUF: key/values and tensor infos ---------------------------------------------------------

# GGUF value types (gguf.GGUFValueType) and their struct formats
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)
SCALAR_FORMATS = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i",
                  FLOAT32: "f", BOOL: "B", UINT64: "Q", INT64: "q", FLOAT64: "d"}


def gguf_layout(path) -> dict:
    """A valid GGUF as plain data, read by the gguf package: {"version", "alignment", "kvs":
    [[key, type, value]], "tensors": [[name, dims (ggml order), ggml type, offset]], "data"}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    kvs = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = int(field.types[0])
        value = field.contents()
        if kind == ARRAY:
            value = [int(field.types[-1]), value]
        kvs.append([key, kind, value])
    tensors = [[t.name, [int(d) for d in t.shape], int(t.tensor_type),
                int(t.data_offset - reader.data_offset)] for t in reader.tensors]
    data = bytes(reader.data[reader.data_offset:])
    return {"version": 3, "alignment": int(reader.alignment), "kvs": kvs, "tensors": tensors,
            "data": data}


class _GGUFWriter:
    """Writes a layout back to bytes, noting where every count, length and type field lies."""

    def __init__(self):
        self.out = bytearray()
        self.fields: dict[str, list[tuple[int, int]]] = {}

    def num(self, fmt: str, value, label: str | None = None):
        if label:
            self.fields.setdefault(label, []).append((len(self.out), struct.calcsize("<" + fmt)))
        if fmt in "fd":
            self.out += struct.pack("<" + fmt, value)
        else:
            self.out += (int(value) % 2**(8 * struct.calcsize(fmt))).to_bytes(
                struct.calcsize(fmt), "little")

    def string(self, s, label="str_len"):
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s)
        self.num("Q", len(raw), label)
        self.out += raw

    def value(self, kind: int, value):
        if kind == STRING:
            self.string(value)
        elif kind == ARRAY:
            sub, items = value
            self.num("I", sub, "arr_type")
            self.num("Q", len(items), "arr_len")
            for item in items:
                self.value(sub, item)
        else:
            self.num(SCALAR_FORMATS[kind], value)


def gguf_bytes(layout: dict) -> tuple[bytes, dict]:
    w = _GGUFWriter()
    w.out += b"GGUF"
    w.num("I", layout["version"], "version")
    w.num("Q", len(layout["tensors"]), "tensor_count")
    w.num("Q", len(layout["kvs"]), "kv_count")
    for key, kind, value in layout["kvs"]:
        w.string(key, "key_len")
        w.num("I", kind, "kv_type")
        w.value(kind, value)
    for name, dims, ggml_type, offset in layout["tensors"]:
        w.string(name, "tname_len")
        w.num("I", len(dims), "n_dims")
        for d in dims:
            w.num("Q", d, "dim")
        w.num("I", ggml_type, "ttype")
        w.num("Q", offset, "toffset")
    w.out += bytes(-len(w.out) % layout["alignment"])
    return bytes(w.out) + layout["data"], w.fields


def _kv_index(layout, key):
    return next((i for i, kv in enumerate(layout["kvs"]) if kv[0] == key), None)


def _gg_kv_set(layout, key, kind, value):
    i = _kv_index(layout, key)
    if i is None:
        layout["kvs"].append([key, kind, value])
    else:
        layout["kvs"][i] = [key, kind, value]
    return layout


def _gg_kv_del(layout, key):
    layout["kvs"] = [kv for kv in layout["kvs"] if kv[0] != key]
    return layout


def _gg_kv_dup(layout, index):
    if layout["kvs"]:
        layout["kvs"].append(copy.deepcopy(layout["kvs"][index % len(layout["kvs"])]))
    return layout


def _gg_array_item(layout, key, index, kind, value):
    """One element of an array value replaced (a token that is not a string, ...)."""
    i = _kv_index(layout, key)
    if i is not None and layout["kvs"][i][1] == ARRAY and layout["kvs"][i][2][1]:
        items = layout["kvs"][i][2][1]
        if kind == layout["kvs"][i][2][0]:
            items[index % len(items)] = value
    return layout


def _gg_array_resize(layout, key, n):
    i = _kv_index(layout, key)
    if i is not None and layout["kvs"][i][1] == ARRAY and layout["kvs"][i][2][1]:
        items = layout["kvs"][i][2][1]
        layout["kvs"][i][2][1] = (items * (n // len(items) + 1))[:n]
    return layout


def _gg_tensor(layout, index, field, value):
    if layout["tensors"]:
        t = layout["tensors"][index % len(layout["tensors"])]
        t[{"name": 0, "dims": 1, "type": 2, "offset": 3}[field]] = value
    return layout


def _gg_tensor_del(layout, index):
    if layout["tensors"]:
        del layout["tensors"][index % len(layout["tensors"])]
    return layout


def _gg_tensor_dup(layout, index, name):
    if layout["tensors"]:
        t = copy.deepcopy(layout["tensors"][index % len(layout["tensors"])])
        layout["tensors"].append([name, *t[1:]])
    return layout


def _gg_version(layout, version):
    layout["version"] = version
    return layout


GG_STRUCTURE = {"kv_set": _gg_kv_set, "kv_del": _gg_kv_del, "kv_dup": _gg_kv_dup,
                "array_item": _gg_array_item, "array_resize": _gg_array_resize,
                "tensor": _gg_tensor, "tensor_del": _gg_tensor_del, "tensor_dup": _gg_tensor_dup,
                "version": _gg_version}

GGUF_KEYS = ["general.architecture", "general.alignment", "llama.context_length",
             "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
             "llama.attention.head_count", "llama.attention.head_count_kv",
             "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.dimension_count", "llama.attention.key_length", "llama.vocab_size",
             "llama.rope.scaling.type", "llama.rope.scaling.factor", "tokenizer.ggml.model",
             "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
             "tokenizer.chat_template"]
_INT_RANGES = {UINT8: (0, 255), INT8: (-128, 127), UINT16: (0, 65535), INT16: (-32768, 32767),
               UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1), UINT64: (0, 2**64 - 1),
               INT64: (-2**63, 2**63 - 1), BOOL: (0, 255)}


def _gguf_scalar(kind: int):
    if kind in (FLOAT32, FLOAT64):
        return st.floats(width=32 if kind == FLOAT32 else 64)
    if kind == STRING:
        return st.one_of(texts, st.sampled_from(["llama", "gpt2", "linear", "smollm", "none"]))
    lo, hi = _INT_RANGES[kind]
    return st.one_of(st.sampled_from([lo, hi, 0, 1, 2]), st.integers(lo, hi), st.integers(0, 400))


scalar_kinds = st.sampled_from(sorted(SCALAR_FORMATS) + [STRING])
gguf_typed_values = st.one_of(
    scalar_kinds.flatmap(lambda k: st.tuples(st.just(k), _gguf_scalar(k))),
    scalar_kinds.flatmap(lambda k: st.tuples(
        st.just(ARRAY), st.tuples(st.just(k), st.lists(_gguf_scalar(k), max_size=6)))),
).map(lambda t: [t[0], list(t[1]) if t[0] == ARRAY else t[1]])
gguf_tensor_fields = st.one_of(
    st.tuples(st.just("name"), st.one_of(texts, st.sampled_from(
        ["rope_freqs.weight", "blk.0.attn_q.weight", "blk.7.attn_q.weight", "output.weight",
         "blk.0.ffn_gate.bias"]))),
    st.tuples(st.just("dims"), st.lists(st.one_of(st.integers(0, 70), u64), max_size=5)),
    st.tuples(st.just("type"), st.one_of(st.integers(0, 40), st.sampled_from([2**32 - 1]))),
    st.tuples(st.just("offset"), st.one_of(st.integers(0, 120_000), u64)),
)
gguf_structure_ops = st.one_of(
    st.tuples(st.just("kv_set"), st.sampled_from(GGUF_KEYS), gguf_typed_values)
    .map(lambda t: [t[0], t[1], *t[2]]),
    st.tuples(st.just("kv_del"), st.sampled_from(GGUF_KEYS)),
    st.tuples(st.just("kv_dup"), indices),
    st.tuples(st.just("array_item"), st.sampled_from(["tokenizer.ggml.tokens",
                                                      "tokenizer.ggml.merges"]),
              indices, st.just(STRING), texts),
    st.tuples(st.just("array_item"), st.just("tokenizer.ggml.token_type"), indices,
              st.just(INT32), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just("array_resize"), st.sampled_from(["tokenizer.ggml.tokens",
                                                        "tokenizer.ggml.token_type",
                                                        "tokenizer.ggml.scores",
                                                        "tokenizer.ggml.merges"]),
              st.integers(0, 400)),
    st.tuples(st.just("tensor"), indices, gguf_tensor_fields).map(lambda t: [t[0], t[1], *t[2]]),
    st.tuples(st.just("tensor_del"), indices),
    st.tuples(st.just("tensor_dup"), indices, gguf_tensor_fields.map(lambda f: str(f[1]))),
    st.tuples(st.just("version"), st.sampled_from([0, 1, 2, 4, 2**32 - 1, 3 << 16])),
).map(list)
GGUF_FIELD_KINDS = ["version", "tensor_count", "kv_count", "key_len", "kv_type", "str_len",
                    "arr_type", "arr_len", "tname_len", "n_dims", "dim", "ttype", "toffset"]
gguf_layout_ops = st.tuples(st.just("field"), st.sampled_from(GGUF_FIELD_KINDS), indices,
                            st.one_of(u64, st.integers(0, 13))).map(list)


# --- checkpoints: the meta record and the arrays of an .npz -------------------------------------

CHECKPOINT_ARRAYS = ["meta", "k", "v", "k_raw", "pos", "last_hidden"]
META_KEYS = ["format", "model", "preset", "n_global", "n_local", "ceiling", "position", "tokens",
             "note"]


def npz_parts(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}


def npz_bytes(arrays: dict) -> bytes:
    """An .npz as np.savez writes it (stored, not compressed); a member given as bytes is
    written as is (a damaged .npy)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            member = io.BytesIO()
            if isinstance(a, bytes):
                member.write(a)
            else:
                np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=True)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def _meta(arrays) -> dict | None:
    try:
        meta = json.loads(arrays["meta"].tobytes())
    except (KeyError, AttributeError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _put_meta(arrays, meta):
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return arrays


def _ck_meta_set(arrays, key, value):
    meta = _meta(arrays)
    if meta is not None:
        meta[key] = value
        _put_meta(arrays, meta)
    return arrays


def _ck_meta_del(arrays, key):
    meta = _meta(arrays)
    if meta is not None:
        meta.pop(key, None)
        _put_meta(arrays, meta)
    return arrays


def _ck_meta_whole(arrays, value):
    return _put_meta(arrays, value)


def _ck_meta_bytes(arrays, hexed):
    arrays["meta"] = np.frombuffer(bytes.fromhex(hexed), np.uint8)
    return arrays


def _ck_meta_nested(arrays, depth):
    return _ck_meta_bytes(arrays, (b"[" * depth).hex())


def _ck_array(arrays, name, dtype, shape, fill):
    with np.errstate(all="ignore"):
        try:
            arrays[name] = np.full(shape, fill, dtype=dtype)
        except (OverflowError, ValueError, TypeError):
            arrays[name] = np.full(shape, 0, dtype=dtype)
    return arrays


def _ck_array_slice(arrays, name, axis, n):
    a = arrays.get(name)
    if isinstance(a, np.ndarray) and a.ndim:
        axis %= a.ndim
        arrays[name] = a[(slice(None),) * axis + (slice(0, n),)]
    return arrays


def _ck_array_value(arrays, name, index, value):
    a = arrays.get(name)
    if isinstance(a, np.ndarray) and a.size:
        a = a.copy()
        with np.errstate(all="ignore"), contextlib.suppress(OverflowError, ValueError, TypeError):
            a.flat[index % a.size] = value
        arrays[name] = a
    return arrays


def _ck_array_del(arrays, name):
    arrays.pop(name, None)
    return arrays


def _ck_array_object(arrays, name):
    arrays[name] = np.array([{"a": 1}, None], dtype=object)  # pickled: must be refused
    return arrays


def _ck_npy(arrays, name, header_text):
    """A member whose .npy header says anything (a huge shape, another dtype, not a dict),
    followed by the data the member had."""
    a = arrays.get(name)
    data = a.tobytes() if isinstance(a, np.ndarray) and a.dtype != object else b""
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    arrays[name] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data
    return arrays


CK_STRUCTURE = {"meta_set": _ck_meta_set, "meta_del": _ck_meta_del,
                "meta_whole": _ck_meta_whole, "meta_bytes": _ck_meta_bytes,
                "meta_nested": _ck_meta_nested, "array": _ck_array,
                "array_slice": _ck_array_slice, "array_value": _ck_array_value,
                "array_del": _ck_array_del, "array_object": _ck_array_object, "npy": _ck_npy}

meta_values = st.one_of(json_values, st.sampled_from(["lminfinite", "window", "full"]),
                        st.integers(-3, 70))
npy_headers = st.one_of(
    st.builds(lambda d, f, s: f"{{'descr': {d!r}, 'fortran_order': {f}, 'shape': {s}, }}",
              st.sampled_from(["<f4", "<f8", "<i8", "|u1", "|O", "<U8", "|V4", "S3", "<c8",
                               "garbage", "[('a', '<f4')]", ">f4"]),
              st.sampled_from(["False", "True", "1", "None"]),
              st.one_of(st.lists(st.one_of(st.integers(0, 40), st.sampled_from(EDGE_INTS)),
                                 max_size=5).map(lambda s: repr(tuple(s))),
                        st.sampled_from(["None", "'x'", "(-1,)", "(1.5,)", "((1,),)"]))),
    texts.map(lambda t: "{" + t), texts)
checkpoint_structure_ops = st.one_of(
    st.tuples(st.just("meta_set"), st.sampled_from(META_KEYS), meta_values),
    st.tuples(st.just("meta_del"), st.sampled_from(META_KEYS)),
    st.tuples(st.just("meta_whole"), json_values),
    st.tuples(st.just("meta_bytes"), st.binary(max_size=32).map(_hex)),
    st.tuples(st.just("meta_nested"), nesting),
    st.tuples(st.just("array"), st.sampled_from(CHECKPOINT_ARRAYS),
              st.sampled_from(["<f4", "<f8", "<i8", "<i4", "|u1", "|b1", "<f2", "<c8", "<U3"]),
              st.lists(st.integers(0, 12), max_size=4),
              st.sampled_from([0, 1, -1, 2**40, float("nan")])),
    st.tuples(st.just("array_slice"), st.sampled_from(CHECKPOINT_ARRAYS), st.integers(0, 3),
              st.integers(0, 12)),
    st.tuples(st.just("array_value"), st.sampled_from(CHECKPOINT_ARRAYS), indices,
              st.sampled_from([0, -1, 1, 7, 8, 13, 100, 2**62, 2**63 - 1, float("nan")])),
    st.tuples(st.just("array_del"), st.sampled_from(CHECKPOINT_ARRAYS)),
    st.tuples(st.just("array_object"), st.sampled_from(CHECKPOINT_ARRAYS)),
    st.tuples(st.just("npy"), st.sampled_from(CHECKPOINT_ARRAYS), npy_headers),
).map(list)

# zip header fields: (offset from the record's signature, size)
ZIP_LOCAL = {"flags": (6, 2), "method": (8, 2), "crc": (14, 4), "csize": (18, 4),
             "usize": (22, 4), "name_len": (26, 2), "extra_len": (28, 2)}
ZIP_CENTRAL = {"flags": (8, 2), "method": (10, 2), "crc": (16, 4), "csize": (20, 4),
               "usize": (24, 4), "name_len": (28, 2), "extra_len": (30, 2),
               "local_offset": (42, 4)}
ZIP_END = {"disk_entries": (8, 2), "entries": (10, 2), "dir_size": (12, 4), "dir_offset": (16, 4)}


def _zip_records(data: bytes) -> dict[str, list[int]] | None:
    """Where the local headers, central directory entries and end record start."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            local = [i.header_offset for i in z.infolist()]
            start = z.start_dir
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    central, at = [], start
    while data[at:at + 4] == b"PK\x01\x02":
        central.append(at)
        n, e, c = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + n + e + c
    end = data.rfind(b"PK\x05\x06")
    return {"local": local, "central": central, "end": [end] if end >= 0 else []}


def _zip_field(data, where, index, field, value):
    records = _zip_records(data)
    table = {"local": ZIP_LOCAL, "central": ZIP_CENTRAL, "end": ZIP_END}[where]
    if not records or not records[where] or field not in table:
        return data
    start = records[where][index % len(records[where])]
    rel, size = table[field]
    return data[:start + rel] + (value % 2**(8 * size)).to_bytes(size, "little") + \
        data[start + rel + size:]


checkpoint_layout_ops = st.one_of(
    st.tuples(st.just("zip_field"), st.just("local"), indices, st.sampled_from(sorted(ZIP_LOCAL)),
              st.one_of(u64, st.integers(0, 99))),
    st.tuples(st.just("zip_field"), st.just("central"), indices,
              st.sampled_from(sorted(ZIP_CENTRAL)), st.one_of(u64, st.integers(0, 99))),
    st.tuples(st.just("zip_field"), st.just("end"), indices, st.sampled_from(sorted(ZIP_END)),
              st.one_of(u64, st.integers(0, 9))),
).map(list)


# --- readers: their seeds and ops, and apply -----------------------------------------------------

READERS = ("safetensors", "gguf", "metadata", "checkpoint")
SEEDS_OF = {"safetensors": SAFETENSORS_SEEDS, "metadata": SAFETENSORS_SEEDS,
            "gguf": GGUF_SEEDS, "checkpoint": CHECKPOINT_SEEDS}
STRUCTURE_OPS = {"safetensors": safetensors_structure_ops, "metadata": metadata_structure_ops,
                 "gguf": gguf_structure_ops, "checkpoint": checkpoint_structure_ops}
LAYOUT_OPS = {"safetensors": safetensors_layout_ops, "metadata": safetensors_layout_ops,
              "gguf": gguf_layout_ops, "checkpoint": checkpoint_layout_ops}


def descriptions(reader: str, seeds=None) -> st.SearchStrategy:
    """Damaged files for `reader`: structure edits, layout edits and byte edits, any mix (an
    empty list of ops: the seed itself, which must load)."""
    names = seeds or SEEDS_OF[reader]
    ops = st.one_of(STRUCTURE_OPS[reader], LAYOUT_OPS[reader], byte_ops)
    return st.fixed_dictionaries({"seed": st.sampled_from(names),
                                  "ops": st.lists(ops, max_size=4)})


def apply(seeds: Seeds, description: dict) -> bytes:
    """The bytes a description stands for."""
    name, ops = description["seed"], description["ops"]
    kind = _format_of(name)
    structure = {"safetensors": {**ST_STRUCTURE, **MD_STRUCTURE}, "gguf": GG_STRUCTURE,
                 "checkpoint": CK_STRUCTURE}[kind]
    layout = {"safetensors": ST_LAYOUT, "gguf": {}, "checkpoint": {"zip_field": _zip_field}}[kind]
    edits = [op for op in ops if op[0] in structure]
    data, fields = _structured(seeds, name, kind, edits, structure)
    for op in ops:
        if op[0] == "field" and kind == "gguf":
            data = _gguf_field(data, fields, *op[1:])
        elif op[0] in layout:
            data = layout[op[0]](data, *op[1:])
    for op in ops:
        if op[0] in BYTE_OPS:
            data = BYTE_OPS[op[0]](data, *op[1:])
    return data


def _format_of(seed: str) -> str:
    return {"gguf": "gguf", "ckpt": "checkpoint"}.get(seed.split("_")[0], "safetensors")


def _structured(seeds, name, kind, edits, structure) -> tuple[bytes, dict]:
    if kind == "gguf":
        layout = copy.deepcopy(_gguf_seed_layout(seeds.path(name)))
        for op in edits:
            layout = structure[op[0]](layout, *op[1:])
        return _gguf_bytes_or_seed(seeds, name, layout, edits)
    data = seeds.bytes(name)
    if not edits:
        return data, {}
    if kind == "checkpoint":
        arrays = npz_parts(data)
        for op in edits:
            arrays = structure[op[0]](arrays, *op[1:])
        return npz_bytes(arrays), {}
    header, blob = st_split(data)
    for op in edits:
        if not isinstance(header, dict) and op[0] != "header":
            continue  # the header is no longer an object: edits inside it do not apply
        header, blob = structure[op[0]](header, blob, *op[1:])
    return st_join(header, blob), {}


@functools.cache
def _gguf_seed_layout(path) -> dict:
    return gguf_layout(path)


def _gguf_bytes_or_seed(seeds, name, layout, edits) -> tuple[bytes, dict]:
    try:
        return gguf_bytes(layout)
    except (struct.error, OverflowError, TypeError, ValueError, AttributeError):
        # an edit the writer cannot express (e.g. a float too large for float32): the seed
        return gguf_bytes(_gguf_seed_layout(seeds.path(name)))


def _gguf_field(data, fields, kind, index, value):
    spots = fields.get(kind)
    if not spots:
        return data
    offset, size = spots[index % len(spots)]
    return data[:offset] + (value % 2**(8 * size)).to_bytes(size, "little") + \
        data[offset + size:]
