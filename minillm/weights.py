"""Weights enter here: the one name map, strict key and shape checks, dtype widening.

A tensor source is anything with `keys()`, `shape(name)` and `tensor(name) -> float32 ndarray`
(a safetensors file, a sharded folder, a GGUF file). Matrices keep Hugging Face's
[out, in] layout: the forward pass computes `x @ w.T`, which BLAS reads without a copy, so a
float32 file stays memory-mapped and is never duplicated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .backend import to_device
from .config import Config
from .errors import ModelFileError

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class WeightWarning(UserWarning):
    """Suspicious but loadable weights (NaN/inf)."""


@dataclass
class LayerWeights:
    attn_norm: object  # [hidden]
    wq: object         # [n_heads * head_dim, hidden]
    wk: object         # [n_kv_heads * head_dim, hidden]
    wv: object         # [n_kv_heads * head_dim, hidden]
    wo: object         # [hidden, n_heads * head_dim]
    mlp_norm: object   # [hidden]
    w_gate: object     # [intermediate, hidden]
    w_up: object       # [intermediate, hidden]
    w_down: object     # [hidden, intermediate]


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, hidden], always on the host: rows are gathered per token
    layers: list
    norm: object       # [hidden]
    lm_head: object    # [vocab, hidden] (the embedding itself when tied)


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold, with its shape."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_source(source, cfg: Config, name: str) -> None:
    """Refuse missing, unexpected or misshapen tensors before anything large is read."""
    shapes = expected_shapes(cfg)
    keys = {k for k in source.keys() if not k.endswith(IGNORED_SUFFIXES)}
    missing = [k for k in shapes if k not in keys]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{name}: missing tensor {missing[0]}{more}")
    extra = sorted(keys - shapes.keys() - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise ModelFileError(f"{name}: unexpected tensor {extra[0]} (not a Llama checkpoint?)")
    for k, want in shapes.items():
        got = tuple(source.shape(k))
        if got != want:
            raise ModelFileError(f"{name}: tensor {k} has shape {list(got)}, "
                                 f"the config implies {list(want)}")


def _finite(a: np.ndarray) -> bool:
    # a sum is nan/inf if any element is; only then pay for the exact elementwise check
    return bool(np.isfinite(a.sum(dtype=np.float32))) or bool(np.isfinite(a).all())


def load_weights(source, cfg: Config, xp, name: str) -> Weights:
    """Read every tensor once (float32), warn on NaN/inf, move matrices to the backend."""
    check_source(source, cfg, name)

    def get(key: str, device: bool = True):
        a = source.tensor(key)
        if not _finite(a):
            warnings.warn(f"{name}: tensor {key} contains NaN or inf values", WeightWarning,
                          stacklevel=3)
        return to_device(xp, a) if device else a

    layers = []
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight"),
            wq=get(p + "self_attn.q_proj.weight"),
            wk=get(p + "self_attn.k_proj.weight"),
            wv=get(p + "self_attn.v_proj.weight"),
            wo=get(p + "self_attn.o_proj.weight"),
            mlp_norm=get(p + "post_attention_layernorm.weight"),
            w_gate=get(p + "mlp.gate_proj.weight"),
            w_up=get(p + "mlp.up_proj.weight"),
            w_down=get(p + "mlp.down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight", device=False)
    lm_head = to_device(xp, embed) if cfg.tie_word_embeddings else get("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)
