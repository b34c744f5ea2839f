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

from dataclasses import dataclass

import numpy as np

from .backend import Array, to_device, to_host
from .config import Config

EMPTY = np.iinfo(np.int64).max  # position of an unused slot: in the future of every query
FULL_INITIAL_SLOTS = 1024


@dataclass(frozen=True)
class WritePlan:
    """Where a chunk's keys go; indices as slices where they run contiguously (the usual
    case: a plain copy), else index arrays on the backend; positions on the host."""
    positions: np.ndarray     # positions kept (host)
    host_slots: np.ndarray    # their slots (host)
    rows: slice | Array       # chunk rows kept
    slots: slice | Array
    global_rows: slice | Array  # rows/slots below n_global, also stored un-rotated
    global_slots: slice | Array
    n_global_rows: int


def _index(idx: np.ndarray, xp):
    """idx as a slice when it counts up by one, else as a backend array."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return xp.asarray(idx)


class KVCache:
    """Per layer: keys (rotated, transposed), values, un-rotated global keys; slot positions.

    n_local=None is the unbounded `full` preset: the arrays grow (doubling) as positions come.
    """

    def __init__(self, cfg: Config, n_global: int, n_local: int | None, xp):
        self.n_global, self.n_local, self.xp = n_global, n_local, xp
        n_slots = n_global + n_local if n_local is not None else FULL_INITIAL_SLOTS
        layers, kv_heads, d = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
        self.k = xp.zeros((layers, kv_heads, d, n_slots), dtype=xp.float32)   # rotated, K^T
        self.v = xp.zeros((layers, kv_heads, n_slots, d), dtype=xp.float32)
        self.k_raw = xp.zeros((layers, kv_heads, n_global, d), dtype=xp.float32)  # un-rotated
        self.pos = np.full(n_slots, EMPTY, dtype=np.int64)
        self.length = 0  # positions written so far

    @property
    def bounded(self) -> bool:
        return self.n_local is not None

    @property
    def n_slots(self) -> int:
        return self.pos.shape[0]

    @property
    def n_used(self) -> int:
        """Slots [0, n_used) hold data: global and ring slots fill in order until the ring wraps."""
        return min(self.length, self.n_slots)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes + self.k_raw.nbytes + self.pos.nbytes)

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        g, n = self.n_global, self.n_local
        if n is None:
            return positions
        return np.where(positions < g, positions, g + (positions - g) % n)

    def reserve(self, end: int) -> None:
        """Unbounded cache only: grow (doubling) so that positions < end fit."""
        if self.bounded or end <= self.n_slots:
            return
        size = max(end, 2 * self.n_slots)
        xp, old = self.xp, self.n_slots
        k = xp.zeros(self.k.shape[:3] + (size,), dtype=self.k.dtype)
        k[..., :old] = self.k
        v = xp.zeros(self.v.shape[:2] + (size,) + self.v.shape[3:], dtype=self.v.dtype)
        v[:, :, :old] = self.v
        self.k, self.v = k, v
        self.pos = np.concatenate([self.pos, np.full(size - old, EMPTY, dtype=np.int64)])

    def write_plan(self, positions: np.ndarray) -> WritePlan:
        """Which chunk rows go to which slots: all global positions, and the newest ring ones."""
        slots = self.slot_of(positions)
        keep = np.ones(len(positions), dtype=bool)
        if self.bounded:
            ring = np.flatnonzero(positions >= self.n_global)
            keep[ring[:-self.n_local]] = False  # overwritten within this chunk anyway
        rows = np.flatnonzero(keep)
        glob = positions[rows] < self.n_global
        xp = self.xp
        return WritePlan(positions[rows], slots[rows], _index(rows, xp), _index(slots[rows], xp),
                         _index(rows[glob], xp), _index(slots[rows][glob], xp), int(glob.sum()))

    def write(self, layer: int, plan: WritePlan, k_rot: Array, k_raw: Array, v: Array) -> None:
        """Store one layer's chunk keys/values ([kv_heads, C, head_dim]) in their slots."""
        self.k[layer][:, :, plan.slots] = k_rot[:, plan.rows].transpose(0, 2, 1)
        self.v[layer][:, plan.slots] = v[:, plan.rows]
        if plan.n_global_rows:
            self.k_raw[layer][:, plan.global_slots] = k_raw[:, plan.global_rows]

    def commit(self, plan: WritePlan) -> None:
        """After all layers have written: the slots now hold these positions."""
        self.pos[plan.host_slots] = plan.positions
        self.length = int(plan.positions.max()) + 1

    def reset(self) -> None:
        self.pos[:] = EMPTY
        self.length = 0

    def used_slots(self) -> dict[str, np.ndarray]:
        """Host copies of the slots in use, keys as [layers, kv_heads, slots, d] (checkpoints)."""
        n = self.n_used
        return {"k": to_host(self.k[..., :n]).swapaxes(2, 3), "v": to_host(self.v[:, :, :n]),
                "k_raw": to_host(self.k_raw), "pos": self.pos[:n].copy()}

    def restore(self, k: np.ndarray, v: np.ndarray, k_raw: np.ndarray, pos: np.ndarray,
                length: int) -> None:
        """Refill the cache from used_slots() arrays and the position after them."""
        n = len(pos)
        self.reserve(n)
        self.k[..., :n] = to_device(self.xp, k).swapaxes(2, 3)
        self.v[:, :, :n] = to_device(self.xp, v)
        self.k_raw[...] = to_device(self.xp, k_raw)
        self.pos[:] = EMPTY
        self.pos[:n] = pos
        self.length = int(length)
