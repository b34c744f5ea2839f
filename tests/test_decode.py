"""The decode step (minillm.decode) against the chunk path it shortcuts (model.forward_staged)
and the dense Λ reference: the same logits to 1e-5, the same cache, and nothing written when
a step is abandoned."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKEND, lambda_reference_logits, make_session, rng_ids

import minillm
from minillm import decode
from minillm.model import ChunkAbandoned

pytestmark = pytest.mark.skipif(BACKEND != "numpy", reason="the decode step is NumPy's")

# (preset, n_global, n_local, ceiling): windows small enough that the rings wrap, the capped
# branch comes into play and the global slots fill within a test
SETTINGS = [("lminfinite", 2, 8, None), ("lminfinite", 3, 5, 3), ("lminfinite", 1, 7, 12),
            ("lminfinite", 0, 6, None), ("window", 0, 6, None), ("full", 0, None, None)]
MODELS = ["gqa", "mha_tied", "llama3_headdim_odd", "linear"]


@pytest.fixture(scope="module", params=MODELS)
def model(request, tiny_dir):
    folder, _ = tiny_dir(request.param)
    return minillm.load(folder, backend=BACKEND)


def chunk_path(session):
    """The session with its decode step switched off: single tokens take the chunk path."""
    session._step = None
    return session


def counting_steps(monkeypatch) -> list:
    """Record every decode step taken from now on (so a test knows the fast path ran)."""
    steps, original = [], decode.forward_one

    def counted(sessions, *args, **kw):
        steps.append(len(sessions))
        return original(sessions, *args, **kw)

    monkeypatch.setattr(minillm.session, "forward_one", counted)
    return steps


@pytest.mark.parametrize("preset,n_global,n_local,ceiling", SETTINGS)
def test_decode_equals_the_chunk_path(model, monkeypatch, preset, n_global, n_local, ceiling):
    fast = make_session(model, preset, n_global, n_local, ceiling)
    slow = chunk_path(make_session(model, preset, n_global, n_local, ceiling))
    vocab = model.config.vocab_size
    prompt = rng_ids(2, vocab, seed=1)  # the first tokens decode into the global slots
    steps = counting_steps(monkeypatch)
    np.testing.assert_allclose(fast.feed(prompt), slow.feed(prompt), atol=1e-5, rtol=0)
    for i, token in enumerate(rng_ids(30, vocab, seed=2)):  # past every ring's wrap
        got, want = fast.feed([token], logits="last"), slow.feed([token], logits="last")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"token {i}")
    assert len(steps) == 30
    np.testing.assert_array_equal(fast.cache.pos, slow.cache.pos)
    assert fast.position == slow.position == 32
    np.testing.assert_allclose(fast.cache.k, slow.cache.k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.cache.v, slow.cache.v, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.cache.k_raw, slow.cache.k_raw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,n_global,n_local,ceiling", SETTINGS[:5])
def test_token_by_token_matches_the_dense_reference(tiny_dir, monkeypatch, preset, n_global,
                                                     n_local, ceiling):
    """Independent of the chunk path: every token fed alone against the dense T x T oracle."""
    folder, torch_model = tiny_dir("gqa")
    model = minillm.load(folder, backend=BACKEND)
    ids = rng_ids(3 * n_local + 7, model.config.vocab_size, seed=3)
    session = make_session(model, preset, n_global, n_local, ceiling)
    steps = counting_steps(monkeypatch)
    ours = session.feed(ids, chunk_size=1)
    assert len(steps) == len(ids)
    spec = session.spec
    ref = lambda_reference_logits(torch_model, ids, spec.n_global, n_local, spec.ceiling)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_nll_one_token_at_a_time_equals_chunks(model):
    ids = rng_ids(40, model.config.vocab_size, seed=4)
    one = make_session(model, "lminfinite", 2, 8, None).nll(ids, chunk_size=1)
    chunks = make_session(model, "lminfinite", 2, 8, None).nll(ids, chunk_size=16)
    np.testing.assert_allclose(one, chunks, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", [1, 20])  # a global position's step; a wrapped ring's
@pytest.mark.parametrize("layer", [0, 1])
def test_an_abandoned_step_leaves_the_cache_as_it_was(model, prefix, layer):
    ids = rng_ids(prefix + 5, model.config.vocab_size, seed=5)
    session = make_session(model, "lminfinite", 2, 8, None)
    session.feed(ids[:prefix], logits="none")
    before = {k: np.array(getattr(session.cache, k)) for k in ("k", "v", "k_raw", "pos")}
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > layer

    with pytest.raises(ChunkAbandoned):
        decode.forward_one([session], ids[prefix:prefix + 1], session._step, stop)
    assert len(asked) == layer + 1
    for key, value in before.items():
        assert np.array_equal(getattr(session.cache, key), value), key
    assert session.position == prefix
    reference = make_session(model, "lminfinite", 2, 8, None)
    reference.feed(ids[:prefix], logits="none")
    np.testing.assert_array_equal(session.feed(ids[prefix:], chunk_size=1),
                                  reference.feed(ids[prefix:], chunk_size=1))


def test_rotation_matrix_is_rope(model):
    """x @ rotation(p) is rope.apply_rope at p (the rotate-half layout), scale included."""
    from minillm.rope import apply_rope, cos_sin
    d = model.config.head_dim
    x = np.random.default_rng(6).standard_normal((5, d)).astype(np.float32)
    for p in (0, 1, 17, 10**7):
        cos, sin = cos_sin([p], model.freq)
        want = apply_rope(x, cos * np.float32(0.125), sin * np.float32(0.125))
        np.testing.assert_allclose(x @ decode.rotation(p, model.freq, 0.125), want,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n_out,n_in", [(1000, 576), (96, 1536), (4, 7), (49152, 64)])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_weight_product_is_x_times_w_transposed(rows, n_out, n_in, parts):
    """Whole blocks, a remainder, no whole block, many blocks; split over 1 to 3 threads."""
    rng = np.random.default_rng(rows * n_out + parts)
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    w = rng.standard_normal((n_out, n_in), dtype=np.float32)
    out = np.full((rows, n_out), np.nan, np.float32)
    scratch = np.full(rows * n_out, np.nan, np.float32)
    with minillm.parallel.chunk_threads(parts):
        got = decode.weight_product(x, w, out, scratch, parts)
    assert got is out
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(out, want, atol=2e-4 * np.sqrt(n_in), rtol=1e-5)


def test_weight_product_writes_a_strided_out():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32), dtype=np.float32)
    w = rng.standard_normal((4096, 32), dtype=np.float32)
    out = np.zeros((4, 8192), np.float32)[:, ::2]  # rows not contiguous in their last axis
    decode.weight_product(x, w, out)
    np.testing.assert_allclose(out, x @ w.T, atol=1e-4, rtol=1e-5)
