"""Weights enter here: the one name map, strict key and shape checks, dtype widening.

A tensor source is anything with `keys()`, `shape(name)` and `tensor(name) -> float32 ndarray`
(a safetensors file, a sharded folder, a GGUF file). Matrices keep Hugging Face's
[out, in] layout: the forward pass computes `x @ w.T`, which BLAS reads without a copy, so a
float32 file stays memory-mapped and is never duplicated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .backend import Array, to_device
from .config import Config
from .errors import ModelFileError

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class WeightWarning(UserWarning):
    """Suspicious but loadable weights (NaN/inf)."""


@dataclass
class LayerWeights:
    attn_norm: Array  # [hidden]
    w_qkv: Array      # [(n_heads + 2 n_kv_heads) * head_dim, hidden]: q, k, v in one GEMM
    wo: Array         # [hidden, n_heads * head_dim]
    mlp_norm: Array   # [hidden]
    w_gate_up: Array  # [2 intermediate, hidden]: gate and up in one GEMM
    w_down: Array     # [hidden, intermediate]
    # the checkpoint's own matrices, as views into the fused ones
    wq: Array = field(init=False)
    wk: Array = field(init=False)
    wv: Array = field(init=False)
    w_gate: Array = field(init=False)
    w_up: Array = field(init=False)

    def __post_init__(self):
        q, kv = self.wo.shape[1], (self.w_qkv.shape[0] - self.wo.shape[1]) // 2
        f = self.w_gate_up.shape[0] // 2
        self.wq, self.wk, self.wv = self.w_qkv[:q], self.w_qkv[q:q + kv], self.w_qkv[q + kv:]
        self.w_gate, self.w_up = self.w_gate_up[:f], self.w_gate_up[f:]


def fuse_rows(parts: list[np.ndarray], xp) -> Array:
    """Stack matrices along rows. Free when they lie back to back in one host buffer (a float32
    file written in minillm's order: `minillm convert`), a copy otherwise."""
    adjacent = xp is np and all(
        p.flags.c_contiguous and p.dtype == parts[0].dtype for p in parts) and all(
        a.__array_interface__["data"][0] + a.nbytes == b.__array_interface__["data"][0]
        for a, b in zip(parts, parts[1:]))
    if adjacent:
        rows = sum(p.shape[0] for p in parts)
        return np.lib.stride_tricks.as_strided(parts[0], (rows,) + parts[0].shape[1:],
                                               writeable=False)
    return xp.concatenate([to_device(xp, p) for p in parts])


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, hidden], always on the host: rows are gathered per token
    layers: list[LayerWeights]
    norm: Array        # [hidden]
    lm_head: Array     # [vocab, hidden] (the embedding itself when tied)


LAYER_TENSORS = 9  # per layer: two norms, q, k, v, o, gate, up, down


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold, with its shape, in minillm's file order
    (q, k, v back to back and gate, up back to back, so they fuse without a copy)."""
    return dict(_expected(cfg))


def expected_count(cfg: Config) -> int:
    """len(expected_shapes(cfg)), without listing them."""
    return cfg.num_hidden_layers * LAYER_TENSORS + (2 if cfg.tie_word_embeddings else 3)


def _expected(cfg: Config):
    """(name, shape) of expected_shapes, one at a time."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, h)
    yield "model.embed_tokens.weight", (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        yield from (
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        )
    yield "model.norm.weight", (h,)


def check_source(source, cfg: Config, name: str) -> None:
    """Refuse missing, unexpected or misshapen tensors before anything large is read."""
    # a tensor source is no dict: keys() is its only listing (it cannot be iterated)
    keys = {k for k in source.keys() if not k.endswith(IGNORED_SUFFIXES)}  # noqa: SIM118
    need = expected_count(cfg)
    if need > len(keys):
        # not the whole list: a config may claim millions of layers the file does not hold
        first = next(k for k, _ in _expected(cfg) if k not in keys)
        raise ModelFileError(f"{name}: missing tensor {first} (the config implies {need} "
                             f"tensors, {cfg.num_hidden_layers} layers; the file has {len(keys)})")
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in keys]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{name}: missing tensor {missing[0]}{more}")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(keys - shapes.keys() - tied)
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
            w_qkv=fuse_rows([get(p + f"self_attn.{x}_proj.weight", device=False)
                             for x in "qkv"], xp),
            wo=get(p + "self_attn.o_proj.weight"),
            mlp_norm=get(p + "post_attention_layernorm.weight"),
            w_gate_up=fuse_rows([get(p + f"mlp.{x}_proj.weight", device=False)
                                 for x in ("gate", "up")], xp),
            w_down=get(p + "mlp.down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight", device=False)
    lm_head = to_device(xp, embed) if cfg.tie_word_embeddings else get("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)
