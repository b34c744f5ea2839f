"""minillm.calibrate: the chunk split and score budget chosen by measurement, deterministic
given the measurements, cached per machine, BLAS build and model shape, skipped when the cache
holds a valid entry."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import BACKEND

import minillm
from minillm import calibrate, parallel, workspace
from minillm.calibrate import Settings, choose

pytestmark = pytest.mark.skipif(BACKEND != "numpy", reason="the calibration is NumPy's")

DEFAULT = Settings(2, 4 << 20)


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on, its cache in a fresh folder; the process-wide settings put back after."""
    monkeypatch.delenv("MINILLM_CALIBRATE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state, budget = dict(parallel._state), workspace.score_budget()
    parallel._state.pop("chosen", None)  # no program's own choice (other tests set one)
    yield tmp_path / "minillm" / "calibration.json"
    parallel._state.clear()
    parallel._state.update(state)
    workspace.set_score_budget(budget)


def fake_measure(monkeypatch, measured):
    """measure() returns `measured` and counts its calls."""
    calls = []

    def measure(model):
        calls.append(model)
        return measured
    monkeypatch.setattr(calibrate, "measure", measure)
    return calls


def test_choose_takes_the_fastest():
    measured = {"workers": {1: 0.030, 2: 0.020, 4: 0.025}, "score_budget": {1 << 20: 0.010,
                                                                           4 << 20: 0.015}}
    assert choose(measured, DEFAULT) == Settings(2, 1 << 20)
    assert choose(measured, Settings(4, 4 << 20)) == Settings(2, 1 << 20)


def test_choose_keeps_the_default_within_the_margin():
    """Noise must not flip a setting: a default within 5% of the fastest stays."""
    measured = {"workers": {1: 0.0200, 2: 0.0209}, "score_budget": {1 << 20: 0.0100,
                                                                  4 << 20: 0.0104}}
    assert choose(measured, DEFAULT) == DEFAULT
    measured["workers"][2] = 0.0211  # 5.5% slower: now the split loses
    assert choose(measured, DEFAULT).workers == 1


def test_choose_is_deterministic_and_breaks_ties_by_the_smaller():
    measured = {"workers": {"8": 0.01, "4": 0.01}, "score_budget": {"16": 0.5, "4": 0.5}}
    assert choose(measured, Settings(1, 1)) == Settings(4, 4)  # keys as JSON gives them back
    assert all(choose(measured, Settings(1, 1)) == Settings(4, 4) for _ in range(5))


def test_candidates_cover_the_cores():
    assert calibrate.candidate_workers(1) == [1]
    assert calibrate.candidate_workers(2) == [1, 2]
    assert calibrate.candidate_workers(6) == [1, 2, 4, 6]
    assert calibrate.candidate_workers(16) == [1, 2, 4, 8, 16]


def test_first_load_measures_and_caches_then_loads_skip_it(tiny_dir, monkeypatch, calibrating):
    folder, _ = tiny_dir("gqa")
    calls = fake_measure(monkeypatch, {"workers": {1: 0.01, 2: 0.03},
                                       "score_budget": {1 << 20: 0.02, 4 << 20: 0.01}})
    minillm.load(folder, backend="numpy")
    assert len(calls) == 1
    assert (parallel.workers(), workspace.score_budget()) == (1, 4 << 20)
    entries = json.loads(calibrating.read_text())
    assert len(entries) == 1
    key, entry = next(iter(entries.items()))
    assert json.loads(key)["shape"] == [64, 96, 4, 2, 16]
    assert entry["settings"] == {"workers": 1, "score_budget": 4 << 20}
    workspace.set_score_budget(1 << 20)
    minillm.load(folder, backend="numpy")  # cached: no measuring, the same settings applied
    assert len(calls) == 1
    assert (parallel.workers(), workspace.score_budget()) == (1, 4 << 20)


def test_a_split_the_program_chose_stays(tiny_dir, monkeypatch, calibrating):
    fake_measure(monkeypatch, {"workers": {1: 0.01, 2: 0.03}, "score_budget": {4 << 20: 0.01}})
    parallel.set_workers(2)
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert parallel.workers() == 2


def test_refresh_measures_again(tiny_dir, monkeypatch, calibrating):
    folder, _ = tiny_dir("gqa")
    calls = fake_measure(monkeypatch, {"workers": {1: 0.01}, "score_budget": {4 << 20: 0.01}})
    minillm.load(folder, backend="numpy")
    monkeypatch.setenv("MINILLM_CALIBRATE", "refresh")
    minillm.load(folder, backend="numpy")
    assert len(calls) == 2
    monkeypatch.delenv("MINILLM_CALIBRATE")
    calibrate.settings_for(minillm.load(folder, backend="numpy"), refresh=True)
    assert len(calls) == 3


def test_another_shape_or_machine_is_measured_apart(tiny_dir, monkeypatch, calibrating):
    calls = fake_measure(monkeypatch, {"workers": {1: 0.01}, "score_budget": {4 << 20: 0.01}})
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    minillm.load(tiny_dir("mha_tied")[0], backend="numpy")
    assert len(calls) == 2
    monkeypatch.setattr(calibrate, "blas_build", lambda: "another BLAS threads=7")
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert len(calls) == 3
    assert len(json.loads(calibrating.read_text())) == 3


def test_off_measures_nothing_and_writes_nothing(tiny_dir, monkeypatch, calibrating):
    monkeypatch.setenv("MINILLM_CALIBRATE", "off")
    calls = fake_measure(monkeypatch, {})
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert not calls and not calibrating.exists()


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"k": 1}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(tiny_dir, monkeypatch, calibrating,
                                                          content):
    calibrating.parent.mkdir(parents=True)
    calibrating.write_text(content)
    calls = fake_measure(monkeypatch, {"workers": {1: 0.01}, "score_budget": {4 << 20: 0.01}})
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert len(calls) == 1
    minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert len(calls) == 1


def test_an_unwritable_cache_warns_and_still_applies(tiny_dir, monkeypatch, calibrating):
    calibrating.parent.parent.mkdir(parents=True, exist_ok=True)
    calibrating.parent.write_text("a file where the folder should be")
    fake_measure(monkeypatch, {"workers": {1: 0.01, 2: 0.5}, "score_budget": {4 << 20: 0.01}})
    parallel.use_calibrated(2)
    with pytest.warns(UserWarning, match="could not save the calibration"):
        minillm.load(tiny_dir("gqa")[0], backend="numpy")
    assert parallel.workers() == 1


def test_a_real_measurement_on_a_tiny_model(tiny_dir, calibrating):
    """measure() itself: positive times for every candidate, settings among them, and the
    process-wide settings as they were before it."""
    model = minillm.load(tiny_dir("gqa")[0], backend="numpy")
    before = dict(parallel._state), workspace.score_budget()
    measured = calibrate.measure(model)
    assert set(measured["workers"]) == set(calibrate.candidate_workers(parallel.thread_limit()))
    assert set(measured["score_budget"]) == set(calibrate.SCORE_BUDGETS)
    assert all(np.isfinite(t) and t > 0 for part in measured.values() for t in part.values())
    assert (dict(parallel._state), workspace.score_budget()) == before
    assert os.path.exists(calibrating)  # the load before measured and saved too


def test_the_calibrate_command_measures_again_and_saves(tiny_file, monkeypatch, calibrating):
    from helpers import invoke_cli
    calls = fake_measure(monkeypatch, {"workers": {1: 0.02, 2: 0.01},
                                       "score_budget": {1 << 20: 0.01, 4 << 20: 0.02}})
    for _ in range(2):  # cached or not, the command measures
        result = invoke_cli("calibrate", str(tiny_file), "--json")
        assert result.returncode == 0, result.stderr
    assert len(calls) == 2
    out = json.loads(result.stdout)
    assert (out["workers"], out["score_budget"]) == (2, 1 << 20)
    assert out["cache"] == str(calibrating) and calibrating.exists()
    monkeypatch.setenv("MINILLM_CALIBRATE", "off")  # asked for: measures even so
    result = invoke_cli("calibrate", str(tiny_file))
    assert result.returncode == 0, result.stderr
    assert len(calls) == 3
    assert b"threads per long chunk" in result.stdout and b"<- chosen" in result.stdout
    assert os.environ["MINILLM_CALIBRATE"] == "off"
