"""A chunk's host work spread over the cores, one thread per core (NumPy backend only).

BLAS runs a GEMM on every core, but NumPy's elementwise passes (norms, RoPE, SiLU, the
softmax's max, exp and sum) run on one, and the attention's small per-block GEMMs gain little
from BLAS threads. So a chunk of many tokens is computed by `workers()` threads, each on its
own rows (or, in attention, its own query blocks), with BLAS single-threaded meanwhile; NumPy
releases the GIL in both. BLAS stays single-threaded for the whole chunk rather than per
step: its idle threads spin for a while after each call and would take the cores back.

A single token (one session's decode step) and short chunks stay on one thread with BLAS
threaded: a hand-off costs tens of microseconds, as much as a GEMV of a small model's
matrix. A decode step of several sessions (minillm.decode) splits each weight product's row
blocks and the sessions' attention over the same `workers()` threads.

Before any measurement the worker count is BLAS's thread count on machines with up to
SPLIT_MAX_THREADS of them, and 1 (no split, BLAS threaded as usual) above: on a 16-core host,
one thread per core and single-threaded GEMMs on 32-row slices lost to BLAS's own threading
(BENCHMARKS.md). Loading a model sets it from minillm.calibrate, which times the candidates
on this machine; `set_workers` changes it. Limiting BLAS is process-wide, so sessions
computing at once from different threads may briefly run each other's GEMMs single-threaded
(slower, never wrong).
"""

from __future__ import annotations

import contextlib
import os
import threading
from contextlib import nullcontext

import numpy as np

MIN_ROWS_PER_WORKER = 16  # below this a chunk is not worth splitting
SPLIT_MAX_THREADS = 4     # split by default on machines with at most this many BLAS threads
_state: dict = {}


def _blas():
    if "blas" not in _state:
        try:
            from threadpoolctl import ThreadpoolController
            _state["blas"] = ThreadpoolController().select(user_api="blas")
        except Exception:  # no threadpoolctl or an unknown BLAS: never split
            _state["blas"] = None
    return _state["blas"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        return os.cpu_count() or 1


def thread_limit() -> int:
    """The threads a chunk may use: BLAS's thread count (what `--threads` sets), never more
    than the usable cores; 1 without a known BLAS."""
    blas = _blas()
    threads = [lib.num_threads for lib in blas.lib_controllers] if blas is not None else []
    return min(max(threads, default=1), usable_cores())


def default_workers() -> int:
    """The split before any measurement: one thread per BLAS thread on small machines."""
    n = thread_limit()
    return n if n <= SPLIT_MAX_THREADS else 1


def workers() -> int:
    """How many threads a long chunk is split over: never more than the usable cores."""
    if "workers" not in _state:
        _state["workers"] = default_workers()
    return _state["workers"]


def set_workers(n: int) -> None:
    """Split long chunks over n threads (1: no split): the program's own choice, which a
    calibration applied later (a model loaded after this) leaves alone."""
    if n < 1:
        raise ValueError(f"workers must be at least 1 (got {n})")
    _state["workers"], _state["chosen"] = int(n), True


def use_calibrated(n: int) -> None:
    """The split a calibration measured, unless the program chose one (set_workers)."""
    if not _state.get("chosen"):
        _state["workers"] = int(n)


@contextlib.contextmanager
def trying(n: int):
    """The split set to n for a while (a calibration's candidates), as it was after."""
    before = _state.get("workers"), _state.get("chosen")
    _state["workers"] = int(n)
    try:
        yield
    finally:
        _state["workers"], _state["chosen"] = before
        if before[0] is None:
            del _state["workers"]


def parts_for(n_rows: int, xp) -> int:
    """How many threads share a chunk of n_rows: 1 for short chunks and for CuPy."""
    if xp is not np or _blas() is None:
        return 1
    return max(1, min(workers(), n_rows // MIN_ROWS_PER_WORKER))


def chunk_threads(n_parts: int):
    """The context a split chunk runs in: BLAS single-threaded (a no-op for one part)."""
    return _blas().limit(limits=1) if n_parts > 1 else nullcontext()


def row_ranges(n: int, n_parts: int) -> list[slice]:
    """n rows as n_parts contiguous, nearly equal slices."""
    bounds = [n * i // n_parts for i in range(n_parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def split(costs: list[float], n: int) -> list[range]:
    """At most n contiguous index ranges of roughly equal total cost (none empty)."""
    total, bounds, acc = sum(costs), [0], 0.0
    for i, c in enumerate(costs):
        acc += c
        if len(bounds) < n and acc >= total * len(bounds) / n and i + 1 < len(costs):
            bounds.append(i + 1)
    bounds.append(len(costs))
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run(fn, parts: list) -> None:
    """fn(part_index, part) for every part: the first on this thread, the others on worker
    threads at the same time (the caller holds chunk_threads, so BLAS inside is
    single-threaded). Returns once every part is done, and re-raises a worker's exception.

    A call from another thread while one is running, or from inside fn, runs its parts one
    after another on its own thread: the same results, without the second core.
    """
    if len(parts) == 1:
        fn(0, parts[0])
        return
    if not _pool_lock.acquire(blocking=False):
        for i, part in enumerate(parts):
            fn(i, part)
        return
    try:
        while len(_workers) < len(parts) - 1:
            _workers.append(_Worker())
        errors, started = np.geterr(), []
        try:
            for worker, i in zip(_workers, range(1, len(parts))):
                worker.start(fn, i, parts[i], errors)
                started.append(worker)
            fn(0, parts[0])
        finally:  # never return while a worker still writes into shared buffers (a signal's
            outcomes = [worker.wait() for worker in started]  # exception may come anywhere)
        for _, interrupted in outcomes:  # a signal's exception first, then a worker's
            if interrupted is not None:
                raise interrupted
        for failure, _ in outcomes:
            if failure is not None:
                raise failure
    finally:
        _pool_lock.release()


class _Worker:
    """A thread that runs one part at a time, started with a lock and waited for with an event
    (which a second wait, after a signal's exception, finds set: no lost wake-up)."""

    def __init__(self):
        self._go, self._done = threading.Lock(), threading.Event()
        self._go.acquire()
        self._job = self._failure = None
        threading.Thread(target=self._loop, name="minillm", daemon=True).start()

    def start(self, fn, i: int, part, errors: dict) -> None:
        self._job, self._failure = (fn, i, part, errors), None
        self._done.clear()
        self._go.release()

    def wait(self) -> tuple[BaseException | None, BaseException | None]:
        """Wait until the part is done, even when a signal handler raises meanwhile (a second
        Ctrl-C raises KeyboardInterrupt in the middle of a chunk): (the part's exception, the
        handler's), each None if none."""
        interrupted = None  # an Event, not a lock: waiting again after an interrupt that
        while True:         # came just after the wait returned must not block
            try:
                self._done.wait()
                return self._failure, interrupted
            except BaseException as e:  # noqa: BLE001 - the caller raises it once all are done
                interrupted = interrupted or e

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            fn, i, part, errors = self._job
            try:
                if np.geterr() != errors:  # the caller's settings: they are per thread
                    np.seterr(**errors)
                fn(i, part)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._failure = e
            finally:
                self._job = None
                self._done.set()


_workers: list[_Worker] = []
_pool_lock = threading.Lock()


def _forget_workers() -> None:
    """In a forked child the workers' threads are gone: start new ones when needed."""
    global _pool_lock
    _workers.clear()
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def over_rows(fn, n_rows: int, xp) -> None:
    """fn(rows) for slices covering [0, n_rows), at once on parts_for(n_rows) threads with
    BLAS single-threaded (for work outside a chunk's forward pass, such as logits)."""
    n_parts = parts_for(n_rows, xp)
    with chunk_threads(n_parts):
        run(lambda _, rows: fn(rows), row_ranges(n_rows, n_parts))
