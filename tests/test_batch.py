"""minillm.batch: several sessions in one forward pass give what each gives alone."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKEND, make_session, rng_ids

import minillm
from minillm import decode, parallel, workspace
from minillm.batch import FEW_ROWS, Batch
from minillm.generate import generate_ids
from minillm.sampling import SamplingParams

# (preset, n_global, n_local, ceiling): small windows, so that the rings wrap within a test
SETTINGS = [("lminfinite", 4, 16, None), ("lminfinite", 2, 8, 5), ("window", 0, 8, None),
            ("full", 0, None, None), ("lminfinite", 10, 64, None)]
PREFIXES = [3, 40, 0, 17, 90]  # tokens already in each session: different positions


def sessions_pair(model, settings=SETTINGS, prefixes=PREFIXES, seed=0):
    """Two identical sets of sessions with the given settings, fed the same prefixes."""
    vocab = model.config.vocab_size
    pairs = []
    for i, ((preset, g, n, c), k) in enumerate(zip(settings, prefixes)):
        a, b = (make_session(model, preset, g, n, c) for _ in range(2))
        if k:
            ids = rng_ids(k, vocab, seed=seed + i)
            a.feed(ids, logits="none")
            b.feed(ids, logits="none")
        pairs.append((a, b))
    return [a for a, _ in pairs], [b for _, b in pairs]


def alone(sessions, pieces):
    return np.stack([s.feed(p, logits="last") for s, p in zip(sessions, pieces)])


@pytest.fixture(params=["one thread", "two threads"])
def workers(request):
    """A batch of many rows computed on one thread, or its rows split over two."""
    before = parallel.workers()
    parallel.set_workers(1 if request.param == "one thread" else 2)
    yield
    parallel.set_workers(before)


@pytest.fixture(scope="module", params=["gqa", "llama3_headdim_odd"])
def model(request, tiny_dir):
    folder, _ = tiny_dir(request.param)
    return minillm.load(folder, backend=BACKEND)


def test_decode_steps_equal_each_session_alone(model, workers):
    batched, single = sessions_pair(model)
    batch = Batch(model)
    vocab = model.config.vocab_size
    for step in range(40):  # past every ring's wrap, through the global slots of the empty one
        pieces = [rng_ids(1, vocab, seed=1000 + 7 * step + i) for i in range(len(batched))]
        np.testing.assert_allclose(batch.feed(batched, pieces), alone(single, pieces),
                                   atol=1e-4, rtol=0)
    assert [s.position for s in batched] == [s.position for s in single]


def test_decode_steps_cut_into_runs_within_the_score_budget(model, workers, monkeypatch):
    """Sessions whose scores together pass the query-block score budget are attended in
    several runs, each within it (a session wider than the budget alone): the same logits."""
    n_heads = model.config.n_heads
    columns = 60
    monkeypatch.setattr(workspace, "_score_budget", [4 * n_heads * columns])
    runs, original = [], decode._attend

    def recorded(part, *args):
        runs.append((len(part.queries), part.total))
        return original(part, *args)

    monkeypatch.setattr(decode, "_attend", recorded)
    batched, single = sessions_pair(model)
    batch = Batch(model)
    vocab = model.config.vocab_size
    for step in range(30):
        pieces = [rng_ids(1, vocab, seed=3000 + 7 * step + i) for i in range(len(batched))]
        np.testing.assert_allclose(batch.feed(batched, pieces), alone(single, pieces),
                                   atol=1e-4, rtol=0)
    assert all(total <= columns or n == 1 for n, total in runs)
    assert any(n > 1 for n, _ in runs) and any(total > columns for _, total in runs)


def test_pieces_of_any_length_together(model, workers):
    """Decode tokens beside prompt pieces, in batches of few rows and of many (the row split)."""
    batched, single = sessions_pair(model)
    batch = Batch(model)
    vocab = model.config.vocab_size
    lengths = [[1, 7, 1, 3, 1], [5, 1, 2, 8, 1], [1, 1, 1, 1, 60], [16, 1, 1, 1, 1]]
    assert any(sum(n) > FEW_ROWS for n in lengths) and any(sum(n) <= FEW_ROWS for n in lengths)
    for step, ns in enumerate(lengths * 3):
        pieces = [rng_ids(n, vocab, seed=2000 + 11 * step + i) for i, n in enumerate(ns)]
        # a piece crossing n_global may not exceed n_local (as a session's own chunks)
        pieces = [p[:s.chunk_length(len(p), len(p))] for s, p in zip(batched, pieces)]
        np.testing.assert_allclose(batch.feed(batched, pieces), alone(single, pieces),
                                   atol=1e-4, rtol=0)
    # what the batch committed is what each session holds alone: the next logits agree
    nxt = [[5]] * len(batched)
    np.testing.assert_allclose(alone(batched, nxt), alone(single, nxt), atol=1e-4, rtol=0)


def test_a_subset_of_the_sessions_may_step(model):
    batched, single = sessions_pair(model)
    batch = Batch(model)
    for chosen in ([0, 2], [4], [1, 3, 4], [3, 0]):
        pieces = [[7 + i] for i in chosen]
        got = batch.feed([batched[i] for i in chosen], pieces)
        np.testing.assert_allclose(got, alone([single[i] for i in chosen], pieces), atol=1e-4,
                                   rtol=0)


def test_greedy_batched_generation_equals_one_at_a_time(model, workers):
    vocab = model.config.vocab_size
    prompts = [rng_ids(n, vocab, seed=30 + n) for n in (5, 23, 9)]
    greedy = SamplingParams(temperature=0, max_tokens=25)
    expected = []  # prompt + answer pass the window of 4 + 24
    for p in prompts:
        s = make_session(model, "lminfinite", 4, 24, None)
        expected.append(list(generate_ids(s, p, greedy)))

    sessions = [make_session(model, "lminfinite", 4, 24, None) for _ in prompts]
    batch = Batch(model)
    logits = batch.feed(sessions, prompts)  # the prompts together, then one token each
    got = [[] for _ in prompts]
    for _ in range(greedy.max_tokens):
        tokens = [int(np.argmax(row)) for row in logits]
        for out, t in zip(got, tokens):
            out.append(t)
        logits = batch.feed(sessions, [[t] for t in tokens])
    assert got == expected


def test_refusals_leave_every_cache_as_it_was(model):
    a, b = (make_session(model, "lminfinite", 4, 16, None) for _ in range(2))
    a.feed([1, 2, 3], logits="none")
    batch = Batch(model)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match="twice"):
        batch.feed([a, a], [[1], [2]])
    with pytest.raises(ValueError, match="no ids"):
        batch.feed([a, b], [[1], []])
    with pytest.raises(ValueError, match="chunk_length"):
        batch.feed([b], [list(range(20))])  # crosses n_global and is longer than n_local
    with pytest.raises(ValueError, match="sessions but"):
        batch.feed([a, b], [[1]])
    with pytest.raises(minillm.MiniLLMError, match="out of range"):
        batch.feed([a, b], [[1], [vocab]])
    with pytest.raises(TypeError):
        batch.feed([a], [[1.5]])
    assert (a.position, b.position) == (3, 0)


def test_another_models_session_is_refused(model, tiny_model):
    if model.config == tiny_model.config:
        pytest.skip("the same model")
    with pytest.raises(ValueError, match="another model"):
        Batch(model).feed([tiny_model.session()], [[1]])
