"""The temporaries of the forward pass, owned by a session and reused by every layer and chunk.

Nothing here outlives a call: the buffers hold no state, only memory that is allocated once
(so a long stream causes no per-chunk allocations or page faults) and overwritten freely.
"""

from __future__ import annotations

import math

import numpy as np

from . import parallel
from .backend import Array

# attention scores of one query block, [heads, block, keys] float32: small enough to stay in
# cache while the softmax passes over it, large enough to keep the GEMMs efficient
SCORE_BUDGET_BYTES = 4 << 20  # the default; minillm.calibrate may choose another
TYPICAL_CHUNK = 512  # per-chunk buffers are first made large enough for chunks of this size
NLL_ROWS = 128       # logits rows materialised at once when scoring: [128, vocab] float32


_score_budget = [SCORE_BUDGET_BYTES]


def score_budget() -> int:
    """Bytes of scores one query block may fill (see SCORE_BUDGET_BYTES)."""
    return _score_budget[0]


def set_score_budget(n_bytes: int) -> None:
    if n_bytes < 4:
        raise ValueError(f"the score budget must be at least one float (got {n_bytes} bytes)")
    _score_budget[0] = int(n_bytes)


class Workspace:
    def __init__(self, vocab_size: int, xp):
        self.xp = xp
        # one score buffer per worker thread, all made up front so nothing grows mid-stream
        workers = parallel.workers() if xp is np else 1
        self._scores = [xp.empty(score_budget() // 4, dtype=xp.float32) for _ in range(workers)]
        self._buffers: dict[str, Array] = {}
        self.logits_rows = xp.empty((NLL_ROWS, vocab_size), dtype=xp.float32)  # for nll()

    @property
    def nbytes(self) -> int:
        arrays = self._scores + list(self._buffers.values()) + [self.logits_rows]
        return int(sum(a.nbytes for a in arrays))

    def scores(self, n: int, worker: int = 0) -> Array:
        """Worker's flat float32 score buffer of exactly n elements, grown (never shrunk).

        Query blocks are sized to score_budget(), so it outgrows that only when a single
        query's scores are larger (the unbounded `full` preset on a very long stream).
        """
        while len(self._scores) <= worker:
            self._scores.append(self.xp.empty(score_budget() // 4, dtype=self.xp.float32))
        if self._scores[worker].size < n:
            self._scores[worker] = self.xp.empty(n, dtype=self.xp.float32)
        return self._scores[worker][:n]

    def buffer(self, name: str, shape: tuple[int, ...], n_rows: int | None) -> Array:
        """A float32 array of `shape` kept under `name` and reused: a chunk's temporaries have
        the same shapes in every layer. n_rows is the chunk length within `shape`: the buffer
        is first made large enough for TYPICAL_CHUNK rows, so it only grows for larger chunks
        (None: a buffer whose size does not follow the chunk's, made exactly as large)."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < n:
            size = n if n_rows is None else max(n, n // max(n_rows, 1) * TYPICAL_CHUNK)
            buf = self._buffers[name] = self.xp.empty(size, dtype=self.xp.float32)
        return buf[:n].reshape(shape)
