"""Top-k middle attention: LM-Infinite's optional recall of the middle, with the middle on disk.

The middle of a query at position i is every key j with n_global <= j <= i - n_local: the
keys the Λ mask hides. With top-k on, in the layers from `top_k_from_layer` up, the last
token of each `feed` call also attends to the k middle keys with the highest score
<R(insert_at) q, k_j> / sqrt(d) (q rotated to the insert distance, k_j un-rotated), chosen
per query head from its key/value head's keys, scored at that value in the same softmax as
the global and local keys. A middle of fewer than k keys means no top-k for that query.

With `neighbours` n > 0 (not the paper's method: InfLLM's idea that tokens matter with their
neighbours, off by default) each of a head's k best tokens brings the n middle tokens on
either side of it. The chosen positions form runs of consecutive tokens; a run keeps its
order, its last token scored at insert_at and each earlier one a step further (insert_at + 1,
...), so the model reads it as a piece of text, not as loose tokens.

Every committed token's un-rotated keys and values of those layers go to a store on disk
(`MiddleStore`), one file per layer and kind, token-major ([tokens, kv_heads, head_dim]):

    k<m>, v<m>   keys and values of stored layer m, float16 (or float32)
    b<m>         per block of BLOCK tokens: element-wise min and max of its keys [2, kv, d]
    s<m>         per superblock of SUPERBLOCK blocks: the same over the superblock
    c<m>         per full block: its keys in 8 bits [kv, BLOCK, d] (key-head-major, as the
                 scan multiplies them), code = round((k - lo) / step) with lo the block's min
                 and step = (max - min) / 255
    e<m>         per full block: step, and the largest |k - (code * step + lo)| [2, kv, d]
                 float32: the codes' measured error, rounded up

Files grow by appending (os.pwrite at the end); reads are os.pread of what a search visits,
so nothing of the store stays mapped or resident: the process holds only the bounds of the
newest block and superblock per layer.

The search is exact. For a query q (rotated, scaled) a box [lo, hi] bounds every key in it:
<q, k> <= sum_i max(q_i lo_i, q_i hi_i). Scores and bounds are float64 sums of exact
products (a float16 or float32 key times a float32 query is exact in float64), summed in the
same order, so a bound is never below a score it covers. Superblocks are opened from the
highest bound down; the search stops when, for every head, the k-th best score so far is
above every bound not yet opened. An opened superblock is scanned through its codes, which
NumPy turns into float32 about ten times faster than float16 keys: one float32 product per
block gives every key's approximate score, within sum_i |q_i| err_i of the exact one (plus
float32 rounding); only the keys that can still enter a head's top k within that error are
read in full, scored by definition and ranked. Ties are ordered by score, then lower position.
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
CODE_LEVELS = 255       # a code is 0..255: 8 bits a key element
SCAN_SUPERBLOCKS = 8    # superblocks scanned in one pass at most (temporaries ~2 MB a query head)
UNDERFLOW = 2.0 ** -149  # float32's smallest step: what a product or sum near 0 may lose
MAX_NEIGHBOURHOOD = 8192  # middle tokens a head may read with neighbours: k (2 n + 1) at most


@dataclass(frozen=True)
class TopK:
    """Top-k middle settings: k keys per query head, in layers >= from_layer, scored with the
    query rotated to insert_at; each with the middle tokens up to `neighbours` positions
    either side (0: none). Out-of-range values raise ValueError."""
    k: int
    from_layer: int
    insert_at: int
    neighbours: int = 0

    def __post_init__(self):
        for name, value, low in (("top_k_middle", self.k, 1),
                                 ("top_k_from_layer", self.from_layer, 0),
                                 ("top_k_insert_at", self.insert_at, 0),
                                 ("top_k_neighbours", self.neighbours, 0)):
            if value < low:
                raise ValueError(f"{name} must be {low} or more (got {value})")
        if self.neighbours and self.k * (2 * self.neighbours + 1) > MAX_NEIGHBOURHOOD:
            raise ValueError(f"top_k_middle x (2 top_k_neighbours + 1) must be at most "
                             f"{MAX_NEIGHBOURHOOD} tokens a head (got {self.k} x "
                             f"{2 * self.neighbours + 1})")


def top_k_settings(cfg: Config, spec, k=0, from_layer=DEFAULT_FROM_LAYER,
                   insert_at=None, neighbours=0) -> TopK | None:
    """Check the top-k options (TypeError on a wrong type, ValueError out of range); None when
    top-k is off (k == 0)."""
    for name, value in (("top_k_middle", k), ("top_k_from_layer", from_layer),
                        ("top_k_insert_at", insert_at), ("top_k_neighbours", neighbours)):
        if value is not None and not is_int(value):
            raise TypeError(f"{name} must be an int (got {type(value).__name__} {value!r})")
    if k is None or k < 0:
        raise ValueError(f"top_k_middle must be 0 (off) or more (got {k})")
    if from_layer is None or from_layer < 0:
        raise ValueError(f"top_k_from_layer must be 0 or more (got {from_layer})")
    if insert_at is not None and insert_at < 0:
        raise ValueError(f"top_k_insert_at must be 0 or more (got {insert_at})")
    if neighbours is None or neighbours < 0:
        raise ValueError(f"top_k_neighbours must be 0 (none) or more (got {neighbours})")
    if k == 0:
        if neighbours:
            raise ValueError("top_k_neighbours needs top_k_middle 1 or more")
        return None
    if not spec.bounded:
        raise ValueError("top_k_middle needs a bounded attention preset (lminfinite or window): "
                         "the full preset has no middle")
    if from_layer >= cfg.num_hidden_layers:
        raise ValueError(f"top_k_from_layer must be below the model's {cfg.num_hidden_layers} "
                         f"layers (got {from_layer})")
    insert_at = cfg.max_position_embeddings // 2 if insert_at is None else int(insert_at)
    return TopK(int(k), int(from_layer), insert_at, int(neighbours))


def store_bytes_per_token(cfg: Config, from_layer: int = DEFAULT_FROM_LAYER,
                          dtype: str = "float16") -> float:
    """Disk bytes a token adds to the store: keys, values and key codes of the stored layers,
    plus their share of the block and superblock records."""
    layers = max(cfg.num_hidden_layers - from_layer, 0)
    elements = layers * cfg.n_kv_heads * cfg.head_dim
    size = np.dtype(DTYPES[dtype]).itemsize
    # keys, values, codes; per block its bounds, step and error; per superblock its bounds
    return elements * (2 * size + 1 + (2 * size + 2 * 4) / BLOCK + 2 * size / (BLOCK * SUPERBLOCK))


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


def _box_bounds(boxes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """For boxes [n, 2, kv, d] (min, max) and queries q [kv, group, d] float64: upper bounds
    [n, H] of <q_h, k> over the keys k inside each box (with a slack for float64 rounding)."""
    lo = boxes[:, 0, :, None, :].astype(np.float64)              # [n, kv, 1, d]
    hi = boxes[:, 1, :, None, :].astype(np.float64)
    lo_q, hi_q = lo * q, hi * q                                   # [n, kv, group, d]
    magnitude = np.maximum(np.abs(lo_q), np.abs(hi_q)).sum(axis=-1)
    bound = np.maximum(lo_q, hi_q).sum(axis=-1) + BOUND_SLACK * magnitude
    return bound.reshape(len(boxes), -1)


def _rounding(head_dim: int) -> float:
    """A float32 approximate score (a head_dim-term product of codes and step-scaled queries,
    or of keys and queries) is within this times sum_i |q_i| max|k_i| (max over the key's
    block) of the same sum in exact arithmetic, away from underflow: about 2 head_dim + 5
    unit roundoffs, taken 4 (2 head_dim + 16) to leave a margin."""
    return 8 * (head_dim + 8) * 2.0 ** -24


def decode_codes(codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Keys back from their codes, float32: code * step + lo (the error the e-file records is
    measured against exactly this)."""
    return codes.astype(np.float32) * step + lo


def quantize(keys: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes of full blocks of keys [layers, blocks * BLOCK, kv, d] (stored dtype) in
    their blocks' boxes [layers, blocks, 2, kv, d]: codes [layers, blocks, kv, BLOCK, d] uint8
    and per block [layers, blocks, 2, kv, d] float32 its step and the largest decoding error,
    rounded up."""
    layers, blocks = boxes.shape[:2]
    k = keys.reshape(layers, blocks, -1, *keys.shape[2:]).astype(np.float32)
    lo = boxes[:, :, None, 0].astype(np.float32)                  # [layers, blocks, 1, kv, d]
    step = (boxes[:, :, None, 1].astype(np.float32) - lo) / np.float32(CODE_LEVELS)
    scaled = np.divide(k - lo, step, out=np.zeros_like(k), where=step > 0)
    codes = np.clip(np.rint(scaled), 0, CODE_LEVELS).astype(np.uint8)
    error = np.abs(k.astype(np.float64) - decode_codes(codes, lo, step)).max(axis=2)
    error32 = error.astype(np.float32)
    error32 = np.where(error32 < error, np.nextafter(error32, np.float32(np.inf)), error32)
    params = np.stack([step[:, :, 0], error32], axis=2)            # [layers, blocks, 2, kv, d]
    return np.ascontiguousarray(codes.transpose(0, 1, 3, 2, 4)), params


def _consecutive_runs(ids: np.ndarray) -> list[np.ndarray]:
    """Sorted unique integers cut into runs of consecutive ones."""
    return np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1)


def _pair_scores(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Scores by definition for (key row, query row) pairs: keys [P, d] stored dtype, q [P, d]
    float64: float64 sums of exact products, each row summed alone (so a key has the same
    score however it was found)."""
    return (keys.astype(np.float64) * q).sum(axis=-1)


@dataclass
class SearchStats:
    """How much of the middle the superblock bounds pruned (blocks in the middles searched,
    blocks in the superblocks opened) and how many of its keys the codes left to score
    exactly."""
    searches: int = 0
    blocks: int = 0
    visited: int = 0
    keys: int = 0
    scored: int = 0

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
                           for kind in "kvbsce"}
        except OSError as e:
            self.close()
            raise WriteError(f"cannot create the middle store in {self.path} "
                             f"({e.strerror or e})") from None
        self.row_shape = (kv_heads, head_dim)
        self.row_bytes = kv_heads * head_dim * self.dtype.itemsize      # one token, one layer
        self.box_bytes = 2 * self.row_bytes                               # a min/max record
        self.code_bytes = kv_heads * head_dim * block                     # a block's codes
        self.param_bytes = 2 * kv_heads * head_dim * 4                    # a step/error record
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
        next appends; a bound record they touched stays a valid, looser bound until then, and
        codes count only for blocks full within the length)."""
        self.length, block_box, super_box = mark
        self._block_box[...], self._super_box[...] = block_box, super_box

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("the middle store is closed (the session was closed)")

    @property
    def full_blocks(self) -> int:
        """Blocks whose codes are written."""
        return self.length // self.block

    # -- writing -------------------------------------------------------------------------
    def append(self, keys: Array, values: Array) -> None:
        """Append C tokens: keys (un-rotated) and values [n_layers, kv_heads, C, head_dim]."""
        self._check_open()
        with np.errstate(over="ignore"):  # a key float16 cannot hold is refused below
            k = np.ascontiguousarray(to_host(keys).transpose(0, 2, 1, 3), dtype=self.dtype)
        v = np.ascontiguousarray(to_host(values).transpose(0, 2, 1, 3), dtype=self.dtype)
        start, n = self.length, k.shape[1]
        if not n:
            return
        if not np.isfinite(k).all():
            raise MiniLLMError(f"a key of the top-k layers is not finite in the middle store's "
                               f"{self.dtype.name}" + (" (|k| > 65504): use middle_dtype float32"
                                                       if self.dtype == np.float16 else ""))
        blocks, block_box = self._boxes(k, start, self.block, self._block_box)
        b0 = start // self.block
        supers, super_box = self._boxes(blocks, b0, self.superblock, self._super_box,
                                        first_partial=start % (self.block * self.superblock) != 0)
        s0 = b0 // self.superblock
        filled = (start + n) // self.block - b0          # blocks this append fills, from b0
        try:
            if filled:  # their keys begin with what earlier appends wrote of block b0
                head = np.stack([self.keys(m, b0 * self.block, start)
                                 for m in range(self.n_layers)])
                rest = k[:, :(b0 + filled) * self.block - start]
                codes, params = quantize(np.concatenate([head, rest], axis=1), blocks[:, :filled])
            for m in range(self.n_layers):
                _pwrite(self._files["k"][m], k[m], start * self.row_bytes)
                _pwrite(self._files["v"][m], v[m], start * self.row_bytes)
                _pwrite(self._files["b"][m], blocks[m], b0 * self.box_bytes)
                _pwrite(self._files["s"][m], supers[m], s0 * self.box_bytes)
                if filled:
                    _pwrite(self._files["c"][m], codes[m], b0 * self.code_bytes)
                    _pwrite(self._files["e"][m], params[m], b0 * self.param_bytes)
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
              shape: tuple, dtype=None) -> np.ndarray:
        raw = _pread(self._files[kind][layer], first * record, (stop - first) * record)
        return np.frombuffer(raw, dtype=dtype or self.dtype).reshape((stop - first,) + shape)

    def keys(self, layer: int, first: int, stop: int) -> np.ndarray:
        """Keys of positions [first, stop): [n, kv_heads, head_dim], stored dtype."""
        return self._read("k", layer, first, stop, self.row_bytes, self.row_shape)

    def rows(self, kind: str, layer: int, positions: np.ndarray) -> np.ndarray:
        """Rows [len(unique), kv, d] of the sorted unique `positions` (one read per run of
        consecutive positions)."""
        runs = _consecutive_runs(positions)
        return np.concatenate([self._read(kind, layer, int(run[0]), int(run[-1]) + 1,
                                          self.row_bytes, self.row_shape) for run in runs])

    def boxes(self, kind: str, layer: int, first: int, stop: int) -> np.ndarray:
        """Bound records [first, stop) of the block ("b") or superblock ("s") file:
        [n, 2, kv, d] (min, max), stored dtype."""
        return self._read(kind, layer, first, stop, self.box_bytes, (2,) + self.row_shape)

    def codes(self, layer: int, first_block: int, stop_block: int):
        """Full blocks [first_block, stop_block): codes [n, kv, BLOCK, d] uint8 and their
        (step, error) records [n, 2, kv, d] float32."""
        codes = self._read("c", layer, first_block, stop_block, self.code_bytes,
                           (self.kv_heads, self.block, self.head_dim), np.uint8)
        params = self._read("e", layer, first_block, stop_block, self.param_bytes,
                            (2,) + self.row_shape, np.float32)
        return codes, params

    def values(self, layer: int, positions: np.ndarray, group: int) -> np.ndarray:
        """Values [H, k, head_dim] float32 of positions [H, k] (head h reads kv head
        h // group)."""
        unique = np.unique(positions)
        rows = self.rows("v", layer, unique)
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
    """One exact top-k search (see the module docstring): superblocks are opened from the
    highest bound down, a few at a time, and scanned through their codes."""

    def __init__(self, store: MiddleStore, layer: int, q: np.ndarray, first: int, last: int,
                 k: int):
        self.store, self.layer, self.k = store, layer, k
        self.q32, self.q = q, q.astype(np.float64)                 # [kv, group, d]
        self.q_rows = self.q.reshape(-1, q.shape[-1])              # [H, d]
        self.n_heads, self.group = self.q_rows.shape[0], q.shape[1]
        self.rounding = _rounding(q.shape[-1])
        self.first, self.last = first, last
        self.block, self.span = store.block, store.block * store.superblock
        s_first, s_last = first // self.span, last // self.span
        self.super_ids = np.arange(s_first, s_last + 1)
        self.super_bound = _box_bounds(store.boxes("s", layer, s_first, s_last + 1), self.q)
        self.super_open = np.ones(len(self.super_ids), dtype=bool)
        self.best = np.empty((self.n_heads, 0))                     # [H, <= k], best first
        self.best_pos = np.empty((self.n_heads, 0), dtype=np.int64)
        self.visited = self.keys_seen = 0

    @property
    def full(self) -> bool:
        return self.keys_seen >= self.k  # then every head has k scores

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        opened = 0
        while self.super_open.any():
            # until every head has k scores: the highest bound; then how far the best head's
            # bound is above its k-th score (below 0: nothing there can enter any top k)
            if self.full:
                priority = (self.super_bound - self.best[:, self.k - 1]).max(axis=-1)
            else:
                priority = self.super_bound.max(axis=-1)
            priority[~self.super_open] = -np.inf
            # the next few superblocks (1, 1, 2, 3, 4, 6, 9, ...: a search that cannot
            # prune takes few steps), neighbours scanned together
            batch = np.argsort(-priority, kind="stable")[:1 + opened // 2]
            batch = batch[self.super_open[batch]]
            batch = np.sort(batch[priority[batch] >= (0 if self.full else -np.inf)])
            if not len(batch):
                break
            self.super_open[batch] = False
            opened += len(batch)
            for run in _consecutive_runs(batch):
                for at in range(0, len(run), SCAN_SUPERBLOCKS):
                    piece = self.super_ids[run[at:at + SCAN_SUPERBLOCKS]]
                    self._scan(max(int(piece[0]) * self.span, self.first),
                               min((int(piece[-1]) + 1) * self.span, self.last + 1))
        stats = self.store.stats
        stats.searches += 1
        stats.blocks += self.last // self.block - self.first // self.block + 1
        stats.visited += self.visited
        stats.keys += self.last - self.first + 1
        return self.best, self.best_pos

    def _scan(self, a: int, z: int) -> None:
        """Approximate scores of the keys [a, z) from their codes (the newest block, not full
        yet, from its keys), then the exact scores of the keys that can still enter a head's
        top k."""
        b_first, b_stop = a // self.block, (z - 1) // self.block + 1
        b_coded = min(b_stop, self.store.full_blocks)
        boxes = self.store.boxes("b", self.layer, b_first, b_stop)
        # per key element, how far its approximation may be off: the codes' decoding error
        # (none for the newest block's own keys) and float32 rounding, at most self.rounding
        # of the element's largest size in its block
        slack = self.rounding * np.abs(boxes.astype(np.float64)).max(axis=1)  # [blocks, kv, d]
        approx = []
        if b_coded > b_first:
            codes, params = self.store.codes(self.layer, b_first, b_coded)
            approx.append(self._coded_scores(codes, boxes[:b_coded - b_first, 0], params[:, 0]))
            slack[:b_coded - b_first] += params[:, 1]
        if b_stop > b_coded:  # the newest block: its keys as they are
            keys = self.store.keys(self.layer, b_coded * self.block,
                                   min(b_stop * self.block, self.store.length))
            approx.append(self._key_scores(keys))
        approx = np.concatenate(approx, axis=1)                     # [H, rows from b_first]
        error = np.einsum("nkd,kgd->kgn", slack, np.abs(self.q))
        # near 0, float32 loses up to UNDERFLOW a product, sum and (times the code) q * step
        error = (error + self.q.shape[-1] * (CODE_LEVELS + 2) * UNDERFLOW) * (1 + BOUND_SLACK)
        error = np.repeat(error.reshape(self.n_heads, -1), self.block, axis=1)  # [H, rows]
        offset = a - b_first * self.block
        approx, error = approx[:, offset:offset + z - a], error[:, offset:offset + z - a]
        self.visited += b_stop - b_first
        heads, rows = self._candidates(approx, error)
        self.keys_seen += z - a
        if not len(rows):
            return
        positions = a + rows
        unique = np.unique(positions)
        self.store.stats.scored += len(unique)
        keys = self.store.rows("k", self.layer, unique)[np.searchsorted(unique, positions),
                                                         heads // self.group]
        self._merge(heads, positions, _pair_scores(keys, self.q_rows[heads]))

    def _coded_scores(self, codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Approximate scores [H, n * BLOCK] of full blocks' keys from their codes [n, kv,
        BLOCK, d]: <q, code * step + lo> as a float32 product of the codes with q * step per
        block, plus <q, lo> in float64."""
        n, kv, size, d = codes.shape
        q_step = self.q32 * step[:, :, None]                               # [n, kv, group, d]
        scores = np.matmul(codes, q_step.transpose(0, 1, 3, 2))            # [n, kv, size, g]
        scores = scores.transpose(1, 3, 0, 2).astype(np.float64)           # [kv, g, n, size]
        lo_term = np.einsum("nkd,kgd->kgn", lo.astype(np.float64), self.q)  # [kv, g, n]
        scores += lo_term[..., None]
        return scores.reshape(self.n_heads, n * size)

    def _key_scores(self, keys: np.ndarray) -> np.ndarray:
        """Approximate scores [H, n] of keys [n, kv, d] (stored dtype): one float32 product."""
        k32 = keys.astype(np.float32).transpose(1, 0, 2)                  # [kv, n, d]
        scores = np.matmul(k32, self.q32.transpose(0, 2, 1))              # [kv, n, group]
        return scores.transpose(0, 2, 1).reshape(self.n_heads, -1).astype(np.float64)

    def _candidates(self, approx: np.ndarray, error: np.ndarray):
        """(head, row) pairs whose exact score, within the error of its approximation, can
        reach the head's top k: above the k-th score so far, and above the k-th lowest-possible
        score here."""
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
        self.spec, self.freq = spec, freq
        self.first_layer = top_k.from_layer
        self.n_layers = cfg.num_hidden_layers - top_k.from_layer
        self.store = MiddleStore(self.n_layers, cfg.n_kv_heads, cfg.head_dim, directory, dtype)
        self.scale = np.float32(1 / np.sqrt(cfg.head_dim))
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.configure(top_k)

    def configure(self, top_k: TopK) -> None:
        """Search with other k, insert_at or neighbours from the next query on (the same
        store: from_layer stays)."""
        if top_k.from_layer != self.first_layer:
            raise ValueError("the store holds the layers from "
                             f"{self.first_layer}: from_layer cannot change")
        self.top_k = top_k
        cos, sin = cos_sin([top_k.insert_at], self.freq)                 # host [1, d/2]
        self.insert_cos, self.insert_sin = cos * self.scale, sin * self.scale

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
        first, last, m = *self.middle(position), layer - self.first_layer
        q = to_host(q)
        q_insert = apply_rope(q, self.insert_cos, self.insert_sin)       # scaled
        found = self.store.search(m, q_insert, first, last, self.top_k.k)
        if found is None:
            return
        scores, positions = found
        if self.top_k.neighbours:
            scores, positions = self._with_neighbours(m, q, first, last, positions)
        values = self.store.values(m, positions, self.group)
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

    def _with_neighbours(self, m: int, q: np.ndarray, first: int, last: int,
                         positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each head's best positions [H, k] with their neighbours in [first, last], scored
        in runs (the module docstring): scores [H, n] float64, -inf after a head's own
        positions, and positions [H, n] (the padding repeats a head's first)."""
        n = self.top_k.neighbours
        spans, steps = [], []
        for best in positions:
            span = np.unique(best[:, None] + np.arange(-n, n + 1))
            span = span[(span >= first) & (span <= last)]
            breaks = np.diff(span) != 1
            run_end = span[np.append(np.nonzero(breaks)[0], len(span) - 1)]
            spans.append(span)
            steps.append(run_end[np.concatenate([[0], np.cumsum(breaks)])] - span)  # 0: an end
        unique = np.unique(np.concatenate(spans))
        keys = self.store.rows("k", m, unique).astype(np.float64)          # [u, kv, d]
        # the distances the longest run needs, then per head its query at each of its keys'
        longest = max(int(step.max()) for step in steps) + 1
        cos, sin = cos_sin(self.top_k.insert_at + np.arange(longest), self.freq)
        cos, sin = cos * self.scale, sin * self.scale                     # [longest, d/2]
        q_heads = q.reshape(-1, q.shape[-1])                              # [H, d]
        width = max(map(len, spans))
        scores = np.full((len(spans), width), -np.inf)
        padded = np.empty((len(spans), width), dtype=np.int64)
        for h, (span, step) in enumerate(zip(spans, steps)):
            keys_h = keys[np.searchsorted(unique, span), h // self.group]
            q_at = apply_rope(np.broadcast_to(q_heads[h], keys_h.shape), cos[step], sin[step])
            scores[h, :len(span)] = np.einsum("nd,nd->n", keys_h, q_at.astype(np.float64))
            padded[h] = span[0]
            padded[h, :len(span)] = span
        return scores, padded

    def close(self) -> None:
        self.store.close()
