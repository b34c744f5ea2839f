"""Top-k middle attention: LM-Infinite's optional recall of the middle, with the middle on disk.

The middle of a query at position i is every key j with n_global <= j <= i - n_local: the
keys the Λ mask hides. With top-k on, in the layers from `top_k_from_layer` up, the last
token of each `feed` call also attends to the k middle keys with the highest score
<R(insert_at) q, k_j> / sqrt(d) (q rotated to the insert distance, k_j un-rotated), chosen
per query head from its key/value head's keys, scored at that value in the same softmax as
the global and local keys. A middle of fewer than k keys means no top-k for that query.

Every committed token's un-rotated keys and values of those layers go to a store on disk
(`MiddleStore`), one file per layer and kind, token-major ([tokens, kv_heads, head_dim]):

    k<m>, v<m>   keys and values of stored layer m, float16 (or float32)
    b<m>         per block of BLOCK tokens: element-wise min and max of its keys [2, kv, d]
    s<m>         per superblock of SUPERBLOCK blocks: the same over the superblock

Files grow by appending (os.pwrite at the end); reads are os.pread of the blocks a search
visits, so nothing of the store stays mapped or resident: the process holds only the bounds
of the newest block and superblock per layer.

The search is exact. For a query q (rotated, scaled) a box [lo, hi] bounds every key in it:
<q, k> <= sum_i max(q_i lo_i, q_i hi_i). Scores and bounds are float64 sums of exact
products (a float16 or float32 key times a float32 query is exact in float64), summed in the
same order, so a bound is never below a score it covers. Superblocks and blocks are visited
from the highest bound down; the search stops when, for every head, the k-th best score so
far is above every bound not yet opened. Ties are ordered by score, then lower position.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import numpy as np

from .backend import Array, to_host
from .config import Config, is_int
from .errors import MiniLLMError, WriteError
from .files import process_alive
from .rope import apply_rope, cos_sin

BLOCK = 64          # tokens per block of bounds
SUPERBLOCK = 64     # blocks per superblock (4,096 tokens)
DTYPES = {"float16": np.float16, "float32": np.float32}
STORE_PREFIX = "minillm-middle-"
DEFAULT_FROM_LAYER = 4  # the official code's first top-k layer (zero-based)
BOUND_SLACK = 1e-12     # relative: far above float64 rounding of a head_dim-term sum
FILTER_SLACK = 1e-5     # relative: above float32 rounding of a head_dim-term dot product


@dataclass(frozen=True)
class TopK:
    """Top-k middle settings: k keys per query head, in layers >= from_layer, scored with the
    query rotated to insert_at."""
    k: int
    from_layer: int
    insert_at: int


def top_k_settings(cfg: Config, spec, k=0, from_layer=DEFAULT_FROM_LAYER,
                   insert_at=None) -> TopK | None:
    """Check the top-k options (TypeError on a wrong type, ValueError out of range); None when
    top-k is off (k == 0)."""
    for name, value in (("top_k_middle", k), ("top_k_from_layer", from_layer),
                        ("top_k_insert_at", insert_at)):
        if value is not None and not is_int(value):
            raise TypeError(f"{name} must be an int (got {type(value).__name__} {value!r})")
    if k is None or k < 0:
        raise ValueError(f"top_k_middle must be 0 (off) or more (got {k})")
    if from_layer is None or from_layer < 0:
        raise ValueError(f"top_k_from_layer must be 0 or more (got {from_layer})")
    if insert_at is not None and insert_at < 0:
        raise ValueError(f"top_k_insert_at must be 0 or more (got {insert_at})")
    if k == 0:
        return None
    if not spec.bounded:
        raise ValueError("top_k_middle needs a bounded attention preset (lminfinite or window): "
                         "the full preset has no middle")
    if from_layer >= cfg.num_hidden_layers:
        raise ValueError(f"top_k_from_layer must be below the model's {cfg.num_hidden_layers} "
                         f"layers (got {from_layer})")
    insert_at = cfg.max_position_embeddings // 2 if insert_at is None else int(insert_at)
    return TopK(int(k), int(from_layer), insert_at)


def store_bytes_per_token(cfg: Config, from_layer: int = DEFAULT_FROM_LAYER,
                          dtype: str = "float16") -> float:
    """Disk bytes a token adds to the store: keys and values of the stored layers, plus their
    share of the block and superblock bounds."""
    layers = max(cfg.num_hidden_layers - from_layer, 0)
    row = layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(DTYPES[dtype]).itemsize
    return row * (2 + 2 / BLOCK + 2 / (BLOCK * SUPERBLOCK))


# --- the store's folder: removed by close(), garbage collection and the interpreter's exit ----

def remove_stale_stores(parent: str) -> None:
    """Remove the stores that killed processes (SIGKILL, a power cut) left in `parent`."""
    for path in glob.glob(os.path.join(glob.escape(parent), STORE_PREFIX + "*")):
        pid = os.path.basename(path)[len(STORE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _make_folder(directory: str | os.PathLike | None) -> str:
    parent = tempfile.gettempdir() if directory is None else os.fspath(directory)
    if not os.path.isdir(parent):
        raise MiniLLMError(f"middle_dir {parent}: not a directory")
    remove_stale_stores(parent)
    try:
        return tempfile.mkdtemp(prefix=f"{STORE_PREFIX}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise WriteError(f"cannot create the middle store in {parent} ({e.strerror or e})") \
            from None


def _remove(fds: list[int], path: str) -> None:
    """The finalizer: close the files, remove the folder (it holds only the store)."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
    shutil.rmtree(path, ignore_errors=True)


def _pread(fd: int, offset: int, nbytes: int) -> bytes:
    parts = []
    while nbytes > 0:
        part = os.pread(fd, nbytes, offset)
        if not part:
            raise MiniLLMError("the middle store is shorter than its index (was it changed "
                               "from outside?)")
        parts.append(part)
        offset, nbytes = offset + len(part), nbytes - len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _box_bounds(boxes: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For boxes [n, 2, kv, d] (min, max) and queries q [kv, group, d] float64: upper bounds
    [n, H] of <q_h, k> over the keys k inside each box, and the magnitudes [n, H], bounds of
    sum_i |q_i k_i| (the scale of a score's rounding error)."""
    lo = boxes[:, 0, :, None, :].astype(np.float64)              # [n, kv, 1, d]
    hi = boxes[:, 1, :, None, :].astype(np.float64)
    lo_q, hi_q = lo * q, hi * q                                   # [n, kv, group, d]
    terms = np.maximum(lo_q, hi_q)
    magnitude = np.maximum(np.abs(lo_q), np.abs(hi_q)).sum(axis=-1).reshape(len(boxes), -1)
    return terms.sum(axis=-1).reshape(len(boxes), -1) + BOUND_SLACK * magnitude, magnitude


def exact_scores(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The scores that rank keys, by definition: [H, n] for keys [n, kv, d] (stored dtype) and
    q [kv, group, d] float64 (head h = kv_head * group + g): float64 sums of exact products,
    each row summed alone (so a key has the same score in any batch of rows)."""
    k = keys[:, :, None, :].astype(np.float64)                   # [n, kv, 1, d]
    return (k * q).sum(axis=-1).reshape(len(keys), -1).T


def _pair_scores(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """exact_scores for (key row, query row) pairs: keys [P, d] stored dtype, q [P, d] float64
    (the same per-row sums)."""
    return (keys.astype(np.float64) * q).sum(axis=-1)


@dataclass
class SearchStats:
    """How much of the middle the bounds pruned: blocks in the middles searched, blocks read."""
    searches: int = 0
    blocks: int = 0
    visited: int = 0

    @property
    def pruned_share(self) -> float | None:
        return 1 - self.visited / self.blocks if self.blocks else None


class MiddleStore:
    """Un-rotated keys and values of `n_layers` layers for every position 0, 1, ... appended,
    on disk in a folder of its own (made in `directory`, default the temporary folder); the
    folder is removed by close(), when the store is garbage collected, or at the interpreter's
    exit (so on Ctrl-C and on a SIGTERM that the program turns into an exit)."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int,
                 directory: str | os.PathLike | None = None, dtype: str = "float16",
                 block: int = BLOCK, superblock: int = SUPERBLOCK):
        if dtype not in DTYPES:
            raise ValueError(f"middle_dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.block, self.superblock = block, superblock  # tokens per block, blocks per superblock
        self.dtype = np.dtype(DTYPES[dtype])
        self.path = _make_folder(directory)
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _remove, self._fds, self.path)
        try:
            self._files = {kind: [self._open(f"{kind}{m}") for m in range(n_layers)]
                           for kind in "kvbs"}
        except OSError as e:
            self.close()
            raise WriteError(f"cannot create the middle store in {self.path} "
                             f"({e.strerror or e})") from None
        self.row_bytes = kv_heads * head_dim * self.dtype.itemsize      # one token, one layer
        self.box_bytes = 2 * self.row_bytes                               # a min/max record
        shape = (n_layers, 2, kv_heads, head_dim)
        self._block_box = np.empty(shape, self.dtype)  # the newest block's bounds, per layer
        self._super_box = np.empty(shape, self.dtype)  # the newest superblock's
        self.length = 0
        self.stats = SearchStats()

    def _open(self, name: str) -> int:
        fd = os.open(os.path.join(self.path, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._fds.append(fd)
        return fd

    # -- life ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the store (its files and folder); further use is an error."""
        self._finalizer()

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the newest block's and superblock's bounds)."""
        return int(self._block_box.nbytes + self._super_box.nbytes)

    def disk_bytes(self) -> int:
        """Bytes the store's files take on disk."""
        if self.closed:
            return 0
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds)

    def reset(self) -> None:
        """Empty the store (the files are cut to nothing)."""
        self._check_open()
        for fd in self._fds:
            os.ftruncate(fd, 0)
        self.length = 0

    def mark(self) -> tuple:
        """What rewind() needs to take the store back to its present length."""
        return self.length, self._block_box.copy(), self._super_box.copy()

    def rewind(self, mark: tuple) -> None:
        """Back to a mark(): later appends are forgotten (their bytes are overwritten by the
        next appends; a bound record they touched stays a valid, looser bound until then)."""
        self.length, block_box, super_box = mark
        self._block_box[...], self._super_box[...] = block_box, super_box

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("the middle store is closed (the session was closed)")

    # -- writing -------------------------------------------------------------------------
    def append(self, keys: Array, values: Array) -> None:
        """Append C tokens: keys (un-rotated) and values [n_layers, kv_heads, C, head_dim]."""
        self._check_open()
        k = np.ascontiguousarray(to_host(keys).transpose(0, 2, 1, 3), dtype=self.dtype)
        v = np.ascontiguousarray(to_host(values).transpose(0, 2, 1, 3), dtype=self.dtype)
        start, n = self.length, k.shape[1]
        if not n:
            return
        blocks, block_box = self._boxes(k, start, self.block, self._block_box)
        b0 = start // self.block
        supers, super_box = self._boxes(blocks, b0, self.superblock, self._super_box,
                                        first_partial=start % (self.block * self.superblock) != 0)
        s0 = b0 // self.superblock
        try:
            for m in range(self.n_layers):
                _pwrite(self._files["k"][m], k[m], start * self.row_bytes)
                _pwrite(self._files["v"][m], v[m], start * self.row_bytes)
                _pwrite(self._files["b"][m], blocks[m], b0 * self.box_bytes)
                _pwrite(self._files["s"][m], supers[m], s0 * self.box_bytes)
        except OSError as e:
            raise WriteError(f"cannot write the middle store in {self.path} "
                             f"({e.strerror or e})") from None
        self._block_box[...], self._super_box[...] = block_box, super_box
        self.length = start + n

    @staticmethod
    def _boxes(rows: np.ndarray, start: int, size: int, open_box: np.ndarray,
               first_partial: bool | None = None):
        """Min/max boxes of rows [layers, n, ...] (rows `start`, start + 1, ...) grouped by
        `size`: rows that are themselves boxes [layers, n, 2, ...] merge both halves. The first
        group merges open_box (the bounds so far) when it was begun before. Returns the boxes
        [layers, groups, 2, kv, d] and the last group's box."""
        n = rows.shape[1]
        cuts = np.arange(-(start % size), n, size)
        cuts[0] = 0
        if rows.ndim == 5:  # boxes of boxes
            lo = np.minimum.reduceat(rows[:, :, 0], cuts, axis=1)
            hi = np.maximum.reduceat(rows[:, :, 1], cuts, axis=1)
        else:
            lo = np.minimum.reduceat(rows, cuts, axis=1)
            hi = np.maximum.reduceat(rows, cuts, axis=1)
        begun_before = start % size != 0 if first_partial is None else first_partial
        if begun_before:
            np.minimum(lo[:, 0], open_box[:, 0], out=lo[:, 0])
            np.maximum(hi[:, 0], open_box[:, 1], out=hi[:, 0])
        boxes = np.stack([lo, hi], axis=2)
        return boxes, boxes[:, -1]

    # -- reading -------------------------------------------------------------------------
    def _read(self, kind: str, layer: int, first: int, stop: int, record: int,
              shape: tuple) -> np.ndarray:
        raw = _pread(self._files[kind][layer], first * record, (stop - first) * record)
        return np.frombuffer(raw, dtype=self.dtype).reshape((stop - first,) + shape)

    def keys(self, layer: int, first: int, stop: int) -> np.ndarray:
        """Keys of positions [first, stop): [n, kv_heads, head_dim], stored dtype."""
        return self._read("k", layer, first, stop, self.row_bytes, (self.kv_heads, self.head_dim))

    def _box_records(self, kind: str, layer: int, first: int, stop: int) -> np.ndarray:
        return self._read(kind, layer, first, stop, self.box_bytes,
                          (2, self.kv_heads, self.head_dim))

    def values(self, layer: int, positions: np.ndarray, group: int) -> np.ndarray:
        """Values [H, k, head_dim] float32 of positions [H, k] (head h reads kv head
        h // group)."""
        unique = np.unique(positions)
        fd = self._files["v"][layer]
        rows = np.stack([np.frombuffer(_pread(fd, int(p) * self.row_bytes, self.row_bytes),
                                       dtype=self.dtype) for p in unique])
        rows = rows.reshape(len(unique), self.kv_heads, self.head_dim)
        kv_of_head = np.arange(len(positions)) // group
        return rows[np.searchsorted(unique, positions), kv_of_head[:, None]].astype(np.float32)

    def search(self, layer: int, q: np.ndarray, first: int, last: int,
               k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact top k of positions [first, last] for each query head: (float64 scores,
        positions), each [H, k], best first (equal scores: lower position first). q [kv_heads,
        group, d] float32: rotated and scaled queries, head h = kv_head * group + g. None when
        the range holds fewer than k keys."""
        self._check_open()
        if last - first + 1 < k:
            return None
        if last >= self.length:
            raise MiniLLMError(f"the middle store holds {self.length} positions; "
                               f"position {last} was asked for")
        return _Search(self, layer, np.asarray(q, dtype=np.float32), first, last, k).run()


class _Search:
    """One exact top-k search (see the module docstring): superblocks and blocks are opened
    from the highest bound down, a few blocks at a time.

    A visited block's keys are first scored with one float32 matrix product, whose error is
    below FILTER_SLACK times the key's magnitude bound; only keys that can still enter a
    head's top k by that margin are scored by definition (exact_scores) and ranked."""

    def __init__(self, store: MiddleStore, layer: int, q: np.ndarray, first: int, last: int,
                 k: int):
        self.store, self.layer, self.k = store, layer, k
        self.q32, self.q = q, q.astype(np.float64)                 # [kv, group, d]
        self.q_rows = self.q.reshape(-1, q.shape[-1])              # [H, d]
        self.n_heads, self.group = self.q_rows.shape[0], q.shape[1]
        self.first, self.last = first, last
        self.block, self.superblock = store.block, store.superblock
        self.b_first, self.b_last = first // self.block, last // self.block
        s_first, s_last = self.b_first // self.superblock, self.b_last // self.superblock
        boxes = store._box_records("s", layer, s_first, s_last + 1)
        self.super_ids = np.arange(s_first, s_last + 1)
        self.super_bound = _box_bounds(boxes, self.q)[0]            # [n_super, H]
        self.super_open = np.ones(len(self.super_ids), dtype=bool)
        self.block_ids = np.empty(0, dtype=np.int64)
        self.block_bound = np.empty((0, self.n_heads))
        self.block_magnitude = np.empty((0, self.n_heads))
        self.block_open = np.empty(0, dtype=bool)
        self.best = np.empty((self.n_heads, 0))                     # [H, <= k], best first
        self.best_pos = np.empty((self.n_heads, 0), dtype=np.int64)
        self.visited = self.keys_seen = 0

    @property
    def full(self) -> bool:
        return self.keys_seen >= self.k  # then every head has k scores

    def _priority(self, bounds: np.ndarray, is_open: np.ndarray) -> np.ndarray:
        """Until every head has k scores: the highest bound; then how far the best head's
        bound is above its k-th score (below 0: nothing there can enter any head's top k)."""
        if not len(bounds):
            return np.empty(0)
        p = (bounds - self.best[:, self.k - 1]).max(axis=-1) if self.full else bounds.max(-1)
        return np.where(is_open, p, -np.inf)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            p_super = self._priority(self.super_bound, self.super_open)
            p_block = self._priority(self.block_bound, self.block_open)
            top_super = p_super.max() if len(p_super) else -np.inf
            top_block = p_block.max() if len(p_block) else -np.inf
            top = max(top_super, top_block)
            if top == -np.inf or (self.full and top < 0):
                break
            if top_super > top_block:
                self._open_superblock(int(np.argmax(p_super)))
            else:
                self._visit(p_block)
        stats = self.store.stats
        stats.searches += 1
        stats.blocks += self.b_last - self.b_first + 1
        stats.visited += self.visited
        return self.best, self.best_pos

    def _open_superblock(self, i: int) -> None:
        self.super_open[i] = False
        s = int(self.super_ids[i])
        first = max(s * self.superblock, self.b_first)
        stop = min((s + 1) * self.superblock, self.b_last + 1)
        bound, magnitude = _box_bounds(self.store._box_records("b", self.layer, first, stop),
                                       self.q)
        self.block_ids = np.concatenate([self.block_ids, np.arange(first, stop)])
        self.block_bound = np.concatenate([self.block_bound, bound])
        self.block_magnitude = np.concatenate([self.block_magnitude, magnitude])
        self.block_open = np.concatenate([self.block_open, np.ones(stop - first, dtype=bool)])

    def _visit(self, priority: np.ndarray) -> None:
        """Score the next few blocks (1, 1, 2, 2, 3, 4, 5, 7, ...: a search that cannot prune
        still takes few steps) and keep each head's k best."""
        order = np.argsort(-priority, kind="stable")[:1 + self.visited // 2]
        order = order[np.isfinite(priority[order]) & (priority[order] >= (0 if self.full
                                                                          else -np.inf))]
        self.block_open[order] = False
        self.visited += len(order)
        size, keys, positions, error = self.block, [], [], []
        for i in order:
            b = int(self.block_ids[i])
            a, z = max(b * size, self.first), min(b * size + size, self.last + 1)
            keys.append(self.store.keys(self.layer, a, z))
            positions.append(np.arange(a, z))
            error.append(np.repeat(FILTER_SLACK * self.block_magnitude[i][:, None], z - a, 1))
        keys, positions = np.concatenate(keys), np.concatenate(positions)
        heads, rows = self._candidates(keys, np.concatenate(error, axis=1))
        kv_rows = keys[rows, heads // self.group]                     # [P, d]
        self._merge(heads, positions[rows], _pair_scores(kv_rows, self.q_rows[heads]))
        self.keys_seen += len(keys)

    def _candidates(self, keys: np.ndarray, error: np.ndarray):
        """(head, row) pairs whose float32 score, within its error, can reach the head's top
        k: above the k-th score so far, and above the k-th lowest-possible score here."""
        k32 = keys.astype(np.float32).transpose(1, 0, 2)             # [kv, n, d]
        approx = np.matmul(k32, self.q32.transpose(0, 2, 1))         # [kv, n, group]
        approx = approx.transpose(0, 2, 1).reshape(self.n_heads, -1)  # [H, n]
        threshold = np.full(self.n_heads, -np.inf)
        if self.full:
            threshold = self.best[:, self.k - 1]
        if approx.shape[1] >= self.k:
            low = np.partition(approx - error, -self.k, axis=1)[:, -self.k]
            threshold = np.maximum(threshold, low)
        return np.nonzero(approx + error >= threshold[:, None])

    def _merge(self, heads: np.ndarray, positions: np.ndarray, scores: np.ndarray) -> None:
        """Each head's k best of its best so far and the new (head, position, score)s."""
        n_kept = self.best.shape[1]
        h = np.concatenate([np.repeat(np.arange(self.n_heads), n_kept), heads])
        p = np.concatenate([self.best_pos.ravel(), positions])
        s = np.concatenate([self.best.ravel(), scores])
        order = np.lexsort((p, -s, h))                   # by head, score down, position up
        h_sorted = h[order]
        rank = np.arange(len(order)) - np.searchsorted(h_sorted, h_sorted)
        keep = order[rank < self.k]
        self.best = s[keep].reshape(self.n_heads, -1)    # as many per head (see _candidates)
        self.best_pos = p[keep].reshape(self.n_heads, -1)


class MiddleAttention:
    """A session's top-k middle attention: its store and what the forward pass asks of it."""

    def __init__(self, cfg: Config, freq: np.ndarray, spec, top_k: TopK,
                 directory: str | os.PathLike | None = None, dtype: str = "float16"):
        self.top_k, self.spec = top_k, spec
        self.first_layer = top_k.from_layer
        self.n_layers = cfg.num_hidden_layers - top_k.from_layer
        self.store = MiddleStore(self.n_layers, cfg.n_kv_heads, cfg.head_dim, directory, dtype)
        scale = np.float32(1 / np.sqrt(cfg.head_dim))
        cos, sin = cos_sin([top_k.insert_at], freq)                     # host [1, d/2]
        self.insert_cos, self.insert_sin = cos * scale, sin * scale
        self.group = cfg.n_heads // cfg.n_kv_heads

    def stores(self, layer: int) -> bool:
        return layer >= self.first_layer

    def middle(self, position: int) -> tuple[int, int]:
        """The middle of a query at `position`: positions [first, last] (maybe empty)."""
        return self.spec.n_global, position - self.spec.n_local

    def attend_last_row(self, layer: int, position: int, q: Array, out: Array,
                        lse: Array, xp) -> None:
        """Add the top-k middle keys to the softmax of the chunk's last query (in place).

        q: [kv, group, d] the query un-rotated; out: [H d] its attention output over the Λ
        keys, normalised; lse: [kv, group] the log-sum-exp of its Λ scores."""
        first, last = self.middle(position)
        q_insert = apply_rope(to_host(q), self.insert_cos, self.insert_sin)  # scaled
        found = self.store.search(layer - self.first_layer, q_insert, first, last,
                                  self.top_k.k)
        if found is None:
            return
        scores, positions = found
        values = self.store.values(layer - self.first_layer, positions, self.group)
        n_heads, d = len(scores), q.shape[-1]
        o = to_host(out).reshape(n_heads, d).astype(np.float64)
        lse_h = to_host(lse).reshape(n_heads).astype(np.float64)
        # one softmax over [Λ keys | top-k keys]: the Λ part enters as its sum exp(lse)
        top = np.maximum(lse_h, scores.max(axis=1))
        w_lambda = np.exp(lse_h - top)                                   # [H]
        w_middle = np.exp(scores - top[:, None])                         # [H, k]
        total = w_lambda + w_middle.sum(axis=1)
        mixed = (w_lambda[:, None] * o + np.einsum("hk,hkd->hd", w_middle, values)) \
            / total[:, None]
        out[...] = xp.asarray(mixed.reshape(-1).astype(np.float32))

    def close(self) -> None:
        self.store.close()
