"""Interrupting a chunk (issue 12): nothing reaches the cache before the chunk's commit, so an
exception or a signal between two layers leaves the session exactly at the chunk boundary
before it; SIGINT/SIGTERM stop a chunk within a layer, a second one at once; `minillm score`
stops within a second at any chunk size and its checkpoint stays whole."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import STDLIB, TIMEOUT, cli_env, default_sigint, make_session, minillm_command, rng_ids

import minillm.model
from minillm.backend import to_host
from minillm.checkpoint import read_checkpoint
from minillm.model import ChunkAbandoned, forward
from minillm.scoring import Scorer
from minillm.session import Interrupted

# name -> (session settings, tokens fed before, tokens in the chunk that is cut short)
CASES = {
    # positions 30..41 into a ring of 16 slots (14..29 there before): the slots wrap around
    "ring_wraps": (("lminfinite", 4, 16, None), 30, 12),
    # positions 0..11: the first four are global, kept rotated and un-rotated
    "global_positions": (("lminfinite", 4, 16, None), 0, 12),
    # positions 1020..1031: past the unbounded cache's first 1024 slots, so it must grow
    "full": (("full", None, None, None), 1020, 12),
}


def cache_state(session) -> dict:
    """Host copies of everything a session holds between chunks."""
    c = session.cache
    last = session.last_hidden
    return {"k": to_host(c.k).copy(), "v": to_host(c.v).copy(), "k_raw": to_host(c.k_raw).copy(),
            "pos": c.pos.copy(), "length": c.length,
            "last_hidden": None if last is None else to_host(last).copy()}


def assert_same_state(a: dict, b: dict) -> None:
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].shape == b[key].shape, key
            assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def started(model, case: str):
    """(a session that has been fed the case's first tokens, the chunk, the tokens after it)."""
    settings, n_before, n_chunk = CASES[case]
    ids = rng_ids(n_before + 2 * n_chunk, model.config.vocab_size, seed=3)
    session = make_session(model, *settings)
    if n_before:
        session.feed(ids[:n_before], logits="none")
    return session, ids[n_before:n_before + n_chunk], ids[n_before + n_chunk:]


def assert_continues_exactly(model, case: str, session, chunk, after) -> None:
    """The session goes on to the very logits of one that was never interrupted."""
    reference, _, _ = started(model, case)
    np.testing.assert_array_equal(session.feed(chunk), reference.feed(chunk))
    np.testing.assert_array_equal(session.feed(after, chunk_size=5),
                                  reference.feed(after, chunk_size=5))


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt (Python's default) during the test, even in a pytest
    started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Handler:
    """A signal handler that returns (as `minillm score`'s does): it only counts its calls."""

    def __init__(self, *signals):
        self.calls = []
        self.previous = {s: signal.signal(s, self) for s in signals}

    def __call__(self, signum, frame):
        self.calls.append(signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@pytest.fixture
def handler():
    """handler(*signals): a Handler installed for them, the previous ones put back after."""
    made = []

    def install(*signals):
        made.append(Handler(*signals))
        return made[-1]

    yield install
    for h in made:
        h.restore()


def at_layer(monkeypatch, layer: int, action, chunk_number: int = 1):
    """Run action() inside `layer` of the chunk_number-th chunk (1: the first) from now on,
    after the layer's attention (its keys and values are staged by then)."""
    attend, chunks_seen = minillm.model.attend, [0]

    def attend_then_act(at, chunk):
        out = attend(at, chunk)
        chunks_seen[0] += at == 0
        if at == layer and chunks_seen[0] == chunk_number:
            action()
        return out

    monkeypatch.setattr(minillm.model, "attend", attend_then_act)


def sigint():
    os.kill(os.getpid(), signal.SIGINT)


# --- nothing reaches the cache before the commit ----------------------------------------------

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer", [0, 1])
def test_stop_between_layers_abandons_the_chunk(tiny_model, case, layer):
    session, chunk, after = started(tiny_model, case)
    before = cache_state(session)
    calls = []

    def stop():  # asked before every layer: says stop before `layer`
        calls.append(len(calls))
        return len(calls) > layer

    m = tiny_model
    positions = np.arange(session.position, session.position + len(chunk))
    with pytest.raises(ChunkAbandoned):
        forward(m.weights, m.config, m.freq, chunk, positions, session.spec, session.cache,
                session.workspace, stop=stop)
    assert len(calls) == layer + 1
    assert_same_state(cache_state(session), before)
    assert_continues_exactly(tiny_model, case, session, chunk, after)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer", [0, 1])
def test_an_error_inside_a_layer_leaves_the_session_as_it_was(tiny_model, monkeypatch, case,
                                                              layer):
    """Layer 1 is the last: every layer's keys are staged, none committed."""
    session, chunk, after = started(tiny_model, case)
    before = cache_state(session)

    def fail():
        raise RuntimeError("inside the forward pass")

    at_layer(monkeypatch, layer, fail)
    with pytest.raises(RuntimeError, match="inside the forward"):
        session.feed(chunk)
    monkeypatch.undo()
    assert_same_state(cache_state(session), before)
    assert_continues_exactly(tiny_model, case, session, chunk, after)


# --- signals while a chunk runs -----------------------------------------------------------------

def test_ctrl_c_stops_a_chunk_before_its_next_layer(tiny_model, monkeypatch, sigint_raises):
    """Of a feed in chunks of 5, the first gets in; Ctrl-C in the second stops it before its
    layer 1, and the session stays after the first."""
    session, chunk, after = started(tiny_model, "ring_wraps")
    layers_run, block = [], minillm.model.block

    def counted_block(x, lw, layer, c):
        layers_run.append(layer)
        return block(x, lw, layer, c)

    monkeypatch.setattr(minillm.model, "block", counted_block)
    at_layer(monkeypatch, 0, sigint, chunk_number=2)
    with pytest.raises(KeyboardInterrupt):
        session.feed(chunk, chunk_size=5)
    monkeypatch.undo()
    assert layers_run == [0, 1, 0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    reference, _, _ = started(tiny_model, "ring_wraps")
    reference.feed(chunk[:5])
    assert_same_state(cache_state(session), cache_state(reference))
    np.testing.assert_array_equal(session.feed(chunk[5:]), reference.feed(chunk[5:]))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_handler_that_returns_gets_the_signal_and_the_feed_raises_interrupted(
        tiny_model, monkeypatch, handler, signum):
    """The program's handler hears of the signal once, after the chunk was abandoned; feed
    must not return as if the chunk was fed."""
    h = handler(signal.SIGINT, signal.SIGTERM)
    session, chunk, _ = started(tiny_model, "global_positions")
    before = cache_state(session)
    heard_inside = []

    def signal_once():
        os.kill(os.getpid(), signum)
        heard_inside.append(h.calls[:])

    at_layer(monkeypatch, 0, signal_once)
    with pytest.raises(Interrupted) as caught:
        session.nll(chunk)
    assert caught.value.signum == signum
    assert heard_inside == [[]] and h.calls == [signum]  # held during the chunk, then delivered
    assert_same_state(cache_state(session), before)
    assert signal.getsignal(signal.SIGINT) is h and signal.getsignal(signal.SIGTERM) is h


def test_an_ignored_signal_does_not_stop_the_chunk(tiny_model, monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        session, chunk, after = started(tiny_model, "ring_wraps")
        at_layer(monkeypatch, 0, sigint)
        logits = session.feed(chunk)
    finally:
        signal.signal(signal.SIGINT, previous)
    reference, _, _ = started(tiny_model, "ring_wraps")
    np.testing.assert_array_equal(logits, reference.feed(chunk))


def test_a_second_ctrl_c_raises_at_once(tiny_model, monkeypatch, sigint_raises):
    session, chunk, after = started(tiny_model, "ring_wraps")
    before = cache_state(session)
    reached = []

    def twice():
        sigint()  # held until the layer ends
        reached.append("after the first")
        sigint()  # raises KeyboardInterrupt here, in the middle of the layer
        reached.append("after the second")

    at_layer(monkeypatch, 0, twice)
    with pytest.raises(KeyboardInterrupt):
        session.feed(chunk)
    assert reached == ["after the first"]
    assert_same_state(cache_state(session), before)
    monkeypatch.undo()
    assert_continues_exactly(tiny_model, "ring_wraps", session, chunk, after)


def test_a_second_signal_reaches_a_returning_handler_at_once(tiny_model, monkeypatch, handler):
    h = handler(signal.SIGINT, signal.SIGTERM)
    session, chunk, _ = started(tiny_model, "ring_wraps")
    before = cache_state(session)
    heard = []

    def twice():
        os.kill(os.getpid(), signal.SIGTERM)
        heard.append(h.calls[:])
        sigint()
        heard.append(h.calls[:])

    at_layer(monkeypatch, 0, twice)
    with pytest.raises(Interrupted) as caught:
        session.feed(chunk)
    assert heard == [[], [signal.SIGTERM, signal.SIGINT]]  # both, in order, at the second
    assert caught.value.signum == signal.SIGTERM and h.calls == [signal.SIGTERM, signal.SIGINT]
    assert_same_state(cache_state(session), before)


def test_signals_during_the_commit_wait_for_its_end(tiny_model, monkeypatch, sigint_raises):
    """The chunk is then in: KeyboardInterrupt comes after it, with the session past it."""
    session, chunk, after = started(tiny_model, "ring_wraps")
    commit = session.cache.commit

    def interrupted_commit(*args):
        sigint()
        sigint()
        commit(*args)

    monkeypatch.setattr(session.cache, "commit", interrupted_commit)
    with pytest.raises(KeyboardInterrupt):
        session.feed(chunk)
    monkeypatch.undo()
    reference, _, _ = started(tiny_model, "ring_wraps")
    reference.feed(chunk)
    assert_same_state(cache_state(session), cache_state(reference))
    np.testing.assert_array_equal(session.feed(after), reference.feed(after))


def test_off_the_main_thread_signals_are_left_alone(tiny_model):
    session, chunk, _ = started(tiny_model, "ring_wraps")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out, errors = [], []

    def feed():
        try:
            out.append(session.feed(chunk))
        except BaseException as e:  # signal.signal raises ValueError off the main thread
            errors.append(e)

    thread = threading.Thread(target=feed)
    thread.start()
    thread.join()
    assert errors == [] and session.position == 30 + len(chunk)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# --- the scorer stops where the session stopped -------------------------------------------------

@pytest.mark.parametrize("chunk_size, chunk_number, fed", [
    (8, 3, 16),   # stopped in the third chunk, positions 16..23
    # a chunk longer than n_local (16) that holds global positions is fed as 0..3 and 4..23:
    # stopped in the second part, the first is in, and so counted
    (24, 2, 4),
])
def test_the_scorer_stops_where_the_session_stopped_and_resumes(tiny_model, monkeypatch, handler,
                                                                tmp_path, chunk_size,
                                                                chunk_number, fed):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12).encode()
    path = tmp_path / "text.txt"
    path.write_bytes(text)

    def scorer():
        return Scorer(tiny_model.session(n_global=4, n_local=16), chunk_size)

    with open(path, "rb") as f:
        reference = scorer().run(f)
    h = handler(signal.SIGINT)
    stopped = scorer()
    at_layer(monkeypatch, 0, sigint, chunk_number=chunk_number)
    with open(path, "rb") as f:
        partial = stopped.run(f, stop=lambda: bool(h.calls))
    monkeypatch.undo()
    assert h.calls == [signal.SIGINT]
    assert partial.tokens == stopped.session.position == fed
    stopped.save(tmp_path / "run.ckpt")
    resumed = Scorer.resume(tmp_path / "run.ckpt", tiny_model, stopped.session.spec, chunk_size)
    with open(path, "rb") as f:
        resumed.seek_input(f, True)
        result = resumed.run(f)
    for key in ("tokens", "predicted", "n_bytes"):
        assert getattr(result, key) == getattr(reference, key), key
    # resumed at 4, the second case is fed in other chunks (4..27, ...) than the reference
    # (4..23, 24..47, ...): equal to float32 rounding only
    assert result.total_nll == pytest.approx(reference.total_nll, rel=0 if fed == 16 else 1e-6)


# --- `minillm score` on the real model ----------------------------------------------------------

TEXT = STDLIB / "argparse.py"  # ~25K SmolLM2 tokens in one piece
FIRST = 300   # tokens scored before the 4096-token chunk that is interrupted
LATENCY_LIMIT_S = 5.0


def score_cmd(model, *args) -> list[str]:
    return minillm_command() + ["score", str(model), str(TEXT), "--chunk-size", "4096",
                                *map(str, args)]


def run_score(model, *args) -> dict:
    """An uninterrupted run: its --json summary."""
    result = subprocess.run(score_cmd(model, *args, "--json"), capture_output=True,
                            env=cli_env(), timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout.decode().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def first_checkpoint(real_model_path, tmp_path_factory):
    """(checkpoint after FIRST tokens, the CPU seconds the run that wrote it took: a process
    that has run longer than that on the same work is surely inside its next chunk)."""
    if not Path("/proc/self/stat").exists() or not TEXT.exists():
        pytest.skip("needs Linux's /proc and the standard library's argparse.py")
    ckpt = tmp_path_factory.mktemp("interrupt") / "first.ckpt"
    cpu = children_cpu()
    s = run_score(real_model_path, "--max-tokens", FIRST, "--checkpoint", ckpt,
                  "--checkpoint-every", FIRST)
    assert s["tokens"] == FIRST and ckpt.exists()
    return ckpt, children_cpu() - cpu


def start_inside_a_chunk(model, resume: Path, checkpoint: Path, startup_cpu: float):
    """A run resuming `resume` (a 4096-token chunk next), returned once it has spent a second
    more CPU time than a whole run of FIRST tokens: inside that chunk."""
    proc = subprocess.Popen(score_cmd(model, "--resume", resume, "--checkpoint", checkpoint),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_sigint)
    deadline = time.monotonic() + TIMEOUT
    while cpu_seconds(proc.pid) < startup_cpu + 1.0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def load(path: Path, model):
    """(the checkpoint's session state, its record)."""
    session, meta = read_checkpoint(str(path), model)
    return cache_state(session), meta


@pytest.mark.real_model
def test_ctrl_c_stops_a_4096_token_chunk_within_seconds_and_resumes_exactly(
        real_model, real_model_path, first_checkpoint, tmp_path):
    first, startup_cpu = first_checkpoint
    stopped = tmp_path / "stopped.ckpt"
    proc = start_inside_a_chunk(real_model_path, first, stopped, startup_cpu)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    latency = time.monotonic() - sent
    print(f"\nCtrl-C inside a 4096-token chunk: exit after {latency:.2f} s", file=sys.stderr)
    assert proc.returncode == 130, err.decode()
    assert latency < LATENCY_LIMIT_S
    assert f"interrupted after {FIRST} tokens" in err.decode() and "perplexity" in err.decode()
    # the abandoned chunk left nothing: the checkpoint holds what the one it resumed held
    (state, meta), (state0, meta0) = load(stopped, real_model), load(first, real_model)
    assert_same_state(state, state0)
    assert {k: v for k, v in meta.items() if k != "seconds"} == \
        {k: v for k, v in meta0.items() if k != "seconds"}
    through_stop = run_score(real_model_path, "--resume", stopped, "--max-tokens", 2 * FIRST)
    straight = run_score(real_model_path, "--resume", first, "--max-tokens", 2 * FIRST)
    for key in ("tokens", "predicted", "mean_nll", "bits_per_byte", "bytes"):
        assert through_stop[key] == straight[key], key


@pytest.mark.real_model
def test_a_second_ctrl_c_exits_at_once_and_the_checkpoint_stays_whole(
        real_model, real_model_path, first_checkpoint, tmp_path):
    first, startup_cpu = first_checkpoint
    ckpt = tmp_path / "run.ckpt"
    for _ in range(3):
        shutil.copy(first, ckpt)  # resumed and written to the same file, as one usually does
        proc = start_inside_a_chunk(real_model_path, ckpt, ckpt, startup_cpu)
        sent = time.monotonic()
        # two signals sent at once may reach the process as one: repeat until it has heard two
        while proc.poll() is None and time.monotonic() - sent < LATENCY_LIMIT_S:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        out, err = proc.communicate(timeout=TIMEOUT)
        latency = time.monotonic() - sent
        # the first Ctrl-C alone may finish the run before a second one arrives: run again
        if "interrupted again" in err.decode() or proc.returncode != 130:
            break
    print(f"\nCtrl-C twice inside a 4096-token chunk: exit after {latency:.2f} s",
          file=sys.stderr)
    assert proc.returncode == 130, err.decode()
    assert "interrupted again" in err.decode() and "Traceback" not in err.decode()
    assert latency < LATENCY_LIMIT_S
    if ckpt.exists():  # the previous checkpoint, or a whole new one: never a damaged file
        state, meta = load(ckpt, real_model)
        assert_same_state(state, load(first, real_model)[0])
        assert meta["tokens"] == FIRST
