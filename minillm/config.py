"""Model configuration: a frozen dataclass built from Hugging Face `config.json` keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ModelFileError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


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
        if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ModelFileError(
                f"{source}: unsupported architecture {archs[0] if archs else model_type!r} "
                f"(model_type {model_type!r}); minillm runs Llama models only")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelFileError(f"{source}: the model config lacks {', '.join(missing)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFileError(f"{source}: unsupported hidden_act {act!r} (Llama uses silu)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ModelFileError(f"{source}: attention/MLP biases are not supported")

        rope_theta, rope_scaling = _read_rope(d, source)
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        try:
            cfg = cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                vocab_size=int(d["vocab_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                head_dim_=int(d["head_dim"]) if d.get("head_dim") else None,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=tuple(int(e) for e in eos),
            )
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{source}: bad value in the model config ({e})") from None
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
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(params)
        scaling.pop("rope_theta", None)
    else:
        theta = d.get("rope_theta", 10000.0)
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
    return float(theta), scaling
