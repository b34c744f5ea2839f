"""Sampling: pure functions of logits, parameters and an injected generator (minillm.sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from minillm.sampling import SamplingParams, apply_repeat_penalty, filtered_probs, sample

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # a known distribution; sorted: 1, 3, 2, 0
LOGITS = np.log(PROBS).astype(np.float32)
DRAWS = 4000


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, **OFF, **kw})


def draws(p: SamplingParams, logits=LOGITS, n=DRAWS, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([sample(logits, p, rng) for _ in range(n)])


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(50):
        logits = rng.normal(size=97).astype(np.float32) * 3
        p = SamplingParams(temperature=0)  # filters are irrelevant at temperature 0
        assert sample(logits, p, np.random.default_rng(0)) == int(np.argmax(logits))


def test_greedy_ignores_the_generator():
    logits = np.random.default_rng(2).normal(size=50).astype(np.float32)
    p = SamplingParams(temperature=0)
    assert len({sample(logits, p, np.random.default_rng(s)) for s in range(20)}) == 1


def test_no_filter_follows_the_distribution():
    p = params()
    np.testing.assert_allclose(filtered_probs(LOGITS, p), PROBS, rtol=1e-6)
    freq = np.bincount(draws(p), minlength=4) / DRAWS
    np.testing.assert_allclose(freq, PROBS, atol=0.03)


def test_temperature_rescales_logits():
    p = params(temperature=2.0)
    expected = np.sqrt(PROBS) / np.sqrt(PROBS).sum()  # softmax(log p / 2)
    np.testing.assert_allclose(filtered_probs(LOGITS, p), expected, rtol=1e-6)


def test_top_k_keeps_exactly_the_k_most_likely():
    probs = filtered_probs(LOGITS, params(top_k=2))
    np.testing.assert_allclose(probs, [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
    assert set(draws(params(top_k=2))) == {1, 3}
    assert set(draws(params(top_k=1), n=200)) == {1}
    assert set(draws(params(top_k=10), n=DRAWS)) == {0, 1, 2, 3}  # k >= V: off


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # cumulative in sorted order: 0.5, 0.8, 0.95, 1.0
    np.testing.assert_allclose(filtered_probs(LOGITS, params(top_p=0.4)), [0, 1, 0, 0])
    np.testing.assert_allclose(filtered_probs(LOGITS, params(top_p=0.75)),
                               [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
    np.testing.assert_allclose(filtered_probs(LOGITS, params(top_p=0.9)),
                               [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], rtol=1e-6)
    assert set(draws(params(top_p=0.75))) == {1, 3}
    assert set(draws(params(top_p=0.9))) == {1, 2, 3}


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    # threshold 0.25 * 0.5 = 0.125: keeps 0.5, 0.3, 0.15
    np.testing.assert_allclose(filtered_probs(LOGITS, params(min_p=0.25)),
                               [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], rtol=1e-6)
    np.testing.assert_allclose(filtered_probs(LOGITS, params(min_p=0.5)),
                               [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
    assert set(draws(params(min_p=0.5))) == {1, 3}


def test_filters_compose():
    p = params(top_k=3, top_p=0.9, min_p=0.5)  # top-k {1,3,2}, top-p keeps them, min-p drops 2
    np.testing.assert_allclose(filtered_probs(LOGITS, p), [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
    assert set(draws(p)) == {1, 3}


def test_filters_on_a_large_random_distribution():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=1000) * 2).astype(np.float32)
    order = np.argsort(-logits)
    p = params(top_k=20)
    assert set(draws(p, logits, n=2000)) <= set(order[:20].tolist())
    probs = filtered_probs(logits, params(top_p=0.5))
    kept = np.flatnonzero(probs)
    full = filtered_probs(logits, params())
    assert set(kept) == set(order[:len(kept)].tolist())              # a prefix of the sorted order
    assert full[order[:len(kept)]].sum() >= 0.5 > full[order[:len(kept) - 1]].sum()
    probs = filtered_probs(logits, params(min_p=0.1))
    assert set(np.flatnonzero(probs)) == set(np.flatnonzero(full >= 0.1 * full.max()))


def test_same_seed_same_sequence():
    logits = np.random.default_rng(4).normal(size=300).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.0, seed=1234)

    def run(params):
        rng = params.rng()
        return [sample(logits, params, rng) for _ in range(100)]

    assert run(p) == run(p)
    other = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.0, seed=4321)
    assert run(p) != run(other)


@pytest.mark.parametrize("logit", [2.0, -2.0, 0.5, -0.5])
def test_repeat_penalty_lowers_a_repeated_token(logit):
    logits = np.array([logit, 1.0, -1.0, 0.0], dtype=np.float32)
    penalized = apply_repeat_penalty(logits, recent=[0, 0], penalty=1.5)
    # CTRL rule: a positive logit is divided by the penalty, a negative one multiplied
    assert penalized[0] == pytest.approx(logit / 1.5 if logit > 0 else logit * 1.5)
    np.testing.assert_array_equal(penalized[1:], logits[1:])  # others untouched
    np.testing.assert_array_equal(logits, [logit, 1.0, -1.0, 0.0])  # input not modified
    before = filtered_probs(logits, params())[0]
    after = filtered_probs(penalized, params())[0]
    assert after < before


def test_repeat_penalty_in_sample_changes_the_greedy_choice():
    logits = np.array([3.0, 2.5, -1.0], dtype=np.float32)
    p = SamplingParams(temperature=0, repeat_penalty=2.0)
    rng = np.random.default_rng(0)
    assert sample(logits, p, rng) == 0
    assert sample(logits, p, rng, recent=[0]) == 1    # 3.0 / 2 = 1.5 < 2.5
    assert sample(logits, SamplingParams(temperature=0), rng, recent=[0]) == 0  # penalty 1: off


def test_repeat_penalty_off_or_no_history_is_identity():
    logits = np.array([1.0, -1.0], dtype=np.float32)
    assert apply_repeat_penalty(logits, [0, 1], 1.0) is logits
    assert apply_repeat_penalty(logits, [], 1.3) is logits


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
    dict(min_p=1.1), dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0), dict(repeat_last_n=-1),
    dict(max_tokens=-1),
])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampling_params_defaults_are_valid_and_frozen():
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
