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
    scale = xp.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps))
    h = x / scale
    h *= w
    return h


def mlp(x, lw: LayerWeights, xp):
    """SwiGLU, down(silu(gate(x)) * up(x)), with gate and up in one GEMM: silu(g) * u is
    computed as g * u / (1 + exp(-g)) in place, with one temporary."""
    gate_up = x @ lw.w_gate_up.T                                           # [C, 2F]
    f = gate_up.shape[1] // 2
    g, u = gate_up[:, :f], gate_up[:, f:]
    e = xp.negative(g)
    xp.exp(e, out=e)
    e += 1
    g *= u
    g /= e
    return g @ lw.w_down.T


class Rotations:
    """cos/sin for one chunk's positions and for the ceiling position (shared by all layers).

    The query tables carry the 1/sqrt(head_dim) score scale, so queries come out pre-scaled,
    and are shaped [C, 1, d/2] to broadcast over the query heads of a key/value head.
    """

    def __init__(self, positions: np.ndarray, freq: np.ndarray, ceiling: int | None,
                 head_dim: int, xp):
        scale = np.float32(1 / np.sqrt(head_dim))
        self.cos, self.sin = cos_sin(positions, freq, xp)                  # [C, d/2]
        self.q_cos, self.q_sin = self.cos[:, None] * scale, self.sin[:, None] * scale
        self.q_capped = None
        if ceiling is not None:
            cos, sin = cos_sin([ceiling], freq, xp)
            self.q_capped = cos * scale, sin * scale


def block(x, lw: LayerWeights, layer: int, cfg: Config, cache: KVCache, plan, rot: Rotations,
          xp):
    """One transformer block: x [C, D] -> [C, D] (updated in place); writes this layer's
    keys/values to the cache."""
    n_q, d, n_h, n_kv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    qkv = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps, xp) @ lw.w_qkv.T     # [C, (H + 2K) d]
    # query head h belongs to key/value head h // group: view q as [K, C, group, d]
    q = qkv[:, :n_h * d].reshape(n_q, n_kv, n_h // n_kv, d).transpose(1, 0, 2, 3)
    k = qkv[:, n_h * d:(n_h + n_kv) * d].reshape(n_q, n_kv, d).transpose(1, 0, 2)  # [K, C, d]
    v = qkv[:, (n_h + n_kv) * d:].reshape(n_q, n_kv, d).transpose(1, 0, 2)
    q_rot = apply_rope(q, rot.q_cos, rot.q_sin, xp)
    k_rot = apply_rope(k, rot.cos, rot.sin, xp)
    q_capped = apply_rope(q, *rot.q_capped, xp) if plan.needs_capped else None
    a = attention.attend(q_rot, q_capped, k_rot, v, cache, layer, plan, xp)  # [C, H*d]
    cache.write(layer, plan.write, k_rot, k, v)
    x += a @ lw.wo.T
    x += mlp(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps, xp), lw, xp)
    return x


def forward(weights: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray,
            cache: KVCache, freq: np.ndarray, xp):
    """Final-normed hidden states [C, D] for a chunk; the cache advances past it.

    The chunk must not straddle n_global (see attention.plan_chunk); the session splits it.
    """
    cache.reserve(int(positions[-1]) + 1)
    plan = attention.plan_chunk(cache, positions, cfg.n_heads, xp)
    rot = Rotations(positions, freq, cache.spec.ceiling, cfg.head_dim, xp)
    x = xp.asarray(weights.embed[tokens])                                 # [C, D], a fresh copy
    for layer, lw in enumerate(weights.layers):
        x = block(x, lw, layer, cfg, cache, plan, rot, xp)
    cache.commit(plan.write)
    return rms_norm(x, weights.norm, cfg.rms_norm_eps, xp)


def lm_head(h, weights: Weights):
    """Logits [C, V] from final hidden states [C, D]."""
    return h @ weights.lm_head.T
