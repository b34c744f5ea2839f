"""Λ-shaped attention with a distance ceiling (LM-Infinite), blocked over queries, GQA.

For a query at position i and a key at position j <= i (docs/DESIGN.md, "The method"):

    i - j < n_local      ->  <R(i) q, R(j) k> / sqrt(d)    local branch: ordinary RoPE
    j < n_global         ->  <R(c) q,      k> / sqrt(d)    global branch: distance capped at c
    otherwise            ->  masked

`lambda_mask` is that rule as a pure function of positions. A chunk of new tokens attends to
[cache slots | its own keys]; the masks are computed once per chunk on the host and shared by
every layer. Scores are built one block of queries at a time, so no score matrix grows with
the stream. Prefill, decode and every preset run this same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import parallel
from .backend import Array
from .cache import KVCache, WritePlan
from .config import Config, is_int
from .workspace import Workspace, score_budget

NEG_INF = np.float32(-np.inf)
BLOCKS_PER_PART = 4
PRESETS = ("lminfinite", "window", "full")
DEFAULT_N_GLOBAL = 10  # the paper's default; 10 to 100 behave alike
EXP_SUM_MIN, EXP_SUM_MAX = 2.0 ** -64, 2.0 ** 64  # see exp_sums_in_range


@dataclass(frozen=True)
class AttentionSpec:
    """Which keys a query sees, and how (see the module docstring)."""
    preset: str
    n_global: int
    n_local: int | None   # None: unbounded (full attention)
    ceiling: int | None   # None: no capped-distance branch

    @property
    def bounded(self) -> bool:
        return self.n_local is not None


def attention_spec(cfg: Config, attention: str = "lminfinite", n_global: int | None = None,
                   n_local: int | None = None, ceiling: int | None = None) -> AttentionSpec:
    """Resolve a preset and its overrides into an AttentionSpec (TypeError on a value of the
    wrong type, ValueError on one out of range)."""
    if not isinstance(attention, str):
        raise TypeError(f"attention must be a preset name, one of {', '.join(PRESETS)} "
                        f"(got {type(attention).__name__} {attention!r})")
    for name, value in (("n_global", n_global), ("n_local", n_local), ("ceiling", ceiling)):
        if value is not None and not is_int(value):  # never truncate 16.7 or parse "16"
            raise TypeError(f"{name} must be an int or None (got {type(value).__name__} "
                            f"{value!r})")
    if attention not in PRESETS:
        raise ValueError(f"unknown attention preset {attention!r} "
                         f"(choose from {', '.join(PRESETS)})")
    if attention == "full":
        given = [k for k, v in (("n_global", n_global or None), ("n_local", n_local),
                                ("ceiling", ceiling)) if v is not None]
        if given:  # silently ignoring them would run another model than the one asked for
            raise ValueError(f"the full preset keeps every key: {', '.join(given)} cannot be "
                             "set with it")
        return AttentionSpec("full", 0, None, None)
    n_local = cfg.max_position_embeddings if n_local is None else int(n_local)
    if n_local < 1:
        raise ValueError(f"n_local must be at least 1 (got {n_local})")
    if attention == "window":
        if n_global:
            raise ValueError("the window preset keeps no global tokens (n_global must be 0)")
        if ceiling is not None:
            raise ValueError("the window preset has no distance ceiling (ceiling must be unset)")
        return AttentionSpec("window", 0, n_local, None)
    n_global = DEFAULT_N_GLOBAL if n_global is None else int(n_global)
    ceiling = n_local if ceiling is None else int(ceiling)
    if not 0 <= n_global <= n_local:
        raise ValueError(f"n_global must be between 0 and n_local ({n_local}), got {n_global}")
    if ceiling < 0:
        raise ValueError(f"ceiling must be non-negative (got {ceiling})")
    return AttentionSpec("lminfinite", n_global, n_local, ceiling)


def lambda_mask(query_positions: np.ndarray, key_positions: np.ndarray,
                spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray]:
    """LM-Infinite's Λ mask: (local, capped), bool [queries, keys].

    local[i, j]:  0 <= i - j < n_local (any j <= i when unbounded): ordinary RoPE scores
    capped[i, j]: a global key (j < n_global) out of the window, scored with q rotated at the
                  ceiling (only with a ceiling)
    A key that is in neither is masked.
    """
    i = np.asarray(query_positions, dtype=np.int64)[:, None]
    j = np.asarray(key_positions, dtype=np.int64)[None, :]
    dist = i - j
    causal = dist >= 0
    local = causal if spec.n_local is None else causal & (dist < spec.n_local)
    if spec.ceiling is None:
        return local, np.zeros_like(local)
    return local, causal & ~local & (j < spec.n_global)


@dataclass
class QueryBlock:
    start: int            # query rows [start, stop) of the chunk
    stop: int
    n_cache: int          # cache slots [0, n_cache) scored
    chunk_lo: int         # chunk keys [chunk_lo, stop) scored
    bias_lo: int          # the columns [bias_lo, bias_lo + bias width) of [cache | chunk keys]
    bias: Array | None    # hold every masked score: [block, width] 0 / -inf, or None (none)
    capped: Array | None  # [block, n_global] bool: global keys scored at the ceiling, or None


@dataclass
class ChunkPlan:
    """Everything about a chunk that depends on positions only (shared by all layers)."""
    positions: np.ndarray
    blocks: list[QueryBlock]
    parts: list[list[QueryBlock]]  # the blocks split into contiguous runs, one per worker thread
    write: WritePlan      # where the chunk's keys go

    @property
    def needs_capped(self) -> bool:
        return any(b.capped is not None for b in self.blocks)


def _bias(allowed: np.ndarray, xp) -> tuple[int, Array | None]:
    """The narrowest column span holding every masked entry, as (first column, 0/-inf bias);
    (0, None) when nothing is masked, so the softmax skips the pass."""
    masked = np.flatnonzero(~allowed.all(axis=0))
    if not len(masked):
        return 0, None
    lo, hi = masked[0], masked[-1] + 1
    return int(lo), xp.asarray(np.where(allowed[:, lo:hi], np.float32(0), NEG_INF))


def plan_chunk(spec: AttentionSpec, cache: KVCache, positions: np.ndarray, n_heads: int, xp,
               n_parts: int = 1) -> ChunkPlan:
    """Split a chunk into query blocks and derive each block's masks from slot positions;
    the blocks are grouped into at most n_parts runs of similar cost (one per thread).

    The caller guarantees that no query is n_local or more past a global key of its own chunk
    (a chunk holding positions below n_global is at most n_local long, or ends at n_global),
    so the chunk's own keys are always scored on the local branch.
    """
    n_q, n_used = len(positions), cache.n_used
    per_query = n_heads * (n_used + n_q) * 4
    # several blocks per thread, so that the runs can be balanced
    block = max(1, min(-(-n_q // (BLOCKS_PER_PART * n_parts)) if n_parts > 1 else n_q,
                       score_budget() // per_query))
    slot_pos = cache.pos[:n_used]
    blocks = []
    for a in range(0, n_q, block):
        b = min(n_q, a + block)
        q_pos = positions[a:b]
        # a block whose queries are all past the ring's reach needs only the global slots
        ring_reach = spec.n_local is None or q_pos[0] - spec.n_local < cache.length
        n_cache = n_used if ring_reach else min(n_used, spec.n_global)
        local, capped = lambda_mask(q_pos, slot_pos[:n_cache], spec)
        n_g = min(n_cache, spec.n_global)  # only the global slots can be capped
        capped_globals = xp.asarray(capped[:, :n_g]) if capped.any() else None
        lo = 0 if spec.n_local is None else max(0, a - spec.n_local + 1)
        chunk_local, _ = lambda_mask(q_pos, positions[lo:b], spec)
        bias_lo, bias = _bias(np.concatenate([local | capped, chunk_local], axis=1), xp)
        blocks.append(QueryBlock(a, b, n_cache, lo, bias_lo, bias, capped_globals))
    runs = parallel.split([(b.stop - b.start) * (b.n_cache + b.stop - b.chunk_lo)
                           for b in blocks], n_parts)
    return ChunkPlan(positions, blocks, [blocks[r.start:r.stop] for r in runs],
                     cache.write_plan(positions))


def exp_sums_in_range(z: np.ndarray) -> bool:
    """Whether every row's sum of exp(score), taken without the shift by the row's maximum,
    is in [EXP_SUM_MIN, EXP_SUM_MAX]. Then no exp overflowed, the largest term is a normal
    float (terms rounded to subnormals or zero weigh under 1e-25 of the sum), and the values
    times the weights stay finite: the softmax is the shifted one to float32 rounding, and the
    max and subtract passes over the scores are saved. A NaN fails the check."""
    return bool(((z >= EXP_SUM_MIN) & (z <= EXP_SUM_MAX)).all())


def attend(q: Array, q_capped: Array | None, k: Array, v: Array, cache: KVCache, layer: int,
           plan: ChunkPlan, work: Workspace, last_lse: Array | None = None) -> Array:
    """Attention output [C, n_heads * head_dim] for one layer.

    q:        [kv_heads, C, group, d]  queries rotated at their positions, pre-scaled by
              1/sqrt(d); query head h = kv_head * group + g
    q_capped: the same, rotated at the ceiling c, or None
    k, v:     [kv_heads, C, d] the chunk's keys (rotated) and values
    last_lse: [kv_heads, group] or None: receives the log-sum-exp of the last query's scores,
              so that more keys can join its softmax afterwards (top-k middle attention)

    A block's scores are one [kv_heads, block * group, cache slots | chunk keys] array in the
    workspace, so the mask, exp and sum each make one pass over both parts (on NumPy without
    the max and the shift by it while every row's sum allows: exp_sums_in_range).
    """
    xp = work.xp
    kv_heads, n_q, group, d = q.shape
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [kv_heads, d, slots], [kv_heads, slots, d]
    out = work.buffer("attention", (n_q, kv_heads, group, d), n_q)

    def fill(blk: QueryBlock, s: Array) -> None:  # the block's masked scores, in s
        a, b, lo, n = blk.start, blk.stop, blk.chunk_lo, blk.n_cache
        qb = q[:, a:b].reshape(kv_heads, (b - a) * group, d)              # rows: (query, group)
        xp.matmul(qb, k[:, lo:b].transpose(0, 2, 1), out=s[..., n:])
        if n:
            xp.matmul(qb, k_cache[..., :n], out=s[..., :n])
        s4 = s.reshape(kv_heads, b - a, group, s.shape[-1])              # masks are per query
        if blk.capped is not None:
            n_g = blk.capped.shape[1]
            qc = q_capped[:, a:b].reshape(kv_heads, (b - a) * group, d)
            s_cap = (qc @ cache.k_raw[layer][:, :n_g].transpose(0, 2, 1)).reshape(
                kv_heads, b - a, group, n_g)
            s4[..., :n_g] = xp.where(blk.capped[:, None], s_cap, s4[..., :n_g])
        if blk.bias is not None:
            s4[..., blk.bias_lo:blk.bias_lo + blk.bias.shape[1]] += blk.bias[:, None]

    def attend_blocks(worker: int, blocks: list[QueryBlock]) -> None:
        for blk in blocks:
            a, b, lo, n = blk.start, blk.stop, blk.chunk_lo, blk.n_cache
            rows, width = (b - a) * group, n + b - lo
            s = work.scores(kv_heads * rows * width, worker).reshape(kv_heads, rows, width)
            # softmax over [cache | chunk] keys; the 1/sum is applied to the output rows
            fill(blk, s)
            top = None
            if xp is np:  # (the check would make a GPU wait for every block)
                xp.exp(s, out=s)
                z = s.sum(axis=-1, keepdims=True)                          # [kv, rows, 1]
                if not exp_sums_in_range(z):
                    fill(blk, s)  # (rare) a row beyond exp's reach unshifted: scores again
                    top = s.max(axis=-1, keepdims=True)
            else:
                top = s.max(axis=-1, keepdims=True)
            if top is not None:
                s -= top
                xp.exp(s, out=s)
                z = s.sum(axis=-1, keepdims=True)
            if last_lse is not None and b == n_q:  # the last query's rows are the last group
                lse = xp.log(z) if top is None else top + xp.log(z)
                last_lse[...] = lse[:, -group:, 0]
            o = s[..., n:] @ v[:, lo:b]                                    # [kv, rows, d]
            if n:
                o += s[..., :n] @ v_cache[:, :n]
            o /= z
            out[a:b] = o.reshape(kv_heads, b - a, group, d).transpose(1, 0, 2, 3)

    parallel.run(attend_blocks, plan.parts)
    return out.reshape(n_q, kv_heads * group * d)
