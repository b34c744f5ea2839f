"""Chunks split over threads: the same answers as the dense reference and as one thread.

The suite runs with OPENBLAS_NUM_THREADS=1, where minillm would not split; these tests ask for
two workers explicitly, so the threaded path (row halves, balanced attention-block runs,
BLAS single-threaded meanwhile) runs everywhere.
"""

import signal
import threading
import time
import warnings

import numpy as np
import pytest
from helpers import BACKEND, lambda_reference_logits, make_session, rng_ids

import minillm
from minillm import parallel


def test_row_ranges_cover_in_order():
    for n in (1, 2, 7, 33, 512):
        for parts in (1, 2, 3, 8):
            ranges = parallel.row_ranges(n, parts)
            assert [i for r in ranges for i in range(n)[r]] == list(range(n))
            sizes = [r.stop - r.start for r in ranges]
            assert len(ranges) == min(n, parts) and max(sizes) - min(sizes) <= 1


def test_split_is_contiguous_and_balanced():
    costs = [1.0] * 8 + [8.0]
    runs = parallel.split(costs, 2)
    assert [i for r in runs for i in r] == list(range(9))
    assert runs == [range(0, 8), range(8, 9)]
    assert parallel.split([5.0], 4) == [range(0, 1)]
    assert len(parallel.split([1.0] * 12, 3)) == 3


def test_short_chunks_and_cupy_are_not_split(two_workers):
    assert parallel.parts_for(2 * parallel.MIN_ROWS_PER_WORKER, np) == 2
    assert parallel.parts_for(2 * parallel.MIN_ROWS_PER_WORKER - 1, np) == 1
    assert parallel.parts_for(1, np) == 1
    assert parallel.parts_for(10_000, object()) == 1  # any other array module


def test_worker_errors_reach_the_caller(two_workers):
    seen = []

    def fn(i, part):
        seen.append(i)
        if i == 1:
            raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        parallel.run(fn, [0, 1])
    assert sorted(seen) == [0, 1]


@pytest.mark.parametrize("name", ["gqa", "llama3_headdim_odd"])
@pytest.mark.parametrize("preset,n_global,n_local,ceiling", [
    ("lminfinite", 3, 24, None), ("lminfinite", 2, 20, 30), ("window", 0, 24, None)])
@pytest.mark.parametrize("chunk_size", [512, 40])
def test_split_chunks_match_dense_reference(tiny_dir, two_workers, name, preset, n_global,
                                            n_local, ceiling, chunk_size):
    folder, torch_model = tiny_dir(name)
    model = minillm.load(folder, backend=BACKEND)
    ids = rng_ids(3 * n_local + 17, model.config.vocab_size, seed=11)
    session = make_session(model, preset, n_global, n_local, ceiling)
    ours = session.feed(ids, chunk_size=chunk_size)
    ref = lambda_reference_logits(torch_model, ids, session.spec.n_global, n_local,
                                  session.spec.ceiling)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["lminfinite", "full"])
def test_split_equals_one_thread(tiny_model, preset):
    ids = rng_ids(300, tiny_model.config.vocab_size, seed=12)
    results = []
    before = parallel.workers()
    try:
        for n in (1, 2, 3):
            parallel.set_workers(n)
            s = make_session(tiny_model, preset, 4, 64, None)
            logits = s.feed(ids[:150], chunk_size=100)
            results.append((logits, s.nll(ids[150:], chunk_size=70),
                            s.feed(ids[:5], logits="last")))
    finally:
        parallel.set_workers(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_splitting_does_not_grow_the_session(tiny_model, two_workers):
    s = make_session(tiny_model, "lminfinite", 4, 32, None)
    s.feed(rng_ids(3, tiny_model.config.vocab_size, seed=13), logits="none")  # not split
    before = s.nbytes
    s.feed(rng_ids(200, tiny_model.config.vocab_size, seed=14), chunk_size=64, logits="none")
    assert s.nbytes == before


def test_workers_take_the_callers_floating_point_settings():
    def overflow(i, part):
        np.exp(np.float32(1000))

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        parallel.run(lambda i, part: i == 1 and overflow(i, part), [0, 1])
    with np.errstate(over="ignore"), warnings.catch_warnings():  # the worker ran "raise" last
        warnings.simplefilter("error")
        parallel.run(overflow, [0, 1])


def test_runs_from_two_threads_at_once_and_nested_runs_all_finish():
    done, inside = [], threading.Event()
    release = threading.Event()

    def slow(i, part):
        inside.set()
        release.wait(5)
        done.append(("slow", i))

    t = threading.Thread(target=parallel.run, args=(slow, [0, 1]))
    t.start()
    inside.wait(5)
    # the workers are busy: this call runs both of its parts on its own thread
    parallel.run(lambda i, part: done.append(("other", i, threading.current_thread().name)),
                 [0, 1])
    release.set()
    t.join(5)
    me = threading.current_thread().name
    assert [d for d in done if d[0] == "other"] == [("other", 0, me), ("other", 1, me)]
    assert sorted(d for d in done if d[0] == "slow") == [("slow", 0), ("slow", 1)]
    nested = []
    parallel.run(lambda i, _: parallel.run(lambda j, __: nested.append((i, j)), [0, 1]), [0, 1])
    assert sorted(nested) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_a_signal_during_the_wait_comes_after_the_workers_finish():
    """A second Ctrl-C while the caller waits for a worker: KeyboardInterrupt is raised only
    once the worker's part is done (it may be writing into buffers the caller reuses)."""
    finished = []

    def fn(i, part):
        if i == 1:  # the worker interrupts the caller, then goes on working
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.3)
            finished.append(time.monotonic())

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel.run(fn, [0, 1])
        raised = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished and finished[0] <= raised
