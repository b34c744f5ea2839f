"""A session: the cache plus the position, fed with tokens chunk by chunk.

The session is the only state: feeding a text in chunks of 1, 7, 512 or all at once gives the
same results (to float32 rounding), because every chunk runs the same masked attention over
[cache | chunk] and the cache holds exactly the keys LM-Infinite attends to. A chunk is
written all or nothing: its keys and values reach the cache only in one commit after its last
layer, so Ctrl-C (or SIGTERM to a program that handles it) stops a chunk between two layers
and the session stays at the chunk boundary before it, which `position` tells.
"""

from __future__ import annotations

import functools
import signal
import threading
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from . import parallel
from .attention import AttentionSpec, attention_spec
from .backend import Array, to_host
from .cache import KVCache, available_bytes, check_memory, out_of_memory, session_bytes
from .config import is_int
from .decode import Step, forward_one, rotation
from .errors import MiniLLMError
from .middle import DEFAULT_FROM_LAYER, MiddleAttention, TopK, top_k_settings
from .model import ChunkAbandoned, forward_staged, lm_head
from .workspace import NLL_ROWS, Workspace

LOGITS_MODES = ("all", "last", "none")


WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A signal stopped feed() or nll() inside a chunk and its handler returned instead of
    raising (a program's own SIGINT/SIGTERM handler that sets a flag): the chunk was
    abandoned, and the session stays at the chunk boundary before it (`position`)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _ChunkSignals:
    """The signals that arrive while a chunk runs on the main thread (elsewhere: none).

    SIGINT and SIGTERM, where their handler is a Python callable (Ctrl-C's default_int_handler,
    a program's own), are recorded and make `stop` true: the forward pass abandons the chunk
    before its next layer, and on leaving the recorded signals go to their handlers. A second
    signal while one is pending goes (after it) to the handlers at once, so a KeyboardInterrupt
    comes from the middle of a layer: safe, since nothing reaches the cache before the commit.
    From `hold()` on (the commit) every signal waits for the end. Ignored (SIG_IGN) and default
    (SIG_DFL) signals are left alone.
    """

    def __init__(self):
        self._handlers: dict[int, Callable] = {}  # the handlers replaced while the chunk runs
        self._pending: list[tuple[int, object]] = []
        self._first: int | None = None  # the first signal received
        self._holding = False
        self._closed = False

    def __enter__(self) -> _ChunkSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in WATCHED_SIGNALS:
                handler = signal.getsignal(sig)
                if callable(handler):
                    self._handlers[sig] = handler
                    signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self._pending.append((signum, frame))
        if self._first is None:
            self._first = signum
        elif not self._holding:
            self._close()  # a second signal: to the handlers now

    def stop(self) -> bool:
        return self._first is not None

    def hold(self) -> None:
        self._holding = True

    def _close(self) -> None:
        """Put the handlers back, then hand them the signals recorded (they may raise)."""
        self._holding = True  # a signal from here on only queues up: nothing cuts the loop
        if not self._closed:
            self._closed = True
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
        while self._pending:
            signum, frame = self._pending.pop(0)
            self._handlers[signum](signum, frame)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not ChunkAbandoned:
            self._close()
            return
        try:
            self._close()
        except BaseException as handler_error:  # KeyboardInterrupt: it stopped the chunk
            raise handler_error from None
        raise Interrupted(self._first) from None


class AttentionWarning(UserWarning):
    """A working setting that leaves LM-Infinite's guarantees (growing memory, unseen distances)."""


IDS_EXPECTED = "a 1-D list, tuple or NumPy array of integer token ids"


def _shown(value) -> str:
    """A value for an error message: its type and (a short) repr."""
    if isinstance(value, np.ndarray):
        return f"a {value.ndim}-D array of {value.dtype}, shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def as_token_ids(ids, vocab_size: int) -> np.ndarray:
    """ids as an int64 array, coercing nothing: a float id, a bool, a string, a bare int or a
    nested list would otherwise become some other stream of ids without a word (TypeError);
    an id the model has no embedding for is a MiniLLMError."""
    if hasattr(ids, "__array__") and not isinstance(ids, np.ndarray):
        ids = np.asarray(ids)  # torch tensors and the like; a NumPy scalar becomes 0-D
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise TypeError(f"token ids must be {IDS_EXPECTED}; got {_shown(ids)}")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if bad.size:
            raise _out_of_range(ids[bad[0]], bad[0], vocab_size)
        return ids.astype(np.int64, copy=False)
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"token ids must be {IDS_EXPECTED}; got {_shown(ids)}")
    for i, x in enumerate(ids):
        if not is_int(x):
            raise TypeError(f"token ids must be {IDS_EXPECTED}; got {_shown(x)} at index {i}")
        if not 0 <= x < vocab_size:
            raise _out_of_range(x, i, vocab_size)
    return np.array(ids, dtype=np.int64)


def _out_of_range(token, index, vocab_size: int) -> MiniLLMError:
    return MiniLLMError(f"token id {token} (at index {index}) is out of range: the model's ids "
                        f"are 0 to {vocab_size - 1}")


def check_chunk_size(chunk_size) -> None:
    if not is_int(chunk_size):
        raise TypeError(f"chunk_size must be an int (got {_shown(chunk_size)})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")


def _quiet_float_errors(method):
    """Run the model's math without NumPy's floating-point warnings. Overflow in it is expected
    and harmless in places (exp in SiLU); where it is not (NaN or inf weights), the result is
    NaN, which its consumers report once (scoring, sampling) instead of raw RuntimeWarnings
    repeated per layer and thread. parallel.run hands the setting to its worker threads."""
    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return method(*args, **kwargs)
    return quiet


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
    """Feeding tokens and reading logits; with top_k_middle > 0 the session also keeps every
    token's keys and values of the upper layers in a store on disk (minillm.middle), removed
    by close() (sessions are context managers), garbage collection or the interpreter's exit."""

    def __init__(self, model, attention: str = "lminfinite", n_global: int | None = None,
                 n_local: int | None = None, ceiling: int | None = None, *,
                 top_k_middle: int = 0, top_k_from_layer: int = DEFAULT_FROM_LAYER,
                 top_k_insert_at: int | None = None, top_k_neighbours: int = 0,
                 middle_dir=None, middle_dtype: str = "float16"):
        cfg = model.config
        self.model = model
        self.spec: AttentionSpec = attention_spec(cfg, attention, n_global, n_local, ceiling)
        top_k = top_k_settings(cfg, self.spec, top_k_middle, top_k_from_layer,
                               top_k_insert_at, top_k_neighbours)
        middle_layers = cfg.num_hidden_layers - top_k.from_layer if top_k else 0
        need = session_bytes(cfg, self.spec.n_global, self.spec.n_local, model.xp, middle_layers)
        check_memory(need, model.xp)  # one clear line, not a MemoryError from deep in NumPy
        if self.spec.preset == "full":
            warnings.warn("attention 'full' keeps every key: memory and time per token grow "
                          "with the stream", AttentionWarning, stacklevel=2)
        elif self.spec.n_local > cfg.max_position_embeddings:
            warnings.warn(f"n_local {self.spec.n_local} exceeds the training length "
                          f"{cfg.max_position_embeddings}: the model will see distances it was "
                          f"never trained on", AttentionWarning, stacklevel=2)
        try:
            self.cache = KVCache(cfg, self.spec.n_global, self.spec.n_local, model.xp)
            self.workspace = Workspace(cfg.vocab_size, model.xp)
        except MemoryError:  # CuPy's OutOfMemoryError too
            raise out_of_memory(need, available_bytes(model.xp), model.xp) from None
        self.last_hidden = None  # [D] final hidden state of the newest token: predicts the next
        # the decode step's few buffers, made up front so that the session never grows
        self._step = Step(model, self.workspace, 1) if model.xp is np else None
        self.middle = None if top_k is None else MiddleAttention(
            cfg, model.freq, self.spec, top_k, middle_dir, middle_dtype)

    @property
    def top_k(self) -> TopK | None:
        """The top-k settings in force (None: off); session.middle.configure(top_k) changes
        them from the next query on."""
        return self.middle.top_k if self.middle is not None else None

    # --- the middle store's life -----------------------------------------------------------
    def close(self) -> None:
        """Remove the middle store (nothing else to release); feeding a closed session with
        top-k middle attention is an error."""
        if self.middle is not None:
            self.middle.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def middle_dir(self) -> str | None:
        """The folder of the middle store (None: top-k middle attention is off)."""
        return self.middle.store.path if self.middle is not None else None

    @property
    def middle_bytes(self) -> int:
        """Bytes the middle store takes on disk (0 when off)."""
        return self.middle.store.disk_bytes() if self.middle is not None else 0

    @property
    def position(self) -> int:
        """Tokens fed so far."""
        return self.cache.length

    @property
    def nbytes(self) -> int:
        """Bytes of every array the session holds (constant for bounded presets)."""
        last = self.last_hidden.nbytes if self.last_hidden is not None else 0
        middle = self.middle.store.nbytes if self.middle is not None else 0
        return self.cache.nbytes + self.workspace.nbytes + last + middle

    def reset(self) -> None:
        self.cache.reset()
        self.last_hidden = None
        if self.middle is not None:
            self.middle.store.reset()

    def mark(self, n_tokens: int) -> dict:
        """What feeding the next n_tokens overwrites (a few cache slots, the newest hidden
        state, the middle store's length): rewind(mark) after feeding at most that many puts
        the session back exactly, so that two continuations of one prefix share its work."""
        last = self.last_hidden.copy() if self.last_hidden is not None else None
        middle = self.middle.store.mark() if self.middle is not None else None
        return {"cache": self.cache.mark(n_tokens), "last_hidden": last, "middle": middle}

    def rewind(self, mark: dict) -> None:
        self.cache.rewind(mark["cache"])
        self.last_hidden = mark["last_hidden"]
        if self.middle is not None:
            self.middle.store.rewind(mark["middle"])

    def _chunks(self, n: int, chunk_size: int, top_k_last: bool = False):
        """[start, stop) row ranges of at most chunk_size; one that holds global positions
        (below n_global) and is longer than n_local ends at n_global, so that no query of a
        chunk is n_local or more past one of the chunk's own global keys (attention.plan_chunk).
        top_k_last: the last chunk is at most n_local long, so that the middle of its last
        query is all in the middle store."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
        start, g, n_local = 0, self.spec.n_global - self.position, self.spec.n_local
        while start < n:
            stop = min(n, start + chunk_size)
            if start < g < stop and n_local is not None and stop - start > n_local:
                stop = g
            if top_k_last and stop == n and stop - start > n_local:
                stop = n - n_local
            yield start, stop
            start = stop

    def chunk_length(self, n: int, chunk_size: int) -> int:
        """How many of n ids the first chunk of feed/nll(ids, chunk_size) takes. Fed that many
        at a time, an interrupted call has fed all of its ids or none."""
        return next(self._chunks(n, chunk_size))[1]

    def _threads(self, n_tokens: int):
        """Hold BLAS single-threaded over a whole long feed, its short first chunk and its
        logits included: after every threaded BLAS call its idle threads spin for about
        0.1 s, slowing the split chunks that follow (see parallel)."""
        return parallel.chunk_threads(parallel.parts_for(n_tokens, self.model.xp))

    def _advance(self, ids: np.ndarray, chunk_size: int, top_k_last: bool = False):
        """Run the model over ids chunk by chunk, yielding (start, stop, hidden [C, D]);
        top_k_last: the last id's query attends to the top-k middle keys too."""
        m = self.model
        top_k_last = top_k_last and self.middle is not None
        if self.middle is not None and self.middle.store.closed:
            raise ValueError("the session is closed (its middle store was removed)")
        for a, b in self._chunks(len(ids), chunk_size, top_k_last):
            positions = np.arange(self.position, self.position + b - a, dtype=np.int64)
            with _ChunkSignals() as signals:
                if b - a == 1 and self._step is not None:  # NumPy: the decode step
                    h, commit = forward_one([self], ids[a:b], self._step, signals.stop,
                                            top_k_last and b == len(ids))
                else:
                    h, commit = forward_staged(m.weights, m.config, m.freq, ids[a:b],
                                               positions, self.spec, self.cache,
                                               self.workspace, signals.stop, self.middle,
                                               top_k_last and b == len(ids))
                signals.hold()  # the commit, a few copies, is never cut halfway
                commit()
                self.last_hidden = h[-1].copy()  # not a view: do not keep the chunk alive
            yield a, b, h

    # --- the decode step (minillm.decode) -------------------------------------------------
    def staged_k_raw(self) -> np.ndarray | None:
        """Where the next single token's un-rotated keys wait for the commit when it is at a
        global position ([layers, kv, 1, d]; the chunk path's buffer), else None."""
        if self.position >= self.spec.n_global:
            return None
        cfg = self.model.config
        return self.workspace.buffer("staged_k_raw", (cfg.num_hidden_layers, cfg.n_kv_heads,
                                                      self.cache.n_global, cfg.head_dim),
                                     None)[:, :, :1]

    @functools.cached_property
    def capped_rotation(self) -> np.ndarray | None:
        """The query rotation at the ceiling, pre-scaled (decode.rotation); None: no ceiling."""
        if self.spec.ceiling is None:
            return None
        return rotation(self.spec.ceiling, self.model.freq, 1 / np.sqrt(self.model.config.head_dim))

    def _ids(self, ids) -> np.ndarray:
        return as_token_ids(ids, self.model.config.vocab_size)

    @_quiet_float_errors
    def feed(self, ids, chunk_size: int = 512, logits: str = "all",
             progress: Callable[[int, int], None] | None = None, top_k_middle: bool = True):
        """Advance by ids; return host float32 logits: [len(ids), V], [V] or None.

        progress(fed, total) is called after each chunk (a long prompt's sign of life).
        With top-k middle attention on, the last id's query also attends to its top-k middle
        keys (as LM-Infinite's last query of each forward call); top_k_middle=False feeds it
        as every other token (the store still records it)."""
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES} (got {logits!r})")
        ids = self._ids(ids)
        check_chunk_size(chunk_size)
        vocab = self.model.config.vocab_size
        out = np.empty((len(ids), vocab), np.float32) if logits == "all" else None
        with self._threads(len(ids)):
            for a, b, h in self._advance(ids, chunk_size, top_k_middle):
                if logits == "all":
                    def logits_of(r, a=a, h=h):
                        out[a + r.start:a + r.stop] = to_host(lm_head(h[r], self.model.weights))
                    parallel.over_rows(logits_of, b - a, self.model.xp)
                if progress is not None:
                    progress(b, len(ids))
            if logits == "last":
                if self.last_hidden is None:
                    raise ValueError("no token has been fed yet")
                return to_host(lm_head(self.last_hidden, self.model.weights))
        return out

    @_quiet_float_errors
    def nll(self, ids, chunk_size: int = 512) -> np.ndarray:
        """NLL (nats) of each token given everything before it in the session; nan for position 0.

        Logits are materialised NLL_ROWS rows at a time, never as a [len(ids), V] array.
        """
        ids = self._ids(ids)
        check_chunk_size(chunk_size)
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
        if self.middle is not None:
            raise MiniLLMError("a session with top-k middle attention cannot be saved (its "
                               "middle store is not part of a checkpoint)")
        write_checkpoint(path, self)

    @classmethod
    def load(cls, path: str, model) -> Session:
        """A saved session for `model`; refuses a checkpoint of another model."""
        from .checkpoint import read_checkpoint
        return read_checkpoint(path, model)[0]
