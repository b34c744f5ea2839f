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
import mmap
from dataclasses import dataclass

import numpy as np

from . import hostmem, parallel
from .backend import Array, to_device, to_host
from .config import Config
from .errors import MiniLLMError
from .workspace import NLL_ROWS, TYPICAL_CHUNK, score_budget

EMPTY = np.iinfo(np.int64).max  # position of an unused slot: in the future of every query
FULL_INITIAL_SLOTS = 1024
SMALL_PAGES_FROM = 4 << 20  # bytes: smaller arrays are never given huge pages anyway


def cache_shapes(cfg: Config, n_global: int, n_local: int | None) -> dict[str, tuple[int, ...]]:
    """The float32 arrays of a KVCache (n_local=None: the unbounded cache's first size)."""
    n_slots = n_global + n_local if n_local is not None else FULL_INITIAL_SLOTS
    layers, kv_heads, d = cfg.num_hidden_layers, cfg.n_kv_heads, cfg.head_dim
    return {"k": (layers, kv_heads, d, n_slots),            # rotated, K^T
            "v": (layers, kv_heads, n_slots, d),
            "k_raw": (layers, kv_heads, n_global, d)}       # un-rotated global keys


def cache_bytes(cfg: Config, n_global: int, n_local: int | None) -> int:
    """Bytes a KVCache allocates: its float32 arrays and the slots' int64 positions."""
    shapes = cache_shapes(cfg, n_global, n_local)
    return 4 * sum(math.prod(s) for s in shapes.values()) + 8 * shapes["k"][-1]


def workspace_bytes(cfg: Config, n_global: int, xp=np) -> int:
    """About what a session's Workspace grows to for chunks of up to TYPICAL_CHUNK tokens: the
    score buffers, the logits rows of scoring, one chunk's activations (model.Chunk and the
    attention output) and its keys and values of every layer, staged until they are committed."""
    d, h, kv, f = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size
    staged = 2 * cfg.num_hidden_layers * kv * d  # floats per token
    per_token = 4 * cfg.hidden_size + (3 * h + 2 * kv) * d + 3 * f + staged
    staged_globals = cfg.num_hidden_layers * kv * n_global * d  # un-rotated, at most n_global
    scores = (parallel.workers() if xp is np else 1) * score_budget()
    return scores + 4 * (NLL_ROWS * cfg.vocab_size + TYPICAL_CHUNK * per_token + staged_globals)


def session_bytes(cfg: Config, n_global: int, n_local: int | None, xp=np,
                  middle_layers: int = 0) -> int:
    """The memory a new session takes: its cache and its workspace (`minillm info` reports it
    too). The unbounded `full` preset grows past this. middle_layers: the layers top-k middle
    attention stores (their un-rotated keys are staged too; the store itself is on disk)."""
    staged_middle = 4 * TYPICAL_CHUNK * middle_layers * cfg.n_kv_heads * cfg.head_dim
    return cache_bytes(cfg, n_global, n_local) + workspace_bytes(cfg, n_global, xp) + \
        staged_middle


def available_bytes(xp=np) -> int | None:
    """Memory a new session may still take: the GPU's free memory with CuPy (plus what CuPy's
    pool holds unused), else the host's (MemAvailable, within a container's cgroup limit:
    minillm.hostmem); None where it is not known."""
    if xp is not np:
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(free) + int(xp.get_default_memory_pool().free_bytes())
    return hostmem.available_bytes()


def check_memory(need: int, xp=np) -> None:
    """Refuse, before allocating, a session larger than the memory available."""
    have = available_bytes(xp)
    if have is not None and need > have:
        raise out_of_memory(need, have, xp)


def out_of_memory(need: int, have: int | None, xp=np) -> MiniLLMError:
    where = "GPU memory" if xp is not np else "memory"
    short = (f"only {have / 1e9:,.2f} GB is available" if have is not None
             else "it could not be allocated")
    return MiniLLMError(f"the session needs {need / 1e9:,.2f} GB of {where} for its cache and "
                        f"workspace, but {short}; choose a smaller n_local (or a bounded "
                        f"attention preset)")


def zeros(shape: tuple[int, ...], xp) -> Array:
    """A zeroed float32 cache array. On the host, a large one is an anonymous mapping in 4 KB
    pages: a chunk's first slots lie in every row of the keys' [head_dim, slots] layout (and
    in every [slots, head_dim] block of the values), so in the huge pages NumPy asks for,
    a new session's first chunk had the kernel zero the whole cache (378 MB for SmolLM2's 8K
    window, over 100 ms on a 512-token chunk); in small pages only the pages written are."""
    n_bytes = 4 * math.prod(shape)
    if xp is not np or n_bytes < SMALL_PAGES_FROM or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return xp.zeros(shape, dtype=xp.float32)
    try:
        pages = mmap.mmap(-1, n_bytes)  # zero-filled, faulted in page by page as it is written
    except OSError as e:  # (ENOMEM under an address-space limit) as NumPy would report it
        raise MemoryError(f"cannot map {n_bytes:,} bytes: {e.strerror}") from None
    pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype=np.float32).reshape(shape)


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


@dataclass(frozen=True)
class StagedChunk:
    """A chunk's keys and values of every layer, held outside the cache until `commit`, so
    that a chunk abandoned halfway (an exception, Ctrl-C) leaves the cache as it was.
    Workspace buffers, reused by every chunk."""
    k: Array             # [layers, kv_heads, C, head_dim] rotated
    v: Array             # [layers, kv_heads, C, head_dim]
    k_raw: Array | None  # [layers, kv_heads, global rows, head_dim] un-rotated; None: no such rows


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
        shapes = cache_shapes(cfg, n_global, n_local)  # also what session_bytes counts
        self.k = zeros(shapes["k"], xp)
        self.v = zeros(shapes["v"], xp)
        self.k_raw = zeros(shapes["k_raw"], xp)
        self.pos = np.full(shapes["k"][-1], EMPTY, dtype=np.int64)
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
        need = (self.k.nbytes + self.v.nbytes) // old * size
        check_memory(need, xp)  # the `full` preset outgrowing memory: one line, not a crash
        try:
            k = zeros(self.k.shape[:3] + (size,), xp)
            v = zeros(self.v.shape[:2] + (size,) + self.v.shape[3:], xp)
        except MemoryError:
            raise out_of_memory(need, available_bytes(xp), xp) from None
        k[..., :old] = self.k
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

    def commit(self, plan: WritePlan, staged: StagedChunk) -> None:
        """Store a chunk's keys and values of every layer in their slots and record their
        positions: the one step of a chunk that changes the cache (a few copies)."""
        end = int(plan.positions.max()) + 1
        self.reserve(end)  # the unbounded cache grows only here, so an abandoned chunk leaves it
        self.k[..., plan.slots] = staged.k[:, :, plan.rows].transpose(0, 1, 3, 2)
        self.v[:, :, plan.slots] = staged.v[:, :, plan.rows]
        if plan.n_global_rows:
            self.k_raw[:, :, plan.global_slots] = staged.k_raw
        self.pos[plan.host_slots] = plan.positions
        self.length = end

    def reset(self) -> None:
        self.pos[:] = EMPTY
        self.length = 0

    def mark(self, n_tokens: int) -> dict:
        """Host copies of what feeding the next n_tokens positions overwrites (their slots as
        they are now, and the length): rewind() puts them back, bit for bit."""
        ahead = np.arange(self.length, self.length + n_tokens, dtype=np.int64)
        slots = np.unique(self.slot_of(ahead))
        slots = slots[slots < self.n_slots]  # the unbounded cache's slots beyond are unused
        return {"length": self.length, "n_slots": self.n_slots, "slots": slots,
                "k": to_host(self.k[..., slots]).copy(), "v": to_host(self.v[:, :, slots]).copy(),
                "k_raw": to_host(self.k_raw).copy(), "pos": self.pos[slots].copy(),
                "end": self.length + n_tokens}

    def rewind(self, mark: dict) -> None:
        """Back to mark(n) after feeding at most n tokens."""
        if self.length > mark["end"] or self.length < mark["length"]:
            raise ValueError(f"the cache moved from {mark['length']} to {self.length}: more "
                             f"than the {mark['end'] - mark['length']} tokens its mark covers")
        slots = mark["slots"]
        self.k[..., slots] = to_device(self.xp, mark["k"])
        self.v[:, :, slots] = to_device(self.xp, mark["v"])
        self.k_raw[...] = to_device(self.xp, mark["k_raw"])
        self.pos[slots] = mark["pos"]
        self.pos[mark["n_slots"]:] = EMPTY  # slots the unbounded cache grew since
        self.length = mark["length"]

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
