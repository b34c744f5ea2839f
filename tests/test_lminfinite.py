"""LM-Infinite against a dense explicit-mask reference, exact streaming, constant memory.

The reference (helpers.lambda_reference_logits) runs transformers' own Llama with its attention
replaced by a dense T x T implementation of docs/DESIGN.md, "The method": local scores from
transformers' rotated q/k, global scores from q rotated at the ceiling against un-rotated keys,
and the Λ mask written out in full.
"""

from pathlib import Path

import numpy as np
import pytest
from helpers import (
    BACKEND,
    causal_reference_logits,
    lambda_reference_logits,
    make_session,
    make_tiny_model,
    rng_ids,
)

import minillm
from minillm import attention, decode
from minillm.attention import AttentionSpec, lambda_mask
from minillm.cache import EMPTY, zeros
from minillm.session import AttentionWarning

SETTINGS = [  # (preset, n_global, n_local, ceiling); ceiling None = preset default
    ("lminfinite", 2, 8, None),
    ("lminfinite", 3, 5, 3),
    ("lminfinite", 1, 7, 12),
    ("window", 0, 6, None),
]


@pytest.mark.parametrize("name", ["gqa", "llama3_headdim_odd"])
@pytest.mark.parametrize("preset,n_global,n_local,ceiling", SETTINGS)
@pytest.mark.parametrize("chunk_size", [512, 3, 1])
def test_matches_dense_reference(tiny_dir, name, preset, n_global, n_local, ceiling, chunk_size):
    folder, torch_model = tiny_dir(name)
    model = minillm.load(folder, backend=BACKEND)
    T = 3 * n_local + 7
    ids = rng_ids(T, model.config.vocab_size, seed=3)
    session = make_session(model, preset, n_global, n_local, ceiling)
    ours = session.feed(ids, chunk_size=chunk_size)
    c = session.spec.ceiling
    ref = lambda_reference_logits(torch_model, ids, session.spec.n_global, n_local, c)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """The gqa tiny model with its queries and keys 26x longer: the sums of exp of some rows'
    unshifted scores reach e^61 (those rows must be shifted by their maximum), others stay
    within 2^64 (they are not)."""
    import torch

    folder = tmp_path_factory.mktemp("tiny_sharp")
    torch_model = make_tiny_model(folder, "gqa")
    with torch.no_grad():
        for layer in torch_model.model.layers:
            layer.self_attn.q_proj.weight *= 26
            layer.self_attn.k_proj.weight *= 26
    torch_model.save_pretrained(folder)
    return minillm.load(folder, backend=BACKEND), torch_model


@pytest.mark.parametrize("preset,n_global,n_local,ceiling", SETTINGS)
@pytest.mark.parametrize("chunk_size", [4, 1])  # query blocks, decode steps
def test_scores_beyond_exp_range_match_the_reference(sharp_model, monkeypatch, preset, n_global,
                                                      n_local, ceiling, chunk_size):
    """Softmax rows the unshifted exp cannot hold are shifted by their maximum, the others not
    (attention.exp_sums_in_range); both kinds occur here, in chunks and in decode steps."""
    model, torch_model = sharp_model
    seen, check = [], attention.exp_sums_in_range

    def spied(z):
        seen.append(check(z))
        return seen[-1]
    monkeypatch.setattr(attention, "exp_sums_in_range", spied)
    monkeypatch.setattr(decode, "exp_sums_in_range", spied)
    ids = rng_ids(3 * n_local + 7, model.config.vocab_size, seed=3)
    session = make_session(model, preset, n_global, n_local, ceiling)
    ours = session.feed(ids, chunk_size=chunk_size)
    if BACKEND == "numpy":
        assert True in seen and False in seen
    ref = lambda_reference_logits(torch_model, ids, session.spec.n_global, n_local,
                                  session.spec.ceiling)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-5)


def test_reference_differs_from_causal(tiny_dir):
    """The oracle is not trivially causal attention: past n_local the logits must change."""
    folder, torch_model = tiny_dir("gqa")
    ids = rng_ids(30, 300, seed=4)
    lam = lambda_reference_logits(torch_model, ids, 2, 8, 8)
    causal = lambda_reference_logits(torch_model, ids, 0, 10**9, None)
    assert np.abs(lam[:8] - causal[:8]).max() < 1e-4
    assert np.abs(lam[8:] - causal[8:]).max() > 1e-2


def test_equals_transformers_within_window(tiny_dir):
    folder, torch_model = tiny_dir("gqa")
    model = minillm.load(folder, backend=BACKEND)
    ids = rng_ids(64, 300, seed=5)
    ours = model.session(n_local=64).feed(ids, chunk_size=10)
    np.testing.assert_allclose(ours, causal_reference_logits(torch_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["lminfinite", "window", "full"])
def test_streaming_is_exact(tiny_model, preset):
    """Per-token NLL is the same whether fed in chunks of 1, 7, 512 or all at once."""
    ids = rng_ids(70, tiny_model.config.vocab_size, seed=6)
    results = []
    for chunk in (1, 7, 512, len(ids)):
        s = make_session(tiny_model, preset, 2, 16, None)
        results.append(s.nll(ids, chunk_size=chunk))
    # feeding in several calls continues the same stream
    s = make_session(tiny_model, preset, 2, 16, None)
    results.append(np.concatenate([s.nll(ids[a:a + 11], chunk_size=4) for a in range(0, 70, 11)]))
    assert np.isnan(results[0][0])
    for r in results[1:]:
        np.testing.assert_allclose(r[1:], results[0][1:], atol=1e-4, rtol=0)
        assert np.isnan(r[0])


def test_nll_agrees_with_feed_logits(tiny_model):
    ids = rng_ids(40, tiny_model.config.vocab_size, seed=7)
    logits = make_session(tiny_model, "lminfinite", 2, 8, None).feed(ids)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -logp[np.arange(39), ids[1:]]
    nll = make_session(tiny_model, "lminfinite", 2, 8, None).nll(ids)
    np.testing.assert_allclose(nll[1:], expected, atol=1e-4)


def test_feed_modes(tiny_model):
    ids = rng_ids(20, tiny_model.config.vocab_size, seed=8)
    all_logits = make_session(tiny_model, "lminfinite", 2, 8, None).feed(ids)
    s = make_session(tiny_model, "lminfinite", 2, 8, None)
    assert s.feed(ids[:12], logits="none") is None
    last = s.feed(ids[12:], logits="last")
    assert last.shape == (tiny_model.config.vocab_size,) and s.position == 20
    np.testing.assert_allclose(last, all_logits[-1], atol=1e-4)


@pytest.mark.parametrize("preset", ["lminfinite", "window"])
def test_constant_memory(tiny_model, preset):
    n_local = 8
    s = make_session(tiny_model, preset, 2, n_local, None)
    ids = rng_ids(20 * n_local, tiny_model.config.vocab_size, seed=9)
    # the score scratch is sized by the largest chunk fed (bounded by SCORE_BUDGET_BYTES), so
    # both phases use the same chunk size; nothing may grow with the stream itself
    s.feed(ids[:2 * n_local], chunk_size=4, logits="none")
    before = s.nbytes
    s.feed(ids[2 * n_local:], chunk_size=4, logits="none")
    assert s.position == 20 * n_local
    assert s.nbytes == before


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_a_new_cache_takes_memory_only_where_it_is_written():
    """A chunk's first slots lie in every row of the keys' [head_dim, slots] layout: only the
    pages holding them become resident, not the whole cache (as in huge pages, zeroed whole)."""
    keys = zeros((4, 64, 1 << 16), np)  # 64 MB: 256 rows of 65,536 slots
    before = rss_anon()
    keys[..., :16] = 1.0
    grown = rss_anon() - before
    assert grown < keys.nbytes // 16, f"{grown:,} bytes resident after writing 16 slots a row"
    assert keys.dtype == np.float32 and keys.flags.writeable
    assert not keys[..., 16:].any() and keys[..., :16].all()


def test_full_preset_grows_and_warns(tiny_model):
    with pytest.warns(AttentionWarning, match="grow"):
        s = tiny_model.session("full")
    s.feed(rng_ids(16, 300), logits="none")
    small = s.nbytes
    s.feed(rng_ids(3000, 300), logits="none")
    assert s.nbytes > small


def test_ring_holds_globals_and_newest(tiny_model):
    s = make_session(tiny_model, "lminfinite", 3, 8, None)
    s.feed(rng_ids(45, 300, seed=10), chunk_size=7, logits="none")
    pos = s.cache.pos
    assert list(pos[:3]) == [0, 1, 2]
    assert sorted(pos[3:]) == list(range(45 - 8, 45))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_local=0), "n_local"),
    (dict(n_global=9, n_local=8), "n_global"),
    (dict(attention="window", n_global=3), "window"),
    (dict(attention="nope"), "preset"),
    (dict(ceiling=-1), "ceiling"),
    (dict(attention="window", ceiling=5), "ceiling"),
])
def test_bad_session_settings(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.session(**kwargs)


def test_n_local_beyond_training_length_warns(tiny_model):
    with pytest.warns(AttentionWarning, match="never trained"):
        tiny_model.session(n_local=tiny_model.config.max_position_embeddings + 1)


@pytest.mark.parametrize("spec", [
    AttentionSpec("lminfinite", 3, 5, 5), AttentionSpec("lminfinite", 0, 4, 4),
    AttentionSpec("lminfinite", 4, 4, 2), AttentionSpec("window", 0, 6, None),
    AttentionSpec("full", 0, None, None)])
def test_lambda_mask_is_the_rule_written_out(spec):
    """lambda_mask against the rule as a loop: local when 0 <= i - j < n_local, capped when
    a global key (j < n_global) is further than that and there is a ceiling, else masked.
    Keys include an empty slot's position (in every query's future)."""
    queries = np.arange(0, 40)
    keys = np.concatenate([np.arange(0, 45), [EMPTY]])
    local, capped = lambda_mask(queries, keys, spec)
    window = spec.n_local if spec.n_local is not None else 10**9
    for a, i in enumerate(queries):
        for b, j in enumerate(keys):
            want_local = 0 <= i - j < window
            want_capped = (spec.ceiling is not None and j < spec.n_global and i - j >= window)
            assert (local[a, b], capped[a, b]) == (want_local, want_capped), (i, j)
    assert local.any() and (capped.any() == (spec.n_global > 0))
