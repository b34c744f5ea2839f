"""GGUF files (llama.cpp): the only place that knows their tensor names, layouts and metadata keys.

A Llama GGUF (its container parsed by gguf_file) is read lazily under Hugging Face names and
layouts, dequantized to float32 a block of rows at a time; every metadata value is checked for
its type before use; its tokenizer is rebuilt as a tokenizer.json here rather than with
transformers' GGUF conversion, which drops pre-tokenizer steps such as SmolLM2's digit split.
"""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

from ..errors import ModelFileError, one_line
from .gguf_file import GGUFFile
from .hf_folder import normalize_tokenizer_config

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
    stored_dtype = "GGUF (dequantized to F32)"

    def __init__(self, path):
        self.path = str(path)
        self.name = os.path.basename(self.path)
        self._reader = GGUFFile(self.path)
        arch = self._field("general.architecture", "str")
        if arch != "llama":
            raise ModelFileError(f"{self.name}: unsupported architecture {arch!r}; "
                                 f"minillm runs Llama models only")
        self._tensors = self._map_tensors()
        self._check_quant_types()
        self.config = self._build_config()
        _ = self._tokenizer  # a bad tokenizer too is refused on open, not mid-conversion

    def _field(self, key: str, kind: str, default=None):
        try:
            return _field(self._reader, key, kind, default)
        except ModelFileError as e:
            raise ModelFileError(f"{self.name}: {e}") from None

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
            raise ModelFileError(f"{self.name}: cannot dequantize tensor {t.name!r} of type "
                                 f"{t.tensor_type.name} ({one_line(e)})") from None

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
        v = self._field("llama." + key, "int")
        if v is None and required:
            raise ModelFileError(f"{self.name}: the GGUF metadata lacks llama.{key}")
        return v

    def _build_config(self) -> dict:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
        optional = ("num_key_value_heads", "max_position_embeddings")
        for hf, key in _GGUF_INT_KEYS.items():
            v = self._int(key, required=hf not in optional)
            if v is not None:
                cfg[hf] = v
        for hf, key in _GGUF_FLOAT_KEYS.items():
            v = self._field("llama." + key, "number")
            if v is not None:
                cfg[hf] = _f32(v)
        head_dim = self._head_dim()
        if head_dim is not None:
            cfg["head_dim"] = head_dim
        cfg["vocab_size"] = self._vocab_size()
        cfg["rope_scaling"] = self._rope_scaling()
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for key in ("bos_token_id", "eos_token_id"):
            v = self._field("tokenizer.ggml." + key, "int")
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
        tokens = self._field("tokenizer.ggml.tokens", "strings")
        if tokens is not None:
            return len(tokens)
        if "model.embed_tokens.weight" in self._tensors:
            return self.shape("model.embed_tokens.weight")[0]
        raise ModelFileError(f"{self.name}: no vocabulary size, token list or token_embd.weight")

    def _rope_scaling(self) -> dict | None:
        kind = self._field("llama.rope.scaling.type", "str")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise ModelFileError(f"{self.name}: unsupported rope scaling type {kind!r} "
                                 f"(supported in GGUF: linear)")
        factor = self._field("llama.rope.scaling.factor", "number", 1.0)
        return {"rope_type": "linear", "factor": _f32(factor)}

    # -- tokenizer (built once, on open: a bad one is refused before anything is written)

    @functools.cached_property
    def _tokenizer(self) -> tuple[str, dict]:
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


# -- the tokenizer, rebuilt as a tokenizer.json (for the `tokenizers` library)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX_BYTELEVEL = {
    "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True
}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_REGEX_BYTELEVEL],
}
_LLAMA3 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated",
         "invert": False},
        {**_GPT2_REGEX_BYTELEVEL, "use_regex": False},
    ],
}
# tokenizer.ggml.pre -> pre-tokenizer; names as llama.cpp writes them (smollm, starcoder and refact
# all split every digit apart before the GPT-2 regex).
_PRE_TOKENIZERS = {
    "default": _GPT2_REGEX_BYTELEVEL,
    "gpt2": _GPT2_REGEX_BYTELEVEL,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
}
_IGNORES_MERGES = {"llama-bpe", "llama3"}  # Llama 3 looks whole words up in the vocab first


def tokenizer_from_gguf(reader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) of the tokenizer in a GGUF file's metadata
    (a gguf_file.GGUFFile, or the `gguf` package's GGUFReader)."""
    kind = _field(reader, "tokenizer.ggml.model", "str")
    tokens = _field(reader, "tokenizer.ggml.tokens", "strings")
    if kind is None or not tokens:
        raise ModelFileError("the GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type", "ints") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFileError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(reader, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(reader, tokens, types)
    else:
        raise ModelFileError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    return json.dumps(tokenizer, ensure_ascii=False), _tokenizer_config(reader, tokens, kind)


# what a metadata value must be, for _field: (in words, the test)
_KINDS = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("a boolean", lambda v: isinstance(v, bool)),
    "strings": ("an array of strings",
                lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "ints": ("an array of integers", lambda v: isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v)),
    "numbers": ("an array of numbers", lambda v: isinstance(v, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)),
}


def _field(reader, name: str, kind: str, default=None):
    """The value of metadata key `name`, refused unless it is of `kind` (see _KINDS)."""
    field = reader.fields.get(name)
    if field is None:
        return default
    value = field.contents()
    what, is_kind = _KINDS[kind]
    if not is_kind(value):
        raise ModelFileError(f"the GGUF metadata {name} is not {what}")
    return value


def _tokenizer_config(reader, tokens: list[str], kind: str) -> dict:
    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", "int")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    # llama.cpp's default: SentencePiece models start with BOS, byte-level BPE ones do not.
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", "bool", kind == "llama")
    config = {"add_bos_token": bool(add_bos)}
    for key in ("bos", "eos"):
        if token(key) is not None:
            config[f"{key}_token"] = token(key)
    template = _field(reader, "tokenizer.chat_template", "str")
    if template is not None:
        config["chat_template"] = template
    return config


def _added_tokens(tokens: list[str], types: list[int], special_types: set[int]) -> list[dict]:
    """Tokens matched in raw text before the model runs; special ones only when parsing specials."""
    return [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t in special_types,
        }
        for i, (tok, t) in enumerate(zip(tokens, types))
        if t in special_types or t == _USER_DEFINED
    ]


def _bpe_model(tokens: list[str], merges: list, **options) -> dict:
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {tok: i for i, tok in enumerate(tokens)},
        "merges": merges,
    }
    model.update(options)
    return model


def _tokenizer_json(added, normalizer, pre_tokenizer, decoder, model) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,  # BOS is the Tokenizer class's business (add_bos)
        "decoder": decoder,
        "model": model,
    }


def _byte_level_bpe(reader, tokens: list[str], types: list[int]) -> dict:
    pre = _field(reader, "tokenizer.ggml.pre", "str", "default")
    if pre not in _PRE_TOKENIZERS:
        supported = ", ".join(sorted(_PRE_TOKENIZERS))
        raise ModelFileError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {supported})")
    merges = _field(reader, "tokenizer.ggml.merges", "strings")
    if not merges:
        raise ModelFileError("GGUF tokenizer: a gpt2 (byte-level BPE) model without "
                             "tokenizer.ggml.merges")
    model = _bpe_model(tokens, merges, ignore_merges=pre in _IGNORES_MERGES)
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
               "use_regex": True}
    added = _added_tokens(tokens, types, {_CONTROL})
    return _tokenizer_json(added, None, _PRE_TOKENIZERS[pre], decoder, model)


def _sentencepiece_bpe(reader, tokens: list[str], types: list[int]) -> dict:
    """The equivalent of Hugging Face's LlamaTokenizerFast (legacy) for a SentencePiece BPE
    vocabulary."""
    scores = _field(reader, "tokenizer.ggml.scores", "numbers")
    if scores is None or len(scores) != len(tokens):
        raise ModelFileError("GGUF tokenizer: a llama (SentencePiece) model needs one score "
                             "per token")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id", "int")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    if unk is None and "<unk>" in tokens:
        unk = "<unk>"
    merges = _merges_from_scores(tokens, types, scores)
    model = _bpe_model(tokens, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    normalizer = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    if _field(reader, "tokenizer.ggml.add_space_prefix", "bool", True):
        normalizer.insert(0, {"type": "Prepend", "prepend": "▁"})
    decoder = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    added = _added_tokens(tokens, types, {_CONTROL, _UNKNOWN})
    normalizers = {"type": "Sequence", "normalizers": normalizer}
    return _tokenizer_json(added, normalizers, None, decoder, model)


def _merges_from_scores(tokens: list[str], types: list[int],
                        scores: list[float]) -> list[list[str]]:
    """BPE merges implied by SentencePiece scores (as transformers' SentencePieceExtractor
    derives them).

    SentencePiece merges the adjacent pair whose joined piece scores highest, so every split of a
    normal piece into two known pieces is a merge, ranked by the joined piece's score, descending.
    """
    ids = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL:
            continue  # control, byte and unused pieces are never the result of a merge
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in ids and right in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        merges += [(scores[i], [left, right]) for left, right in splits]
    merges.sort(key=lambda m: m[0], reverse=True)  # stable: ties keep vocabulary order
    return [pair for _, pair in merges]
