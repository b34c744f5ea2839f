"""Λ-shaped attention with a distance ceiling (LM-Infinite), blocked over queries, GQA.

For a query at position i and a key at position j <= i (DESIGN.md §1):

    i - j < n_local      ->  <R(i) q, R(j) k> / sqrt(d)    local branch: ordinary RoPE
    j < n_global         ->  <R(c) q,      k> / sqrt(d)    global branch: distance capped at c
    otherwise            ->  masked

A chunk of new tokens attends to [cache slots | its own keys]; all masks are pure functions of
positions, computed once per chunk on the host and shared by every layer. Scores are built
one block of queries at a time, so no score matrix grows with the stream. Prefill, decode and
every preset run this same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import parallel
from .cache import SCORE_BUDGET_BYTES, KVCache, WritePlan

NEG_INF = np.float32(-np.inf)
BLOCKS_PER_PART = 4


@dataclass
class QueryBlock:
    start: int            # query rows [start, stop) of the chunk
    stop: int
    n_cache: int          # cache slots [0, n_cache) scored
    chunk_lo: int         # chunk keys [chunk_lo, stop) scored
    bias_lo: int          # the columns [bias_lo, bias_lo + bias width) of [cache | chunk keys]
    bias: object          # hold every masked score: [block, width] 0 / -inf, or None (none)
    capped: object        # [block, n_global] bool: global keys scored at the ceiling, or None


@dataclass
class ChunkPlan:
    """Everything about a chunk that depends on positions only (shared by all layers)."""
    positions: np.ndarray
    blocks: list
    parts: list           # the blocks split into contiguous runs, one per worker thread
    write: WritePlan      # where the chunk's keys go

    @property
    def needs_capped(self) -> bool:
        return any(b.capped is not None for b in self.blocks)


def _allowed(i: np.ndarray, j: np.ndarray, n_local: int | None) -> np.ndarray:
    """Local branch mask [len(i), len(j)]: causal and within the window."""
    dist = i[:, None] - j[None, :]
    ok = dist >= 0
    return ok if n_local is None else ok & (dist < n_local)


def _bias(allowed: np.ndarray, xp) -> tuple[int, object]:
    """The narrowest column span holding every masked entry, as (first column, 0/-inf bias);
    (0, None) when nothing is masked, so the softmax skips the pass."""
    masked = np.flatnonzero(~allowed.all(axis=0))
    if not len(masked):
        return 0, None
    lo, hi = masked[0], masked[-1] + 1
    return int(lo), xp.asarray(np.where(allowed[:, lo:hi], np.float32(0), NEG_INF))


def plan_chunk(cache: KVCache, positions: np.ndarray, n_heads: int, xp,
               n_parts: int = 1) -> ChunkPlan:
    """Split a chunk into query blocks and derive each block's masks from slot positions;
    the blocks are grouped into at most n_parts runs of similar cost (one per thread).

    The caller guarantees that no query is n_local or more past a global key of its own chunk
    (a chunk holding positions below n_global is at most n_local long, or ends at n_global),
    so the chunk's own keys are always scored on the local branch.
    """
    spec, n_q = cache.spec, len(positions)
    n_used = cache.n_used
    per_query = n_heads * (n_used + n_q) * 4
    # several blocks per thread, so that the runs can be balanced
    block = max(1, min(-(-n_q // (BLOCKS_PER_PART * n_parts)) if n_parts > 1 else n_q,
                       SCORE_BUDGET_BYTES // per_query))
    slot_pos = cache.pos[:n_used]
    blocks = []
    for a in range(0, n_q, block):
        b = min(n_q, a + block)
        q_pos = positions[a:b]
        # a block whose queries are all past the ring's reach needs only the global slots
        ring_reach = spec.n_local is None or q_pos[0] - spec.n_local < cache.length
        n_cache = n_used if ring_reach else min(n_used, spec.n_global)
        cache_ok = _allowed(q_pos, slot_pos[:n_cache], spec.n_local)
        capped = None
        if spec.ceiling is not None and spec.n_global and n_cache:
            g = slot_pos[:min(n_cache, spec.n_global)]
            capped_np = ~cache_ok[:, :len(g)] & (q_pos[:, None] >= g[None, :])
            if capped_np.any():  # until the globals leave the window, nothing is capped
                cache_ok[:, :len(g)] |= capped_np
                capped = xp.asarray(capped_np)
        lo = 0 if spec.n_local is None else max(0, a - spec.n_local + 1)
        chunk_ok = _allowed(q_pos, positions[lo:b], spec.n_local)
        bias_lo, bias = _bias(np.concatenate([cache_ok, chunk_ok], axis=1), xp)
        blocks.append(QueryBlock(a, b, n_cache, lo, bias_lo, bias, capped))
    runs = parallel.split([(b.stop - b.start) * (b.n_cache + b.stop - b.chunk_lo)
                           for b in blocks], n_parts)
    return ChunkPlan(positions, blocks, [blocks[r.start:r.stop] for r in runs],
                     cache.write_plan(positions))


def attend(q, q_capped, k, v, cache: KVCache, layer: int, plan: ChunkPlan, xp):
    """Attention output [C, n_heads * head_dim] for one layer.

    q:        [kv_heads, C, group, d]  queries rotated at their positions, pre-scaled by
              1/sqrt(d); query head h = kv_head * group + g
    q_capped: the same, rotated at the ceiling c, or None
    k, v:     [kv_heads, C, d] the chunk's keys (rotated) and values

    A block's scores are one [kv_heads, block * group, cache slots | chunk keys] array in the
    cache's scratch, so the mask, max, exp and sum each make one pass over both parts.
    """
    kv_heads, n_q, group, d = q.shape
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [kv_heads, d, slots], [kv_heads, slots, d]
    out = cache.buffer("attention", (n_q, kv_heads, group, d), n_q)

    def attend_blocks(worker: int, blocks: list) -> None:
        for blk in blocks:
            a, b, lo, n = blk.start, blk.stop, blk.chunk_lo, blk.n_cache
            rows, width = (b - a) * group, n + b - lo
            qb = q[:, a:b].reshape(kv_heads, rows, d)                      # rows: (query, group)
            s = cache.scratch(kv_heads * rows * width, worker).reshape(kv_heads, rows, width)
            xp.matmul(qb, k[:, lo:b].transpose(0, 2, 1), out=s[..., n:])
            if n:
                xp.matmul(qb, k_cache[..., :n], out=s[..., :n])
            s4 = s.reshape(kv_heads, b - a, group, width)                 # masks are per query
            if blk.capped is not None:
                n_g = blk.capped.shape[1]
                qc = q_capped[:, a:b].reshape(kv_heads, rows, d)
                s_cap = (qc @ cache.k_raw[layer][:, :n_g].transpose(0, 2, 1)).reshape(
                    kv_heads, b - a, group, n_g)
                s4[..., :n_g] = xp.where(blk.capped[:, None], s_cap, s4[..., :n_g])
            if blk.bias is not None:
                s4[..., blk.bias_lo:blk.bias_lo + blk.bias.shape[1]] += blk.bias[:, None]
            # softmax over [cache | chunk] keys; the 1/sum is applied to the output rows
            s -= s.max(axis=-1, keepdims=True)
            xp.exp(s, out=s)
            z = s.sum(axis=-1, keepdims=True)                              # [kv, rows, 1]
            o = s[..., n:] @ v[:, lo:b]                                    # [kv, rows, d]
            if n:
                o += s[..., :n] @ v_cache[:, :n]
            o /= z
            out[a:b] = o.reshape(kv_heads, b - a, group, d).transpose(1, 0, 2, 3)

    parallel.run(attend_blocks, plan.parts)
    return out.reshape(n_q, kv_heads * group * d)
