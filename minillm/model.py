"""The Llama forward pass as pure functions over arrays (numpy or cupy, passed as `xp`).

Dimension names: C tokens in the chunk, D hidden size, H query heads, K key/value heads,
d head_dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from . import attention, parallel
from .cache import KVCache
from .config import Config
from .rope import apply_rope, cos_sin
from .weights import LayerWeights, Weights


def rms_norm(x, w, eps: float, xp, out=None):
    """x / rms(x) * w over the last axis (into `out` when given)."""
    sq = xp.multiply(x, x, out=out)
    scale = xp.sqrt(sq.sum(axis=-1, keepdims=True) / np.float32(x.shape[-1]) + np.float32(eps))
    h = xp.divide(x, scale, out=sq)
    h *= w
    return h


def mlp(x, lw: LayerWeights, gate_up, silu, out, xp):
    """SwiGLU, down(silu(gate(x)) * up(x)), with gate and up in one GEMM: silu(g) * u is
    computed as g * u / (1 + exp(-g)) in place. gate_up [C, 2F], silu [C, F] and out [C, D]
    are the caller's buffers."""
    f = lw.w_down.shape[1]
    xp.matmul(x, lw.w_gate_up.T, out=gate_up)
    g, u = gate_up[:, :f], gate_up[:, f:]
    e = xp.negative(g, out=silu)
    xp.exp(e, out=e)
    e += 1
    g *= u
    g /= e
    return xp.matmul(g, lw.w_down.T, out=out)


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


def chunk_buffers(cfg: Config, cache: KVCache, n_q: int) -> dict:
    """A chunk's per-layer temporaries: every layer's have the same shapes, so all layers
    (and later chunks) reuse the cache's buffers."""
    d, n_h, n_kv, f = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
    return {name: cache.buffer(name, shape, n_q) for name, shape in (
        ("norm", (n_q, cfg.hidden_size)), ("qkv", (n_q, (n_h + 2 * n_kv) * d)),
        ("proj", (n_q, cfg.hidden_size)), ("gate_up", (n_q, 2 * f)), ("silu", (n_q, f)),
        ("q_rot", (n_kv, n_q, n_h // n_kv, d)), ("k_rot", (n_kv, n_q, d)))}


def block(x, lw: LayerWeights, layer: int, cfg: Config, cache: KVCache, plan, rot: Rotations,
          rows: list, buf: dict, xp):
    """One transformer block: x [C, D] -> [C, D] (updated in place); writes this layer's
    keys/values to the cache. Row-wise work runs on each of `rows` (slices of the chunk) at
    once; attention on the plan's query-block runs (see parallel). buf: chunk_buffers."""
    n_q, d, n_h, n_kv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    eps = cfg.rms_norm_eps
    qkv, q_rot, k_rot = buf["qkv"], buf["q_rot"], buf["k_rot"]
    # query head h belongs to key/value head h // group: view q as [K, C, group, d]
    q = qkv[:, :n_h * d].reshape(n_q, n_kv, n_h // n_kv, d).transpose(1, 0, 2, 3)
    k = qkv[:, n_h * d:(n_h + n_kv) * d].reshape(n_q, n_kv, d).transpose(1, 0, 2)  # [K, C, d]
    v = qkv[:, (n_h + n_kv) * d:].reshape(n_q, n_kv, d).transpose(1, 0, 2)

    def project(_, r):  # normed rows -> q, k, v; q and k rotated
        h = rms_norm(x[r], lw.attn_norm, eps, xp, out=buf["norm"][r])
        xp.matmul(h, lw.w_qkv.T, out=qkv[r])                             # [C, (H + 2K) d]
        apply_rope(q[:, r], rot.q_cos[r], rot.q_sin[r], xp, out=q_rot[:, r])
        apply_rope(k[:, r], rot.cos[r], rot.sin[r], xp, out=k_rot[:, r])

    def feed_forward(_, r):  # attention output projection, residuals and the MLP
        x[r] += xp.matmul(a[r], lw.wo.T, out=buf["proj"][r])
        h = rms_norm(x[r], lw.mlp_norm, eps, xp, out=buf["norm"][r])
        x[r] += mlp(h, lw, buf["gate_up"][r], buf["silu"][r], buf["proj"][r], xp)

    parallel.run(project, rows)
    q_capped = apply_rope(q, *rot.q_capped, xp) if plan.needs_capped else None
    a = attention.attend(q_rot, q_capped, k_rot, v, cache, layer, plan, xp)  # [C, H*d]
    cache.write(layer, plan.write, k_rot, k, v)
    parallel.run(feed_forward, rows)
    return x


def forward(weights: Weights, cfg: Config, tokens: np.ndarray, positions: np.ndarray,
            cache: KVCache, freq: np.ndarray, xp):
    """Final-normed hidden states [C, D] for a chunk; the cache advances past it.

    No query of the chunk may be n_local or more past a global key of the same chunk (see
    attention.plan_chunk); the session splits chunks so.
    """
    cache.reserve(int(positions[-1]) + 1)
    n_parts = parallel.parts_for(len(positions), xp)
    plan = attention.plan_chunk(cache, positions, cfg.n_heads, xp, n_parts)
    rot = Rotations(positions, freq, cache.spec.ceiling, cfg.head_dim, xp)
    rows = parallel.row_ranges(len(positions), n_parts)
    buf = chunk_buffers(cfg, cache, len(positions))
    x = xp.asarray(weights.embed[tokens])                                 # [C, D], a fresh copy
    with parallel.chunk_threads(n_parts):
        for layer, lw in enumerate(weights.layers):
            x = block(x, lw, layer, cfg, cache, plan, rot, rows, buf, xp)
    cache.commit(plan.write)
    return rms_norm(x, weights.norm, cfg.rms_norm_eps, xp)


def lm_head(h, weights: Weights):
    """Logits [C, V] from final hidden states [C, D]."""
    return h @ weights.lm_head.T
