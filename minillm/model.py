"""The Llama forward pass as pure functions over arrays (numpy or cupy, `xp`).

Dimension names: C tokens in the chunk, D hidden size, H query heads, K key/value heads,
d head_dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from . import attention, parallel
from .attention import AttentionSpec, ChunkPlan
from .backend import Array
from .cache import KVCache, StagedChunk
from .config import Config
from .errors import MiniLLMError
from .middle import MiddleAttention
from .rope import apply_rope, cos_sin
from .weights import LayerWeights, Weights
from .workspace import Workspace


def rms_norm(x: Array, w: Array, eps: float, xp, out: Array | None = None) -> Array:
    """x / rms(x) * w over the last axis (into `out` when given)."""
    sq = xp.multiply(x, x, out=out)
    scale = xp.sqrt(sq.sum(axis=-1, keepdims=True) / np.float32(x.shape[-1]) + np.float32(eps))
    h = xp.divide(x, scale, out=sq)
    h *= w
    return h


def mlp(x: Array, lw: LayerWeights, gate_up: Array, silu: Array, out: Array, xp) -> Array:
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


class ChunkAbandoned(Exception):
    """forward's stop() asked to abandon the chunk between layers: the cache is as it was."""


class RowBuffers:
    """The temporaries of the row-wise steps (attention_input, attention_residual,
    mlp_residual), views into a workspace overwritten by every layer; subclasses set `rows`
    (one slice per thread), `staged` and call `make_row_buffers`."""

    def make_row_buffers(self, cfg: Config, work: Workspace, n: int) -> None:
        d, n_h, n_kv, f = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
        buf = work.buffer
        self.attn_in = buf("attn_in", (n, cfg.hidden_size), n)      # normed input of attention
        self.qkv = buf("qkv", (n, (n_h + 2 * n_kv) * d), n)         # q | k | v, un-rotated
        self.q_rot = buf("q_rot", (n_kv, n, n_h // n_kv, d), n)     # q rotated and scaled
        self.attn_out = buf("attn_out", (n, cfg.hidden_size), n)    # attention @ Wo
        self.mlp_in = buf("mlp_in", (n, cfg.hidden_size), n)        # normed input of the MLP
        self.gate_up = buf("gate_up", (n, 2 * f), n)
        self.silu = buf("silu", (n, f), n)
        self.mlp_out = buf("mlp_out", (n, cfg.hidden_size), n)
        # views of qkv per key/value head; query head h belongs to key/value head h // group
        self.q = self.qkv[:, :n_h * d].reshape(n, n_kv, n_h // n_kv, d).transpose(1, 0, 2, 3)
        self.k = self.qkv[:, n_h * d:(n_h + n_kv) * d].reshape(n, n_kv, d).transpose(1, 0, 2)
        self.v = self.qkv[:, (n_h + n_kv) * d:].reshape(n, n_kv, d).transpose(1, 0, 2)

    def k_rot(self, layer: int) -> Array:
        """This layer's rotated keys [K, C, d]: its slice of the staged keys."""
        return self.staged.k[layer]

    def by_rows(self, step, *args) -> None:
        """step(rows, *args, self) for every thread's rows at once."""
        parallel.run(lambda _, rows: step(rows, *args, self), self.rows)


@dataclass
class Chunk(RowBuffers):
    """What every layer of one chunk shares: its attention plan and rotations, the rows each
    thread computes, and the temporaries (views into the session's workspace, overwritten by
    every layer). Every layer's keys and values are staged for the cache's commit at the end.
    Row-wise steps run through `by_rows`, one thread per row range."""
    cfg: Config
    cache: KVCache
    work: Workspace
    plan: ChunkPlan
    rot: Rotations
    rows: list[slice]
    xp: ModuleType  # numpy or cupy
    middle: MiddleAttention | None = None  # top-k middle attention's store, or None (off)
    top_k_last: bool = False  # the chunk's last query attends to the top-k middle keys

    def __post_init__(self):
        cfg, n = self.cfg, len(self.plan.positions)
        d, n_h, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.make_row_buffers(cfg, self.work, n)
        buf = self.work.buffer
        # every layer's keys (RoPE writes them there: k_rot(layer)) and values for the commit;
        # the un-rotated keys only of global positions (at most n_global rows)
        layers, n_g = cfg.num_hidden_layers, self.plan.write.n_global_rows
        k_raw = buf("staged_k_raw", (layers, n_kv, self.cache.n_global, d), None)[:, :, :n_g]
        self.staged = StagedChunk(buf("staged_k", (layers, n_kv, n, d), n),
                                  buf("staged_v", (layers, n_kv, n, d), n),
                                  k_raw if n_g else None)
        if self.middle is not None:  # the stored layers' un-rotated keys, for the store
            stored = self.middle.n_layers
            self.staged_middle_k = buf("staged_middle_k", (stored, n_kv, n, d), n)
            self.last_lse = buf("top_k_lse", (n_kv, n_h // n_kv), None)


def block(x: Array, lw: LayerWeights, layer: int, chunk: Chunk) -> Array:
    """One transformer block: x [C, D] -> [C, D], updated in place; this layer's keys and
    values are staged for the cache."""
    chunk.by_rows(attention_input, x, lw, layer)  # RMSNorm; q, k, v in one GEMM; RoPE on q, k
    a = attend(layer, chunk)                  # Λ attention over [cache | chunk], [C, H d]
    chunk.by_rows(attention_residual, x, a, lw)   # x += a Wo
    chunk.by_rows(mlp_residual, x, lw)            # x += MLP(RMSNorm(x))
    return x


def attention_input(rows: slice, x: Array, lw: LayerWeights, layer: int, c: Chunk) -> None:
    h = rms_norm(x[rows], lw.attn_norm, c.cfg.rms_norm_eps, c.xp, out=c.attn_in[rows])
    c.xp.matmul(h, lw.w_qkv.T, out=c.qkv[rows])                          # [C, (H + 2K) d]
    apply_rope(c.q[:, rows], c.rot.q_cos[rows], c.rot.q_sin[rows], c.xp, out=c.q_rot[:, rows])
    apply_rope(c.k[:, rows], c.rot.cos[rows], c.rot.sin[rows], c.xp, out=c.k_rot(layer)[:, rows])
    c.staged.v[layer][:, rows] = c.v[:, rows]  # qkv is overwritten by the next layer


def attend(layer: int, c: Chunk) -> Array:
    """The chunk's attention output over [cache | chunk]; the cache is only read. With top-k
    middle attention on, the stored layers' un-rotated keys are staged for the store, and the
    chunk's last query (when it is a feed call's last token) adds its top-k middle keys."""
    q_capped = apply_rope(c.q, *c.rot.q_capped, c.xp) if c.plan.needs_capped else None
    stored = c.middle is not None and c.middle.stores(layer)
    lse = c.last_lse if stored and c.top_k_last else None
    a = attention.attend(c.q_rot, q_capped, c.k_rot(layer), c.v, c.cache, layer, c.plan, c.work,
                         last_lse=lse)
    if c.staged.k_raw is not None:
        c.staged.k_raw[layer] = c.k[:, c.plan.write.global_rows]
    if stored:
        c.staged_middle_k[layer - c.middle.first_layer] = c.k
        if lse is not None:
            c.middle.attend_last_row(layer, int(c.plan.positions[-1]), c.q[:, -1], a[-1], lse,
                                     c.xp)
    return a


def attention_residual(rows: slice, x: Array, a: Array, lw: LayerWeights, c: Chunk) -> None:
    x[rows] += c.xp.matmul(a[rows], lw.wo.T, out=c.attn_out[rows])


def mlp_residual(rows: slice, x: Array, lw: LayerWeights, c: Chunk) -> None:
    h = rms_norm(x[rows], lw.mlp_norm, c.cfg.rms_norm_eps, c.xp, out=c.mlp_in[rows])
    x[rows] += mlp(h, lw, c.gate_up[rows], c.silu[rows], c.mlp_out[rows], c.xp)


def forward(weights: Weights, cfg: Config, freq: np.ndarray, tokens: np.ndarray,
            positions: np.ndarray, spec: AttentionSpec, cache: KVCache, work: Workspace,
            stop: Callable[[], bool] | None = None, middle: MiddleAttention | None = None,
            top_k_last: bool = False) -> Array:
    """Final-normed hidden states [C, D] for a chunk; the cache advances past it.

    See forward_staged; this commits the chunk at once.
    """
    h, commit = forward_staged(weights, cfg, freq, tokens, positions, spec, cache, work, stop,
                               middle, top_k_last)
    commit()
    return h


def forward_staged(weights: Weights, cfg: Config, freq: np.ndarray, tokens: np.ndarray,
                   positions: np.ndarray, spec: AttentionSpec, cache: KVCache, work: Workspace,
                   stop: Callable[[], bool] | None = None, middle: MiddleAttention | None = None,
                   top_k_last: bool = False) -> tuple[Array, Callable[[], None]]:
    """(final-normed hidden states [C, D] for a chunk, the call that commits it to the cache).

    Until that call the cache is only read: an exception before it (ChunkAbandoned when
    stop(), asked before every layer, says so; KeyboardInterrupt; MemoryError) leaves the cache
    exactly as it was. freq: RoPE inverse frequencies (float64). No query of the chunk may be
    n_local or more past a global key of the same chunk (see attention.plan_chunk); the
    session splits so.

    middle: top-k middle attention (minillm.middle): the commit also appends the chunk to its
    store, which must hold every position before the chunk; top_k_last: the chunk's last
    query attends to its top-k middle keys too (the chunk must be at most n_local long, so
    that its middle is all in the store).
    """
    xp = work.xp
    if middle is not None and middle.store.length != positions[0]:
        raise MiniLLMError(f"the middle store holds {middle.store.length} positions but the "
                           f"chunk starts at {positions[0]}: tokens reached the session "
                           "without it (a session with top-k middle attention cannot be batched)")
    n_parts = parallel.parts_for(len(positions), xp)
    plan = attention.plan_chunk(spec, cache, positions, cfg.n_heads, xp, n_parts)
    rot = Rotations(positions, freq, spec.ceiling, cfg.head_dim, xp)
    chunk = Chunk(cfg, cache, work, plan, rot, parallel.row_ranges(len(positions), n_parts), xp,
                  middle, top_k_last and middle is not None)
    x = xp.asarray(weights.embed[tokens])                                 # [C, D], a fresh copy
    with parallel.chunk_threads(n_parts):
        for layer, lw in enumerate(weights.layers):
            if stop is not None and stop():
                raise ChunkAbandoned(f"abandoned before layer {layer}")
            x = block(x, lw, layer, chunk)
    h = rms_norm(x, weights.norm, cfg.rms_norm_eps, xp)
    if middle is None:
        return h, functools.partial(cache.commit, plan.write, chunk.staged)

    def commit() -> None:  # the store first: if it cannot be written, the cache stays as it was
        first = middle.first_layer
        middle.store.append(chunk.staged_middle_k, chunk.staged.v[first:])
        cache.commit(plan.write, chunk.staged)
    return h, commit


def lm_head(h: Array, weights: Weights) -> Array:
    """Logits [C, V] from final hidden states [C, D], or [V] from one state [D] (a GEMV)."""
    if h.ndim == 1:
        return weights.lm_head @ h
    return h @ weights.lm_head.T
