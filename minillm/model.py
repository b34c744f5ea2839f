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


def rms_norm(x, w, eps: float, xp, out=None):
    """x / rms(x) * w over the last axis (into `out` when given)."""
    sq = xp.multiply(x, x, out=out)
    scale = xp.sqrt(sq.mean(axis=-1, keepdims=True) + np.float32(eps))
    h = xp.divide(x, scale, out=sq)
    h *= w
    return h


def mlp(x, lw: LayerWeights, cache: KVCache, xp):
    """SwiGLU, down(silu(gate(x)) * up(x)), with gate and up in one GEMM: silu(g) * u is
    computed as g * u / (1 + exp(-g)) in place, in the cache's reusable buffers."""
    n_q, f = x.shape[0], lw.w_down.shape[1]
    gate_up = xp.matmul(x, lw.w_gate_up.T, out=cache.buffer("gate_up", (n_q, 2 * f), n_q))
    g, u = gate_up[:, :f], gate_up[:, f:]
    e = xp.negative(g, out=cache.buffer("silu", (n_q, f), n_q))
    xp.exp(e, out=e)
    e += 1
    g *= u
    g /= e
    return xp.matmul(g, lw.w_down.T, out=cache.buffer("proj", x.shape, n_q))


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

    def buf(name, shape):  # every layer's temporaries have the same shapes: allocated once
        return cache.buffer(name, shape, n_q)

    h = rms_norm(x, lw.attn_norm, cfg.rms_norm_eps, xp, out=buf("norm", x.shape))
    qkv = xp.matmul(h, lw.w_qkv.T, out=buf("qkv", (n_q, lw.w_qkv.shape[0])))  # [C, (H + 2K) d]
    # query head h belongs to key/value head h // group: view q as [K, C, group, d]
    q = qkv[:, :n_h * d].reshape(n_q, n_kv, n_h // n_kv, d).transpose(1, 0, 2, 3)
    k = qkv[:, n_h * d:(n_h + n_kv) * d].reshape(n_q, n_kv, d).transpose(1, 0, 2)  # [K, C, d]
    v = qkv[:, (n_h + n_kv) * d:].reshape(n_q, n_kv, d).transpose(1, 0, 2)
    q_rot = apply_rope(q, rot.q_cos, rot.q_sin, xp, out=buf("q_rot", q.shape))
    k_rot = apply_rope(k, rot.cos, rot.sin, xp, out=buf("k_rot", k.shape))
    q_capped = apply_rope(q, *rot.q_capped, xp) if plan.needs_capped else None
    a = attention.attend(q_rot, q_capped, k_rot, v, cache, layer, plan, xp)  # [C, H*d]
    cache.write(layer, plan.write, k_rot, k, v)
    x += xp.matmul(a, lw.wo.T, out=buf("proj", x.shape))
    x += mlp(rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps, xp, out=buf("norm", x.shape)), lw,
             cache, xp)
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
