"""`minillm score` end to end on a tiny single-file model (issue 3; the score contract in
docs/DESIGN.md, "Interfaces others rely on").

The numbers are checked against the library (`tokenizer.encode`, `Session.nll`); the streaming,
checkpoint/resume, signal and closed-pipe behaviour through the real process; usage errors in
this process (click's CliRunner).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    BACKEND,
    STDLIB,
    TIMEOUT,
    assert_one_line_error,
    assert_usage_error,
    cli_env,
    invoke_cli,
    minillm_command,
    run_cli,
    stderr_lines,
)

import minillm
from minillm.textstream import MAX_RUN, READ_BLOCK, read_pieces

JSON_KEYS = ("tokens", "mean_nll", "perplexity", "bits_per_byte", "seconds", "tokens_per_second")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "hello", "world,",
         "hello", "minillm", "naïve", "café", "Ωμέγα", "日本語", "😀", "👍🏽", "x=1;", "3.14159",
         "1,234", "2024-11-26", "it's", "don't", "(a)", "«quoted»", "AB12cd", "UPPER", "snake_case",
         "a.b", "—", "...", "\\n"]
SEPARATORS = [" "] * 8 + ["  ", "\n", " \n", "\t", "", "\r\n", "\n\n", "   "]


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    """Words, numbers, unicode, emoji and whitespace runs of every kind."""
    rng = random.Random(seed)
    parts, n = [], 0
    while n < n_bytes:
        if rng.random() < 0.85:
            w = rng.choice(WORDS)
        else:
            w = str(rng.randrange(10 ** rng.randrange(1, 9)))
        part = w + rng.choice(SEPARATORS)
        parts.append(part)
        n += len(part.encode("utf-8"))
    return "".join(parts)


def training_words_text(n_bytes: int, seed: int = 0) -> str:
    """Text of the tiny tokenizer's own words (~3 bytes a token): many tokens per second."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "hello",
             "world,", "hello", "minillm"]
    lines, n = [], 0
    while n < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(12)) + ".\n"
        lines.append(line)
        n += len(line)
    return "".join(lines)


# --- running the command line -----------------------------------------------------------------

def score_cmd(model, *args) -> list[str]:
    return minillm_command() + ["score", str(model)] + [str(a) for a in args]


def score(model, *args, stdin: bytes | None = b""):
    """`minillm score MODEL ARGS` as a process."""
    return run_cli("score", model, *args, stdin=stdin)


def summary_of(result) -> dict:
    """The --json object: exactly one JSON object, on the last line of stdout, strict JSON."""
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, (result.returncode, err)
    assert "Traceback" not in err
    lines = result.stdout.decode("utf-8").splitlines()
    assert lines, "no output"

    def strict(name):
        raise ValueError(f"not strict JSON: {name}")
    s = json.loads(lines[-1], parse_constant=strict)
    assert isinstance(s, dict)
    for key in JSON_KEYS:
        assert key in s, (key, s)
    return s


def warnings_of(result) -> list[str]:
    return [line for line in stderr_lines(result) if "warning" in line]


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_file):
    return minillm.load(tiny_file, backend=BACKEND)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A few KB of mixed text: longer than the tiny model's 64-token training length."""
    path = tmp_path_factory.mktemp("score_text") / "mixed.txt"
    path.write_text(mixed_text(4000, seed=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_file_json(tiny_file, text_file):
    """`minillm score TINY text_file --json`: one run that several tests read."""
    return score(tiny_file, text_file, "--json")


def reference_nll(model, ids, **session_kw) -> np.ndarray:
    return model.session(**session_kw).nll(ids).astype(np.float64)


# --- empty and unclean input ---------------------------------------------------------------------

def test_empty_stdin_is_nothing_to_score(tiny_file):
    assert_one_line_error(score(tiny_file, stdin=b""), "nothing to score")


def test_empty_file_is_nothing_to_score(tiny_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_one_line_error(score(tiny_file, empty, "--json"), "nothing to score")


def test_missing_input_file(tiny_file, tmp_path):
    assert_one_line_error(score(tiny_file, tmp_path / "nope.txt"), "nope.txt")


UNCLEAN = {
    "binary": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
    "invalid_utf8": "héllo wörld ".encode() * 20 + b"\xff\xfe\xc3 and more \xe2\x82" * 5,
    "nul_bytes": b"hello\x00world \x00\x00 the quick brown fox" * 10,
    "both": b"\x00\xff" * 50 + b" text after the garbage " * 10,
}


@pytest.mark.parametrize("kind", UNCLEAN)
def test_unclean_input_warns_once_and_is_scored(tiny_file, model, kind):
    data = UNCLEAN[kind]
    result = score(tiny_file, "--json", stdin=data)
    s = summary_of(result)
    assert len(stderr_lines(result)) == 1, result.stderr
    assert len(warnings_of(result)) == 1
    text = data.decode("utf-8", errors="replace")
    assert s["tokens"] == len(model.tokenizer.encode(text))
    assert math.isfinite(s["mean_nll"]) and s["mean_nll"] > 0


def test_unclean_input_across_many_pieces_warns_once():
    """Garbage throughout a stream of many pieces still gives one warning."""
    data = b"hello world \xff\x00 " * 20_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pieces = list(read_pieces(io.BytesIO(data), block=1024))
    assert len(pieces) > 100
    assert len(caught) == 1
    assert "UTF-8" in str(caught[0].message) and "NUL" in str(caught[0].message)
    assert "".join(p.text for p in pieces) == data.decode("utf-8", errors="replace")


def test_a_50mb_line_without_whitespace(tiny_file):
    """Cut anyway after MAX_RUN bytes, with a warning; only a bounded prefix is ever read."""
    total, block = 50 * 10 ** 6, b"abcdefghij" * 6554
    proc = subprocess.Popen(score_cmd(tiny_file, "--max-tokens", "64", "--json"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())
    written = 0

    def feed():
        nonlocal written
        try:
            while written < total:
                n = min(len(block), total - written)
                proc.stdin.write(block[:n])
                written += n
        except (BrokenPipeError, ValueError):
            pass  # the scorer stopped reading: that is the point
        _close_quietly(proc.stdin)

    start = time.monotonic()
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    out, err = proc.stdout.read(), proc.stderr.read()
    rc = proc.wait(timeout=TIMEOUT)
    proc.stdout.close()
    proc.stderr.close()
    elapsed = time.monotonic() - start
    writer.join(timeout=10)
    result = subprocess.CompletedProcess(proc.args, rc, out, err)
    s = summary_of(result)
    assert s["tokens"] == 64
    (warning,) = warnings_of(result)
    assert "cutting inside a word" in warning
    # the stream was not read whole: a piece of at most MAX_RUN bytes, plus what a pipe buffers
    assert written < 4 * MAX_RUN, written
    assert elapsed < 60


def test_read_pieces_is_lazy_on_a_line_without_whitespace():
    class Endless(io.RawIOBase):
        def __init__(self, size):
            self.size, self.pos = size, 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.size - self.pos)
            b[:n] = b"x" * n
            self.pos += n
            return n

    stream = io.BufferedReader(Endless(50 * 10 ** 6))
    pieces = read_pieces(stream)
    with pytest.warns(UserWarning, match="cutting inside a word"):
        first = next(pieces)
    second = next(pieces)
    assert first.start == 0 and len(first.raw) == MAX_RUN and second.start == MAX_RUN
    assert len(second.raw) <= MAX_RUN
    assert stream.raw.pos <= 2 * MAX_RUN + 2 * READ_BLOCK  # read as it goes, never whole


# --- attention settings --------------------------------------------------------------------------

def test_n_local_beyond_the_training_length_warns(tiny_file, text_file):
    result = score(tiny_file, text_file, "--json", "--n-local", "100")
    summary_of(result)
    (warning,) = warnings_of(result)
    assert "100" in warning and "training length" in warning


@pytest.mark.parametrize("args,needle", [
    (["--n-local", "0"], "--n-local"),
    (["--n-global", "5", "--n-local", "3"], "n_global"),
    (["--n-global", "-1"], "--n-global"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--attention", "sliding"], "--attention"),
    (["--attention", "window", "--n-global", "4"], "n_global"),
])
def test_bad_settings_are_usage_errors(tiny_file, args, needle):
    assert_usage_error(invoke_cli("score", tiny_file, *args, stdin=b"hello world"), needle)


def test_window_preset_matches_the_library(tiny_file, text_file, model):
    s = summary_of(score(tiny_file, text_file, "--json", "--attention", "window",
                         "--n-local", "16"))
    ids = model.tokenizer.encode(text_file.read_bytes().decode("utf-8"))
    nll = reference_nll(model, ids, attention="window", n_local=16)
    assert s["tokens"] == len(ids)
    assert s["mean_nll"] == pytest.approx(np.mean(nll[1:]), abs=1e-5)


def test_full_preset_works_and_warns(tiny_file, text_file, model):
    result = score(tiny_file, text_file, "--json", "--attention", "full")
    s = summary_of(result)
    (warning,) = warnings_of(result)
    assert "memory" in warning
    ids = model.tokenizer.encode(text_file.read_bytes().decode("utf-8"))
    with pytest.warns(UserWarning):
        nll = reference_nll(model, ids, attention="full")
    assert s["mean_nll"] == pytest.approx(np.mean(nll[1:]), abs=1e-5)


# --- the numbers ---------------------------------------------------------------------------------

def test_json_summary_matches_the_library(text_file_json, text_file, model):
    result = text_file_json
    s = summary_of(result)
    assert result.stderr == b""
    text = text_file.read_bytes().decode("utf-8")
    ids = model.tokenizer.encode(text)
    nll = reference_nll(model, ids)
    assert len(ids) > 3 * model.config.max_position_embeddings  # past the window
    assert s["tokens"] == len(ids)
    assert s["mean_nll"] == pytest.approx(np.mean(nll[1:]), abs=1e-5)
    assert s["perplexity"] == pytest.approx(math.exp(s["mean_nll"]), rel=1e-9)
    total = s["mean_nll"] * (len(ids) - 1)
    assert s["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode("utf-8")),
                                               rel=1e-9)
    assert s["seconds"] > 0 and s["tokens_per_second"] > 0


def test_json_is_the_last_line_and_the_text_summary_without_it(tiny_file, text_file):
    plain = score(tiny_file, text_file)
    assert plain.returncode == 0
    out = plain.stdout.decode()
    for word in ("tokens", "mean NLL", "perplexity", "bits per byte", "tokens/s"):
        assert word in out
    with pytest.raises(ValueError):
        json.loads(out.splitlines()[-1])


def test_from_stdin_equals_from_a_file(tiny_file, text_file, text_file_json):
    a = summary_of(text_file_json)
    b = summary_of(score(tiny_file, "-", "--json", stdin=text_file.read_bytes()))
    c = summary_of(score(tiny_file, "--json", stdin=text_file.read_bytes()))
    for key in ("tokens", "mean_nll", "bits_per_byte"):
        assert a[key] == b[key] == c[key]


def test_single_token_is_strict_json(tiny_file):
    """Nothing predicted: the NaN mean is null, not the NaN literal that JSON does not have."""
    s = summary_of(score(tiny_file, "--json", stdin=b"a"))
    assert s["tokens"] == 1 and s["mean_nll"] is None and s["perplexity"] is None


@pytest.mark.parametrize("n", [1, 2, 50, 200])
def test_max_tokens(tiny_file, text_file, model, n):
    s = summary_of(score(tiny_file, text_file, "--json", "--max-tokens", n, "--chunk-size", 32))
    ids = model.tokenizer.encode(text_file.read_bytes().decode("utf-8"))[:n]
    assert s["tokens"] == n
    if n > 1:
        assert s["mean_nll"] == pytest.approx(np.mean(reference_nll(model, ids)[1:]), abs=1e-5)
        # bytes of the scored tokens only
        nbytes = len(model.tokenizer.decode(ids).encode("utf-8"))
        assert s["bits_per_byte"] == pytest.approx(
            s["mean_nll"] * (n - 1) / math.log(2) / nbytes, rel=1e-9)


def test_nll_out(tiny_file, text_file, model, tmp_path):
    out = tmp_path / "nll.tsv"
    s = summary_of(score(tiny_file, text_file, "--json", "--nll-out", out, "--chunk-size", 7))
    ids = model.tokenizer.encode(text_file.read_bytes().decode("utf-8"))
    nll = reference_nll(model, ids)
    lines = out.read_text().splitlines()
    assert len(lines) == s["tokens"] - 1 == len(ids) - 1  # one per prediction, no header
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == 3 for r in rows)
    positions = [int(r[0]) for r in rows]
    assert positions == list(range(1, len(ids)))
    assert [int(r[1]) for r in rows] == ids[1:]
    got = np.array([float(r[2]) for r in rows])
    np.testing.assert_allclose(got, nll[1:], atol=2e-5)
    assert np.mean(got) == pytest.approx(s["mean_nll"], abs=1e-5)


def test_plot(tiny_file, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "nll.png"
    summary_of(score(tiny_file, text_file, "--json", "--plot", png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- streaming tokenization ----------------------------------------------------------------------

def _ids_by_pieces(tokenizer, data: bytes, block: int) -> tuple[list[int], int]:
    ids, n = [], 0
    for piece in read_pieces(io.BytesIO(data), block=block):
        ids += tokenizer.encode_continuation(piece.text, first=piece.start == 0)
        n += 1
    return ids, n


@pytest.mark.parametrize("block", [64, 4096])
def test_streaming_tokenization_equals_whole_text(model, block):
    data = mixed_text(2 * 10 ** 6 if block == 4096 else 200_000, seed=2).encode("utf-8")
    ids, n_pieces = _ids_by_pieces(model.tokenizer, data, block)
    assert n_pieces > 20
    assert ids == model.tokenizer.encode(data.decode("utf-8"))


@pytest.fixture(scope="module")
def real_tokenizer(real_model_path):
    """SmolLM2's tokenizer as stored in its file (the weights are not needed)."""
    from minillm.formats.safetensors import SafetensorsFile
    from minillm.tokenizer import Tokenizer
    meta = SafetensorsFile(real_model_path).metadata
    return Tokenizer.from_tokenizer_json(meta["minillm.tokenizer_json"],
                                         json.loads(meta.get("minillm.tokenizer_config", "{}")))


REAL_TEXTS = ["/usr/share/common-licenses/GPL-3", str(STDLIB / "LICENSE.txt"),
              str(STDLIB / "argparse.py"), "mixed"]


@pytest.mark.real_model
@pytest.mark.parametrize("source", REAL_TEXTS, ids=lambda p: Path(p).name)
def test_streaming_tokenization_with_the_real_tokenizer(real_tokenizer, source):
    tok = real_tokenizer
    if source == "mixed":
        data = mixed_text(1_000_000, seed=3).encode("utf-8")
    elif os.path.isfile(source):
        data = Path(source).read_bytes()
    else:
        pytest.skip(f"{source} is not on this machine")
    ids, n_pieces = _ids_by_pieces(tok, data, block=4096)
    assert n_pieces > 1
    assert ids == tok.encode(data.decode("utf-8", errors="replace"))


# --- interruption, checkpoints and resume ---------------------------------------------------------

CKPT_ARGS = ("--chunk-size", "16", "--n-local", "32", "--json")


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> Path:
    """One piece (< READ_BLOCK) of ~40K tokens: a couple of seconds with 16-token chunks."""
    path = tmp_path_factory.mktemp("score_long") / "long.txt"
    path.write_text(training_words_text(120_000, seed=4), encoding="utf-8")
    assert path.stat().st_size < READ_BLOCK
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_file, long_file, tmp_path_factory):
    """(summary, nll-out text) of an uninterrupted run."""
    out = tmp_path_factory.mktemp("score_ref") / "nll.tsv"
    s = summary_of(score(tiny_file, long_file, *CKPT_ARGS, "--nll-out", out))
    return s, out.read_text()


def interrupt(tiny_file, input_file, checkpoint, nll_out, sig=signal.SIGINT, stdin=None):
    """Start a run with checkpoints every 64 tokens, signal it once a checkpoint exists."""
    args = [input_file] if stdin is None else []
    proc = subprocess.Popen(
        score_cmd(tiny_file, *args, *CKPT_ARGS, "--checkpoint", checkpoint,
                  "--checkpoint-every", "64", "--nll-out", nll_out),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        if stdin is not None:
            threading.Thread(target=_write_and_close, args=(proc.stdin, stdin),
                             daemon=True).start()
        deadline = time.monotonic() + TIMEOUT
        while not Path(checkpoint).exists():
            assert proc.poll() is None, (proc.returncode, proc.stderr.read())
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.stdout.read(), proc.stderr.read()  # small: no deadlock
        return subprocess.CompletedProcess(proc.args, proc.wait(timeout=TIMEOUT), out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _write_and_close(pipe, data):
    with contextlib.suppress(BrokenPipeError, ValueError):  # stopped before reading it all
        pipe.write(data)
    _close_quietly(pipe)


def _close_quietly(pipe):
    try:
        pipe.close()
    except (BrokenPipeError, ValueError):
        # the failed flush left it open; the buffer is dropped now
        with contextlib.suppress(BrokenPipeError, ValueError):
            pipe.close()


def assert_interrupted(result, code: int):
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    assert "interrupted after" in err and "perplexity" in err  # the summary so far, on stderr
    assert result.stdout == b""


def assert_same_numbers(a: dict, b: dict):
    assert a["tokens"] == b["tokens"]
    assert a["mean_nll"] == pytest.approx(b["mean_nll"], abs=1e-6)
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], abs=1e-6)


@pytest.fixture(scope="module")
def sigint_run(tiny_file, long_file, tmp_path_factory):
    """(result, checkpoint, nll-out) of one run on long_file stopped by SIGINT: resumed by
    test_sigint_then_resume_a_file (from copies), refused by the tests of other settings."""
    folder = tmp_path_factory.mktemp("score_ckpt")
    ckpt, nll_out = folder / "run.ckpt", folder / "nll.tsv"
    return interrupt(tiny_file, long_file, ckpt, nll_out), ckpt, nll_out


def test_sigint_then_resume_a_file(tiny_file, long_file, uninterrupted, sigint_run, tmp_path):
    ref, ref_nll = uninterrupted
    result, ckpt_run, nll_run = sigint_run
    assert_interrupted(result, 130)
    done = len(nll_run.read_text().splitlines())
    assert 0 < done < ref["tokens"] - 1  # really stopped in the middle
    ckpt, nll_out = tmp_path / "run.ckpt", tmp_path / "nll.tsv"
    shutil.copy(ckpt_run, ckpt)  # resumed from copies: the run's own files stay as they are
    shutil.copy(nll_run, nll_out)
    s = summary_of(score(tiny_file, long_file, *CKPT_ARGS, "--resume", ckpt,
                         "--nll-out", nll_out))
    assert_same_numbers(s, ref)
    assert nll_out.read_text() == ref_nll


def test_sigint_then_resume_stdin(tiny_file, long_file, uninterrupted, tmp_path):
    ref, ref_nll = uninterrupted
    ckpt, nll_out = tmp_path / "run.ckpt", tmp_path / "nll.tsv"
    data = long_file.read_bytes()
    assert_interrupted(interrupt(tiny_file, None, ckpt, nll_out, stdin=data), 130)
    s = summary_of(score(tiny_file, *CKPT_ARGS, "--resume", ckpt, "--nll-out", nll_out,
                         stdin=data))
    assert_same_numbers(s, ref)
    assert nll_out.read_text() == ref_nll


def test_sigterm_exits_143_with_a_checkpoint(tiny_file, long_file, uninterrupted, tmp_path):
    ref, _ = uninterrupted
    ckpt, nll_out = tmp_path / "run.ckpt", tmp_path / "nll.tsv"
    assert_interrupted(interrupt(tiny_file, long_file, ckpt, nll_out, sig=signal.SIGTERM), 143)
    s = summary_of(score(tiny_file, long_file, *CKPT_ARGS, "--resume", ckpt))
    assert_same_numbers(s, ref)


@pytest.fixture(scope="module")
def interrupted_checkpoint(sigint_run) -> Path:
    result, ckpt, _ = sigint_run
    assert_interrupted(result, 130)
    return ckpt


@pytest.mark.parametrize("change,needle", [
    (["--n-local", "16"], "n_local"),
    (["--chunk-size", "8"], "chunk_size"),
    (["--attention", "window"], "preset"),
    (["--n-global", "4"], "n_global"),
    (["--ceiling", "20"], "ceiling"),
])
def test_resume_with_other_settings_is_refused(tiny_file, long_file, interrupted_checkpoint,
                                               change, needle):
    args = dict(zip(CKPT_ARGS[::2], CKPT_ARGS[1::2]))
    args.update(dict(zip(change[::2], change[1::2])))
    flat = [x for kv in args.items() for x in kv if x is not None]
    result = score(tiny_file, long_file, *flat, "--json", "--resume", interrupted_checkpoint)
    assert_one_line_error(result, str(interrupted_checkpoint.name), "other settings", needle)


def test_resume_with_another_model_is_refused(tiny_dir, tmp_path, long_file,
                                              interrupted_checkpoint):
    from minillm.convert import convert
    other = tmp_path / "other.safetensors"
    convert(tiny_dir("gqa")[0], other, dtype="bfloat16")  # same config, other weights
    result = score(other, long_file, *CKPT_ARGS, "--resume", interrupted_checkpoint)
    assert_one_line_error(result, interrupted_checkpoint.name, "another model")


def test_resume_with_another_input_is_refused(tiny_file, tmp_path, interrupted_checkpoint):
    """The checkpoint lies inside the first piece: the tokens already scored are compared."""
    other = tmp_path / "other.txt"
    other.write_text(training_words_text(120_000, seed=99), encoding="utf-8")
    result = score(tiny_file, other, *CKPT_ARGS, "--resume", interrupted_checkpoint)
    assert_one_line_error(result, "does not continue")
    result = score(tiny_file, *CKPT_ARGS, "--resume", interrupted_checkpoint,
                   stdin=other.read_bytes())
    assert_one_line_error(result, "does not continue")


def test_resume_with_a_shorter_input_is_refused(tiny_file, long_file, interrupted_checkpoint):
    result = score(tiny_file, *CKPT_ARGS, "--resume", interrupted_checkpoint,
                   stdin=long_file.read_bytes()[:100])
    assert_one_line_error(result, "does not continue")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04garbage"])
def test_resume_from_a_file_that_is_not_a_checkpoint(tiny_file, long_file, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    assert_one_line_error(score(tiny_file, long_file, "--resume", bad), "bad.ckpt",
                          "not a minillm checkpoint")


def test_checkpoint_in_a_later_piece_resumes_exactly(tiny_file, model, tmp_path):
    """A checkpoint past the first READ_BLOCK: the file is seeked, stdin skipped and hashed."""
    text = training_words_text(READ_BLOCK + 20_000, seed=5)
    path = tmp_path / "two_pieces.txt"
    path.write_text(text, encoding="utf-8")
    data = path.read_bytes()
    first = next(read_pieces(io.BytesIO(data)))
    n_first = len(model.tokenizer.encode(first.text))
    assert len(first.raw) < len(data)
    common = ("--n-local", "32", "--json")
    ref_nll, nll = tmp_path / "ref.tsv", tmp_path / "nll.tsv"
    ref = summary_of(score(tiny_file, path, *common, "--nll-out", ref_nll))
    ckpt = tmp_path / "run.ckpt"
    # stops normally at --max-tokens, after a checkpoint written inside the second piece
    every = n_first + 1000
    partial = summary_of(score(tiny_file, path, *common, "--checkpoint", ckpt,
                               "--checkpoint-every", every, "--max-tokens", every + 700,
                               "--nll-out", nll))
    assert partial["tokens"] == every + 700 and ckpt.exists()
    record = json.loads(np.load(ckpt)["meta"].tobytes())
    assert record["piece_start"] == len(first.raw) and record["tokens"] >= every
    resumed = summary_of(score(tiny_file, path, *common, "--resume", ckpt, "--nll-out", nll))
    assert_same_numbers(resumed, ref)
    assert nll.read_text() == ref_nll.read_text()
    from_stdin = summary_of(score(tiny_file, *common, "--resume", ckpt, stdin=data))
    assert_same_numbers(from_stdin, ref)
    # the bytes before the resume point are checked too
    changed = bytearray(data)
    changed[1000] ^= 0x20  # flips the case of a letter in the first piece
    assert_one_line_error(score(tiny_file, *common, "--resume", ckpt, stdin=bytes(changed)),
                          "does not continue")


# --- a closed stdout -----------------------------------------------------------------------------

def test_closed_stdout_ends_quietly(tiny_file, text_file):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(score_cmd(tiny_file, text_file, "--json"), stdout=write_end,
                                stderr=subprocess.PIPE, env=cli_env(), timeout=TIMEOUT)
    finally:
        os.close(write_end)
    assert result.returncode in (141, -signal.SIGPIPE), result
    assert b"Traceback" not in result.stderr and result.stderr == b""
