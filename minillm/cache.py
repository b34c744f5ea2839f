"""The LM-Infinite KV cache: fixed global slots plus a ring of local slots, per layer.

Slot layout along the sequence axis of every layer's arrays:

    [ 0 .. n_global )                   the first n_global positions, kept forever
    [ n_global .. n_global + n_local )  a ring: position j >= n_global lives in slot
                                        n_global + (j - n_global) % n_local

Each slot remembers its absolute position (`pos`, shared by all layers); masks and capped
distances are derived from those positions, so the ring is never reordered. Keys are stored
rotated at their absolute positions and transposed, [head_dim, slots] per head, so that
q @ K is a plain GEMM that BLAS runs at full speed even for one query; the global keys are
also kept un-rotated for the distance ceiling. `n_local=None` is the unbounded `full`
preset: the arrays grow (doubling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import parallel
from .config import Config

EMPTY = np.iinfo(np.int64).max  # position of an unused slot: in the future of every query
FULL_INITIAL_SLOTS = 1024
# attention scores of one query block, [heads, block, keys] float32: small enough to stay in
# cache while the softmax passes over it, large enough to keep the GEMMs efficient
SCORE_BUDGET_BYTES = 4 << 20
TYPICAL_CHUNK = 512  # per-chunk buffers are first made large enough for chunks of this size


@dataclass(frozen=True)
class AttentionSpec:
    """Which keys a query sees: see DESIGN.md §1."""
    preset: str
    n_global: int
    n_local: int | None   # None: unbounded (full attention)
    ceiling: int | None   # None: no capped-distance branch

    @property
    def bounded(self) -> bool:
        return self.n_local is not None


PRESETS = ("lminfinite", "window", "full")


def attention_spec(cfg: Config, attention: str = "lminfinite", n_global: int | None = None,
                   n_local: int | None = None, ceiling: int | None = None) -> AttentionSpec:
    """Resolve a preset and its overrides into an AttentionSpec (ValueError on bad values)."""
    if attention not in PRESETS:
        raise ValueError(f"unknown attention preset {attention!r} (choose from {', '.join(PRESETS)})")
    if attention == "full":
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
    n_global = 10 if n_global is None else int(n_global)
    ceiling = n_local if ceiling is None else int(ceiling)
    if not 0 <= n_global <= n_local:
        raise ValueError(f"n_global must be between 0 and n_local ({n_local}), got {n_global}")
    if ceiling < 0:
        raise ValueError(f"ceiling must be non-negative (got {ceiling})")
    return AttentionSpec("lminfinite", n_global, n_local, ceiling)


@dataclass(frozen=True)
class WritePlan:
    """Where a chunk's keys go; indices as slices where they run contiguously (the usual
    case: a plain copy), else index arrays on the backend; positions on the host."""
    positions: np.ndarray     # positions kept (host)
    host_slots: np.ndarray    # their slots (host)
    rows: object              # chunk rows kept
    slots: object
    global_rows: object       # rows/slots below n_global, also stored un-rotated
    global_slots: object
    n_global_rows: int


def _index(idx: np.ndarray, xp):
    """idx as a slice when it counts up by one, else as a backend array."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return xp.asarray(idx)


class KVCache:
    def __init__(self, cfg: Config, spec: AttentionSpec, xp):
        self.spec, self.xp = spec, xp
        n_slots = spec.n_global + spec.n_local if spec.bounded else FULL_INITIAL_SLOTS
        shape = (cfg.num_hidden_layers, cfg.n_kv_heads, n_slots, cfg.head_dim)
        self.k = xp.zeros(shape[:2] + (cfg.head_dim, n_slots), dtype=xp.float32)  # rotated, K^T
        self.v = xp.zeros(shape, dtype=xp.float32)
        raw_shape = (cfg.num_hidden_layers, cfg.n_kv_heads, spec.n_global, cfg.head_dim)
        self.k_raw = xp.zeros(raw_shape, dtype=xp.float32)  # un-rotated global keys
        self.pos = np.full(n_slots, EMPTY, dtype=np.int64)
        self.length = 0  # positions written so far
        # attention scores, one buffer per worker thread (parallel), reused by every layer;
        # all made up front so that nothing grows mid-stream
        workers = parallel.workers() if xp is np else 1
        self._scratch = [xp.empty(SCORE_BUDGET_BYTES // 4, dtype=xp.float32)
                         for _ in range(workers)]
        self._buffers = {}  # a chunk's per-layer temporaries, reused by every layer and chunk

    @property
    def n_slots(self) -> int:
        return self.pos.shape[0]

    @property
    def n_used(self) -> int:
        """Slots [0, n_used) hold data: global and ring slots fill in order until the ring wraps."""
        return min(self.length, self.n_slots)

    @property
    def nbytes(self) -> int:
        temporaries = list(self._scratch) + list(self._buffers.values())
        return int(self.k.nbytes + self.v.nbytes + self.k_raw.nbytes + self.pos.nbytes
                   + sum(a.nbytes for a in temporaries))

    def scratch(self, n: int, worker: int = 0):
        """Worker's flat float32 buffer of exactly n elements, grown (never shrunk) as needed.

        Query blocks are sized to SCORE_BUDGET_BYTES, so it outgrows that only when a single
        query's scores are larger (the unbounded `full` preset on a very long stream).
        """
        while len(self._scratch) <= worker:
            self._scratch.append(self.xp.empty(SCORE_BUDGET_BYTES // 4, dtype=self.xp.float32))
        if self._scratch[worker].size < n:
            self._scratch[worker] = self.xp.empty(n, dtype=self.xp.float32)
        return self._scratch[worker][:n]

    def buffer(self, name: str, shape: tuple[int, ...], n_q: int):
        """A float32 array of `shape` kept under `name` and reused: a chunk's temporaries have
        the same shapes in every layer, so they cost no allocation (and no page faults) after
        the first. n_q is the chunk length in `shape`: the buffer is made large enough for
        TYPICAL_CHUNK tokens at once, so it only grows for larger chunks. The contents are
        the caller's to overwrite."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < n:
            size = max(n, n // max(n_q, 1) * TYPICAL_CHUNK)
            buf = self._buffers[name] = self.xp.empty(size, dtype=self.xp.float32)
        return buf[:n].reshape(shape)

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        g, n = self.spec.n_global, self.spec.n_local
        if n is None:
            return positions
        return np.where(positions < g, positions, g + (positions - g) % n)

    def reserve(self, end: int) -> None:
        """Unbounded cache only: grow (doubling) so that positions < end fit."""
        if self.spec.bounded or end <= self.n_slots:
            return
        size = max(end, 2 * self.n_slots)
        xp, old = self.xp, self.n_slots
        k = xp.zeros(self.k.shape[:3] + (size,), dtype=self.k.dtype)
        k[..., :old] = self.k
        v = xp.zeros(self.v.shape[:2] + (size,) + self.v.shape[3:], dtype=self.v.dtype)
        v[:, :, :old] = self.v
        self.k, self.v = k, v
        self.pos = np.concatenate([self.pos, np.full(size - old, EMPTY, dtype=np.int64)])

    def write_plan(self, positions: np.ndarray) -> "WritePlan":
        """Which chunk rows go to which slots: all global positions, and the newest ring ones."""
        slots = self.slot_of(positions)
        keep = np.ones(len(positions), dtype=bool)
        if self.spec.bounded:
            ring = np.flatnonzero(positions >= self.spec.n_global)
            keep[ring[:-self.spec.n_local]] = False  # overwritten within this chunk anyway
        rows = np.flatnonzero(keep)
        glob = positions[rows] < self.spec.n_global
        xp = self.xp
        return WritePlan(positions[rows], slots[rows], _index(rows, xp), _index(slots[rows], xp),
                         _index(rows[glob], xp), _index(slots[rows][glob], xp), int(glob.sum()))

    def write(self, layer: int, plan: "WritePlan", k_rot, k_raw, v) -> None:
        """Store one layer's chunk keys/values ([kv_heads, C, head_dim]) in their slots."""
        self.k[layer][:, :, plan.slots] = k_rot[:, plan.rows].transpose(0, 2, 1)
        self.v[layer][:, plan.slots] = v[:, plan.rows]
        if plan.n_global_rows:
            self.k_raw[layer][:, plan.global_slots] = k_raw[:, plan.global_rows]

    def commit(self, plan: "WritePlan") -> None:
        """After all layers have written: the slots now hold these positions."""
        self.pos[plan.host_slots] = plan.positions
        self.length = int(plan.positions.max()) + 1

    def reset(self) -> None:
        self.pos[:] = EMPTY
        self.length = 0
