"""A session: the cache plus the position, fed with tokens chunk by chunk.

The session is the only state: feeding a text in chunks of 1, 7, 512 or all at once gives the
same results (to float32 rounding), because every chunk runs the same masked attention over
[cache | chunk] and the cache holds exactly the keys LM-Infinite attends to. A chunk is
written all or nothing: Ctrl-C is held until its last layer is in the cache, so an interrupted
feed leaves the session at a chunk boundary that `position` tells.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings

import numpy as np

from . import parallel
from .attention import AttentionSpec, attention_spec
from .backend import Array, to_host
from .cache import KVCache
from .errors import MiniLLMError
from .model import forward, lm_head
from .workspace import NLL_ROWS, Workspace

LOGITS_MODES = ("all", "last", "none")


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until a chunk is fully written, so an interrupt never leaves a half-updated
    cache (the layers written, the positions not). The signal is re-delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class AttentionWarning(UserWarning):
    """A working setting that leaves LM-Infinite's guarantees (growing memory, unseen distances)."""


def _nll_of_rows(states: Array, targets: Array, lm_head_w: Array, logits_rows: Array, xp) -> Array:
    """-log p(target) for each row of final states [N, D], via logits in a reused buffer.

    logits_rows: [>= N, V] float32, overwritten; no [N, V] temporaries are allocated.
    """
    logits = logits_rows[:len(states)]
    xp.matmul(states, lm_head_w.T, out=logits)
    picked = logits[xp.arange(len(targets)), targets]      # a copy (advanced indexing)
    m = logits.max(axis=-1, keepdims=True)
    logits -= m
    xp.exp(logits, out=logits)
    return xp.log(logits.sum(axis=-1)) + m[:, 0] - picked


class Session:
    def __init__(self, model, attention: str = "lminfinite", n_global: int | None = None,
                 n_local: int | None = None, ceiling: int | None = None):
        cfg = model.config
        self.model = model
        self.spec: AttentionSpec = attention_spec(cfg, attention, n_global, n_local, ceiling)
        if self.spec.preset == "full":
            warnings.warn("attention 'full' keeps every key: memory and time per token grow "
                          "with the stream", AttentionWarning, stacklevel=2)
        elif self.spec.n_local > cfg.max_position_embeddings:
            warnings.warn(f"n_local {self.spec.n_local} exceeds the training length "
                          f"{cfg.max_position_embeddings}: the model will see distances it was "
                          f"never trained on", AttentionWarning, stacklevel=2)
        self.cache = KVCache(cfg, self.spec.n_global, self.spec.n_local, model.xp)
        self.workspace = Workspace(cfg.vocab_size, model.xp)
        self.last_hidden = None  # [D] final hidden state of the newest token: predicts the next

    @property
    def position(self) -> int:
        """Tokens fed so far."""
        return self.cache.length

    @property
    def nbytes(self) -> int:
        """Bytes of every array the session holds (constant for bounded presets)."""
        last = self.last_hidden.nbytes if self.last_hidden is not None else 0
        return self.cache.nbytes + self.workspace.nbytes + last

    def reset(self) -> None:
        self.cache.reset()
        self.last_hidden = None

    def _chunks(self, n: int, chunk_size: int):
        """[start, stop) row ranges of at most chunk_size; one that holds global positions
        (below n_global) and is longer than n_local ends at n_global, so that no query of a
        chunk is n_local or more past one of the chunk's own global keys (attention.plan_chunk)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
        start, g, n_local = 0, self.spec.n_global - self.position, self.spec.n_local
        while start < n:
            stop = min(n, start + chunk_size)
            if start < g < stop and n_local is not None and stop - start > n_local:
                stop = g
            yield start, stop
            start = stop

    def _threads(self, n_tokens: int):
        """Hold BLAS single-threaded over a whole long feed, its short first chunk and its
        logits included: after every threaded BLAS call its idle threads spin for about
        0.1 s, slowing the split chunks that follow (see parallel)."""
        return parallel.chunk_threads(parallel.parts_for(n_tokens, self.model.xp))

    def _advance(self, ids: np.ndarray, chunk_size: int):
        """Run the model over ids chunk by chunk, yielding (start, stop, hidden [C, D])."""
        m = self.model
        for a, b in self._chunks(len(ids), chunk_size):
            positions = np.arange(self.position, self.position + b - a, dtype=np.int64)
            with _sigint_deferred():
                h = forward(m.weights, m.config, m.freq, ids[a:b], positions, self.spec,
                            self.cache, self.workspace)
                self.last_hidden = h[-1].copy()  # not a view: do not keep the chunk alive
            yield a, b, h

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.model.config.vocab_size):
            raise MiniLLMError(f"token id out of range [0, {self.model.config.vocab_size})")
        return ids

    def feed(self, ids, chunk_size: int = 512, logits: str = "all"):
        """Advance by ids; return host float32 logits: [len(ids), V], [V] or None."""
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES} (got {logits!r})")
        ids = self._ids(ids)
        vocab = self.model.config.vocab_size
        out = np.empty((len(ids), vocab), np.float32) if logits == "all" else None
        with self._threads(len(ids)):
            for a, b, h in self._advance(ids, chunk_size):
                if logits == "all":
                    def logits_of(r, a=a, h=h):
                        out[a + r.start:a + r.stop] = to_host(lm_head(h[r], self.model.weights))
                    parallel.over_rows(logits_of, b - a, self.model.xp)
            if logits == "last":
                if self.last_hidden is None:
                    raise ValueError("no token has been fed yet")
                return to_host(lm_head(self.last_hidden[None], self.model.weights))[0]
        return out

    def nll(self, ids, chunk_size: int = 512) -> np.ndarray:
        """NLL (nats) of each token given everything before it in the session; nan for position 0.

        Logits are materialised NLL_ROWS rows at a time, never as a [len(ids), V] array.
        """
        ids = self._ids(ids)
        out = np.full(len(ids), np.nan, dtype=np.float32)
        with self._threads(len(ids)):
            self._nll_chunks(ids, chunk_size, out)
        return out

    def _nll_chunks(self, ids: np.ndarray, chunk_size: int, out: np.ndarray) -> None:
        xp, w = self.model.xp, self.model.weights
        logits_rows = self.workspace.logits_rows
        prev = self.last_hidden
        for a, _, h in self._advance(ids, chunk_size):
            # states[r] predicts token first + r
            states = h[:-1] if prev is None else xp.concatenate([prev[None], h[:-1]])
            first = a if prev is not None else a + 1
            for r in range(0, len(states), NLL_ROWS):
                rows = states[r:r + NLL_ROWS]
                t0 = first + r

                def nll_of(p, rows=rows, t0=t0):  # rows p of this group, into logits rows p
                    targets = xp.asarray(ids[t0 + p.start:t0 + p.stop])
                    out[t0 + p.start:t0 + p.stop] = to_host(
                        _nll_of_rows(rows[p], targets, w.lm_head, logits_rows[p], xp))
                parallel.over_rows(nll_of, len(rows), xp)
            prev = h[-1]

    # --- checkpoints (minillm.checkpoint) ------------------------------------------------
    def save(self, path: str) -> None:
        """Write the session to `path` atomically (only the cache slots in use)."""
        from .checkpoint import write_checkpoint
        write_checkpoint(path, self)

    @classmethod
    def load(cls, path: str, model) -> Session:
        """A saved session for `model`; refuses a checkpoint of another model."""
        from .checkpoint import read_checkpoint
        return read_checkpoint(path, model)[0]
