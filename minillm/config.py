"""Model configuration: a frozen dataclass built from Hugging Face `config.json` keys."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelFileError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# the config's integer keys (absent or null: not given); each must be a positive int
INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim")
# the numbers each rope scaling type reads (minillm.rope), all finite and > 0
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}


@dataclass(frozen=True)
class Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", factors...} or None
    head_dim_: int | None = None  # explicit `head_dim` from the config, if any
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"

    # dimension names used across the code
    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.hidden_size // self.num_attention_heads

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> Config:
        """Build from a `config.json` dict; refuse what the runtime cannot run exactly."""
        if not isinstance(d, dict):
            raise ModelFileError(f"{source}: the model config is not a JSON object")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        model_type = d.get("model_type", "llama")
        if not isinstance(archs, list) or not isinstance(model_type, str):
            raise ModelFileError(f"{source}: architectures must be a list and model_type a "
                                 f"string in the model config")
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ModelFileError(
                f"{source}: unsupported architecture {archs[0] if archs else model_type!r} "
                f"(model_type {model_type!r}); minillm runs Llama models only")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ModelFileError(f"{source}: the model config lacks {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFileError(f"{source}: unsupported hidden_act {act!r} (Llama uses silu)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ModelFileError(f"{source}: attention/MLP biases are not supported")

        rope_theta, rope_scaling = _read_rope(d, source)
        ints = {key: _positive_int(d, key, source) for key in INT_KEYS}
        vocab = ints["vocab_size"]
        bos, eos = d.get("bos_token_id"), d.get("eos_token_id")
        eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        cfg = cls(
            hidden_size=ints["hidden_size"],
            intermediate_size=ints["intermediate_size"],
            num_hidden_layers=ints["num_hidden_layers"],
            num_attention_heads=ints["num_attention_heads"],
            num_key_value_heads=ints["num_key_value_heads"] or ints["num_attention_heads"],
            vocab_size=vocab,
            max_position_embeddings=ints["max_position_embeddings"] or 2048,
            rms_norm_eps=_positive_number(_given(d, "rms_norm_eps", 1e-6), "rms_norm_eps",
                                          source),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            head_dim_=ints["head_dim"],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else _token_id(bos, "bos_token_id", vocab, source),
            eos_token_id=tuple(_token_id(e, "eos_token_id", vocab, source) for e in eos),
        )
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        dims = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_hidden_layers, vocab_size=self.vocab_size,
                    num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                    max_position_embeddings=self.max_position_embeddings, head_dim=self.head_dim)
        for name, v in dims.items():
            if not 0 < v <= 1 << 24:
                raise ModelFileError(f"{source}: {name} = {v} is out of range")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(f"{source}: num_attention_heads ({self.n_heads}) is not a "
                                 f"multiple of num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelFileError(f"{source}: head_dim {self.head_dim} is odd; RoPE needs pairs")

    def to_dict(self) -> dict:
        """The config as Hugging Face keys (what `minillm convert` stores in the file)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["head_dim"] = self.head_dim
        del d["head_dim_"]
        d["eos_token_id"] = list(self.eos_token_id)
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def is_int(value) -> bool:
    """An integer, Python's or NumPy's, and not a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return is_int(value) or isinstance(value, (float, np.floating))


def _given(d: dict, key: str, default):
    """d[key], or the default where it is absent or null."""
    value = d.get(key)
    return default if value is None else value


def _bad_value(source: str, key: str, value, expected: str) -> ModelFileError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ModelFileError(f"{source}: {key} = {shown} in the model config; it must be {expected}")


def _positive_int(d: dict, key: str, source: str) -> int | None:
    """d[key] as an int (None when absent or null): a float, bool or string layer count or
    size would otherwise be truncated or coerced into a model that is not the one described."""
    value = d.get(key)
    if value is None:
        return None
    if not is_int(value) or value <= 0:
        raise _bad_value(source, key, value, "a positive integer")
    return int(value)


def _positive_number(value, key: str, source: str) -> float:
    """A finite number > 0: eps <= 0 or theta <= 0 turns every activation into NaN."""
    try:
        number = float(value) if _is_real(value) else math.nan
    except OverflowError:  # an int beyond a float's range
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise _bad_value(source, key, value, "a finite number > 0")
    return number


def _token_id(value, key: str, vocab_size: int, source: str) -> int:
    if not is_int(value) or not 0 <= value < vocab_size:
        raise _bad_value(source, key, value, f"a token id in [0, {vocab_size}) (vocab_size)")
    return int(value)


def _read_rope(d: dict, source: str) -> tuple[float, dict | None]:
    """Read RoPE settings from either config style.

    Classic: top-level `rope_theta` + `rope_scaling`. transformers 5: a `rope_parameters`
    object holding `rope_theta`, `rope_type` and the factors. Reading only one style would
    silently fall back to the wrong frequencies on the other.
    """
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = _given(params, "rope_theta", _given(d, "rope_theta", 10000.0))
        scaling = dict(params)
        scaling.pop("rope_theta", None)
    else:
        theta = _given(d, "rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if isinstance(d.get("rope_scaling"), dict) else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelFileError(f"{source}: unsupported rope scaling type {rope_type!r} "
                                 f"(supported: llama3, linear)")
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type == "default":
            scaling = None
        else:
            _check_rope_scaling(scaling, source)
    return _positive_number(theta, "rope_theta", source), scaling


def _check_rope_scaling(scaling: dict, source: str) -> None:
    """The factors the scaling reads must be there and usable (llama3 divides by high - low)."""
    for key in ROPE_SCALING_KEYS[scaling["rope_type"]]:
        if key not in scaling:
            raise ModelFileError(f"{source}: the {scaling['rope_type']} rope scaling lacks {key}")
        _positive_number(scaling[key], f"rope_scaling.{key}", source)
    if scaling["rope_type"] == "llama3" and \
            not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ModelFileError(f"{source}: rope_scaling.high_freq_factor must be greater than "
                             f"low_freq_factor (got {scaling['high_freq_factor']} and "
                             f"{scaling['low_freq_factor']})")
