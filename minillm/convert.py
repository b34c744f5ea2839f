"""Tensor sources (GGUF file, Hugging Face folder) and conversion to one self-contained file.

A source presents a model the way the runtime wants it: a Hugging Face `config.json` dict,
the tokenizer, the chat template, and float32 tensors under Hugging Face Llama names and
layouts, read lazily one at a time (`keys()`, `shape(name)`, `tensor(name)`).

`convert` writes such a source into a single `.safetensors` whose `__metadata__` carries the
config, tokenizer and chat template (DESIGN.md §3), so the file needs nothing beside it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import sys
import time

import numpy as np

from .config import Config
from .errors import ModelFileError
from .tensorfile import DTYPE_NAMES, SafetensorsFile, write_safetensors

FORMAT_VERSION = "1"

# GGUF tensor name -> Hugging Face name (blk.N.* are per layer)
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_DEQUANT_ROWS = 1024
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Hugging Face config key <- GGUF key (after the "llama." prefix), integers
_GGUF_INT_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "max_position_embeddings": "context_length",
}
_GGUF_FLOAT_KEYS = {
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _f32(v: float) -> float:
    """GGUF stores float32: take its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's convert_hf_to_gguf applies to Q and K.

    GGUF rotates adjacent pairs (x0, x1), (x2, x3), ... inside each head; Hugging Face rotates
    the two halves (x_i, x_{i + d/2}). The converter interleaves the halves per head with
    `w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)`; this is its inverse.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A Llama GGUF file (llama.cpp), dequantized lazily to float32 under Hugging Face names."""

    sentencepiece_model = None  # a GGUF tokenizer is always rebuilt as a tokenizer.json

    def __init__(self, path):
        import gguf

        self.path = str(path)
        self.name = os.path.basename(self.path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except OSError as e:
            reason = e.strerror or _one_line(e)
            raise ModelFileError(f"{self.name}: cannot read ({reason})") from None
        except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
            raise ModelFileError(
                f"{self.name}: not a GGUF file, or truncated or corrupt ({_one_line(e)})") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ModelFileError(f"{self.name}: unsupported architecture {arch!r}; "
                                 f"minillm runs Llama models only")
        self._tensors = self._map_tensors()
        self._check_quant_types()
        self.config = self._build_config()

    def _field(self, key: str, default=None):
        f = self._reader.get_field(key)
        return default if f is None else f.contents()

    def _map_tensors(self) -> dict:
        if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
            raise ModelFileError(f"{self.name}: llama3-style rope_freqs are not supported in GGUF "
                                 f"files; convert the Hugging Face folder instead")
        tensors = {}
        for t in self._reader.tensors:
            hf = _gguf_to_hf_name(t.name)
            if hf is None:
                raise ModelFileError(f"{self.name}: unsupported tensor {t.name!r} "
                                     f"(not a plain Llama model?)")
            tensors[hf] = t
        return tensors

    def _check_quant_types(self) -> None:
        """Dequantize one row of each storage type: refuse now, not halfway through a conversion."""
        first = {}
        for t in self._reader.tensors:
            first.setdefault(t.tensor_type, t)
        for t in first.values():
            self._dequantize(t, t.data[:1] if t.data.ndim > 1 else t.data)

    def _dequantize(self, t, data) -> np.ndarray:
        import gguf

        try:
            return gguf.quants.dequantize(data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ModelFileError(f"{self.name}: cannot dequantize tensor {t.name} of type "
                                 f"{t.tensor_type.name} ({_one_line(e)})") from None

    def _dequantize_rows(self, t) -> np.ndarray:
        """float32 data as is (a view); anything else a block of rows at a time, since the gguf
        package's temporaries are several times the size of what they dequantize."""
        if t.data.dtype == np.float32 or t.data.ndim < 2:
            return np.asarray(self._dequantize(t, t.data), dtype=np.float32)
        rows = t.data.reshape(-1, t.data.shape[-1])
        out = np.empty((rows.shape[0], int(t.shape[0])), np.float32)
        for i in range(0, len(rows), _DEQUANT_ROWS):
            out[i:i + _DEQUANT_ROWS] = self._dequantize(t, rows[i:i + _DEQUANT_ROWS])
        return out

    def _int(self, key: str, required: bool = True) -> int | None:
        v = self._field("llama." + key)
        if v is None and not required:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            what = "lacks" if v is None else "has a non-integer"
            raise ModelFileError(f"{self.name}: the GGUF metadata {what} llama.{key}")
        return v

    def _build_config(self) -> dict:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
        optional = ("num_key_value_heads", "max_position_embeddings")
        for hf, key in _GGUF_INT_KEYS.items():
            v = self._int(key, required=hf not in optional)
            if v is not None:
                cfg[hf] = v
        for hf, key in _GGUF_FLOAT_KEYS.items():
            v = self._field("llama." + key)
            if v is not None:
                cfg[hf] = _f32(v)
        head_dim = self._head_dim()
        if head_dim is not None:
            cfg["head_dim"] = head_dim
        cfg["vocab_size"] = self._vocab_size()
        cfg["rope_scaling"] = self._rope_scaling()
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for key in ("bos_token_id", "eos_token_id"):
            v = self._field("tokenizer.ggml." + key)
            if v is not None:
                cfg[key] = v
        return cfg

    def _head_dim(self) -> int | None:
        key_len = self._int("attention.key_length", required=False)
        rope_dim = self._int("rope.dimension_count", required=False)
        if key_len and rope_dim and key_len != rope_dim:
            # RoPE on part of each head only: not a Llama layout
            raise ModelFileError(f"{self.name}: rope dimension {rope_dim} differs from head size "
                                 f"{key_len} (partial rotary embeddings are not supported)")
        return key_len or rope_dim

    def _vocab_size(self) -> int:
        v = self._int("vocab_size", required=False)
        if v is not None:
            return v
        tokens = self._reader.get_field("tokenizer.ggml.tokens")
        if tokens is not None:
            return len(tokens.data)
        if "model.embed_tokens.weight" in self._tensors:
            return self.shape("model.embed_tokens.weight")[0]
        raise ModelFileError(f"{self.name}: no vocabulary size, token list or token_embd.weight")

    def _rope_scaling(self) -> dict | None:
        kind = self._field("llama.rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise ModelFileError(f"{self.name}: unsupported rope scaling type {kind!r} "
                                 f"(supported in GGUF: linear)")
        factor = self._field("llama.rope.scaling.factor", 1.0)
        return {"rope_type": "linear", "factor": _f32(factor)}

    # -- tokenizer (built on first use: it is not needed to read the config or tensors)

    @functools.cached_property
    def _tokenizer(self) -> tuple[str, dict]:
        from .gguf_tokenizer import tokenizer_from_gguf

        try:
            return tokenizer_from_gguf(self._reader)
        except ModelFileError as e:
            raise ModelFileError(f"{self.name}: {e}") from None

    @property
    def tokenizer_json(self) -> str:
        return self._tokenizer[0]

    @property
    def tokenizer_config(self) -> dict:
        return normalize_tokenizer_config(self._tokenizer[1], add_bos_default=False)

    @property
    def chat_template(self) -> str | None:
        return self._tokenizer[1].get("chat_template")

    # -- tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first (ggml's ne order)
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def tensor(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        w = self._dequantize_rows(t).reshape(self.shape(name))
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, self.config.get("num_key_value_heads",
                                                self.config["num_attention_heads"]))
        return w


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None


class HFFolderSource:
    """A Hugging Face model folder (or its model.safetensors): config, tokenizer, lazy tensors."""

    def __init__(self, path):
        path = str(path)
        if os.path.isdir(path):
            self.folder, weights = path, None
        else:
            self.folder, weights = os.path.dirname(path) or ".", path
        self.name = self.folder
        self._files = self._open_weights(weights)
        self.config = self._read_json("config.json")
        self._where = {k: f for f in self._files for k in f.entries}
        self._read_tokenizer()

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _read(self, name: str, binary: bool = False):
        """A file's bytes (or UTF-8 text), or None when it does not exist."""
        try:
            with open(self._file(name), "rb") as f:
                data = f.read()
            return data if binary else data.decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{self.name}: cannot read {name} ({_one_line(e)})") from None

    def _read_json(self, name: str, required: bool = True):
        text = self._read(name)
        if text is None:
            if not required:
                return None
            raise ModelFileError(f"{self.name}: no {name} in the folder")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{self.name}: {name} is not valid JSON ({e.msg})") from None

    def _open_weights(self, weights: str | None) -> list[SafetensorsFile]:
        if weights is not None:
            return [SafetensorsFile(weights)]
        if os.path.exists(self._file("model.safetensors")):
            return [SafetensorsFile(self._file("model.safetensors"))]
        index = self._read_json("model.safetensors.index.json", required=False)
        if index is None:
            raise ModelFileError(f"{self.name}: no model.safetensors or "
                                 f"model.safetensors.index.json in the folder")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{self.name}: model.safetensors.index.json has no weight_map")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(self._file(shard)):
                raise ModelFileError(f"{self.name}: the shard index names {shard}, "
                                     f"which does not exist")
            shards[shard] = SafetensorsFile(self._file(shard))
        for tensor, shard in weight_map.items():
            if tensor not in shards[shard].entries:
                raise ModelFileError(f"{self.name}: the shard index puts {tensor} in {shard}, "
                                     f"which does not hold it")
        return list(shards.values())

    def _read_tokenizer(self) -> None:
        self.tokenizer_json = self._read("tokenizer.json")
        self.sentencepiece_model = None
        if self.tokenizer_json is not None:
            add_bos_default = _post_processor_adds_bos(self.tokenizer_json)
        elif (spm := self._read("tokenizer.model", binary=True)) is not None:
            self.sentencepiece_model = spm
            add_bos_default = True  # LlamaTokenizer's default
        else:
            raise ModelFileError(f"{self.name}: no tokenizer.json or tokenizer.model in the folder")
        raw = self._read_json("tokenizer_config.json", required=False) or {}
        self.tokenizer_config = normalize_tokenizer_config(raw, add_bos_default)
        self.chat_template = self._chat_template(raw)

    def _chat_template(self, tokenizer_config: dict) -> str | None:
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template:
            return template
        # recent transformers save the template beside tokenizer_config.json
        jinja = self._read("chat_template.jinja")
        if jinja is not None:
            return jinja
        return (self._read_json("chat_template.json", required=False) or {}).get("chat_template")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def tensor(self, name: str) -> np.ndarray:
        return self._where[name].tensor(name)


def _post_processor_adds_bos(tokenizer_json: str) -> bool:
    """Whether tokenizer.json's post-processor puts a special token first (Llama 3 style)."""
    try:
        pp = json.loads(tokenizer_json).get("post_processor") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    processors = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            return "SpecialToken" in p["single"][0]
    return False


def normalize_tokenizer_config(raw: dict, add_bos_default: bool) -> dict:
    """Keep what the runtime needs: add_bos_token and the BOS/EOS texts as plain strings."""
    out = {"add_bos_token": bool(raw.get("add_bos_token", add_bos_default))}
    for key in ("bos_token", "eos_token"):
        v = raw.get(key)
        if isinstance(v, dict):  # a serialized AddedToken
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def open_source(path):
    """The tensor source for a GGUF file, a Hugging Face folder or its model.safetensors."""
    path = str(path)
    if os.path.isdir(path):
        return HFFolderSource(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"GGUF" or path.lower().endswith(".gguf"):
        return GGUFSource(path)
    return HFFolderSource(path)


def convert(src_path, out_path, dtype: str = "float32") -> str:
    """Write `src_path` (GGUF, HF folder or its model.safetensors) as one self-contained file."""
    from .weights import check_source, expected_shapes

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {dtype!r}")
    src = open_source(src_path)
    cfg = Config.from_dict(src.config, source=str(src_path))
    check_source(src, cfg, str(src_path))  # refuse a bad model before writing anything
    # minillm's tensor order, so that the fused q|k|v and gate|up matrices are views of the file
    names = list(expected_shapes(cfg))
    write_safetensors(str(out_path), [(k, src.shape(k)) for k in names], src.tensor,
                      dtype=dtype, metadata=_metadata(src, cfg))
    return str(out_path)


def _metadata(src, cfg: Config) -> dict[str, str]:
    meta = {
        "minillm.format": FORMAT_VERSION,
        "minillm.config": cfg.to_json(),
        "minillm.tokenizer_config": json.dumps(src.tokenizer_config),
    }
    if src.tokenizer_json is not None:
        meta["minillm.tokenizer_json"] = src.tokenizer_json
    else:
        spm = base64.b64encode(src.sentencepiece_model).decode("ascii")
        meta["minillm.sentencepiece_b64"] = spm
    if src.chat_template:
        meta["minillm.chat_template"] = src.chat_template
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.convert", description=convert.__doc__)
    p.add_argument("src", help="a .gguf file, a Hugging Face folder, or its model.safetensors")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        convert(args.src, args.out, args.dtype)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.out) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, {args.dtype}) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
