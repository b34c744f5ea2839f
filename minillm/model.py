"""The Llama forward pass as pure functions over arrays (numpy or cupy, passed as `xp`).

Dimension names: C tokens in the chunk, D hidden size, H query heads, K key/value heads,
d head_dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from . import attention
from .cache import KVCache
from .config import Config
from .rope import apply_rope, cos_sin
from .weights import LayerWeights, Weights


def rms_norm(x, w, eps: float, xp):
    """x / rms(x) * w over the last axis."""
    scale = xp.reciprocal(xp.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps)))
    return (x * scale) * w


def silu(x, xp):
    return x / (1 + xp.exp(-x))


def mlp(x, lw: LayerWeights, xp):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    return (silu(x @ lw.w_gate.T, xp) * (x @ lw.w_up.T)) @ lw.w_down.T


class Rotations:
    """cos/sin for one chunk's positions and for the ceiling position (shared by all layers)."""

    def __init__(self, positions: np.ndarray, freq: np.ndarray, ceiling: int | None, xp):
        self.cos, self.sin = cos_sin(positions, freq, xp)                  # [C, d/2]
        self.capped = cos_sin([ceiling], freq, xp) if ceiling is not None else None


def block(x, lw: LayerWeights, layer: int, cfg: Config, cache: KVCache, plan, rot: Rotations,
          xp):
    """One transformer block: x [C, D] -> [C, D]; writes this layer's keys/values to the cache."""
    n_q, d = x.shape[0], cfg.head_dim
    h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps, xp)
    q = (h @ lw.wq.T).reshape(n_q, cfg.n_heads, d).transpose(1, 0, 2)     # [H, C, d]
    k = (h @ lw.wk.T).reshape(n_q, cfg.n_kv_heads, d).transpose(1, 0, 2)  # [K, C, d]
    v = (h @ lw.wv.T).reshape(n_q, cfg.n_kv_heads, d).transpose(1, 0, 2)
    q *= np.float32(1 / np.sqrt(d))
    q_rot, k_rot = apply_rope(q, rot.cos, rot.sin), apply_rope(k, rot.cos, rot.sin)
    q_capped = None
    if rot.capped is not None and plan.needs_capped:
        q_capped = apply_rope(q, *rot.capped)
    a = attention.attend(q_rot, q_capped, k_rot, v, cache, layer, plan, xp)  # [C, H*d]
    cache.write(layer, plan.write, k_rot, k, v)
    x = x + a @ lw.wo.T
    return x + mlp(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps, xp), lw, xp)


def forward(weights: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray,
            cache: KVCache, freq: np.ndarray, xp):
    """Final-normed hidden states [C, D] for a chunk; the cache advances past it.

    The chunk must not straddle n_global (see attention.plan_chunk); the session splits it.
    """
    cache.reserve(int(positions[-1]) + 1)
    plan = attention.plan_chunk(cache, positions, cfg.n_heads, xp)
    rot = Rotations(positions, freq, cache.spec.ceiling, xp)
    x = xp.asarray(weights.embed[tokens])                                 # [C, D]
    for layer, lw in enumerate(weights.layers):
        x = block(x, lw, layer, cfg, cache, plan, rot, xp)
    cache.commit(plan.write)
    return rms_norm(x, weights.norm, cfg.rms_norm_eps, xp)


def lm_head(h, weights: Weights):
    """Logits [C, V] from final hidden states [C, D]."""
    return h @ weights.lm_head.T
