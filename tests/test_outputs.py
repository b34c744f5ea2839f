"""The user's files and work: an output never destroys an input, every write error is one line
after what was done, NLL files hold whole lines, temporaries of killed runs do not stay."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
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

TEXT = (STDLIB / "LICENSE.txt").read_bytes() if (STDLIB / "LICENSE.txt").exists() else \
    (STDLIB / "os.py").read_bytes()


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spawn(*args, stdin=None, stdout=subprocess.PIPE, preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen(minillm_command() + [str(a) for a in args], stdin=stdin,
                            stdout=stdout, stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=preexec_fn)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out or b"", err)


def ends_with_summary_then_error(result, *needles) -> str:
    """Exit 1, no traceback, the score summary on stderr, then exactly one error line."""
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = stderr_lines(result)
    assert any(line.startswith("tokens ") for line in lines[:-1]), err
    for needle in needles:
        assert needle.lower() in lines[-1].lower(), (needle, lines[-1])
    assert sum("error" in line.lower() for line in lines) == 1, err
    return lines[-1]


def whole_lines(path) -> list[list[str]]:
    data = Path(path).read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-40:]
    rows = [line.split("\t") for line in data.decode().splitlines()]
    assert all(len(r) == 3 for r in rows)
    return rows


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(TEXT[:6000])
    return path


@pytest.fixture
def model_copy(tiny_file, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_file, path)
    return path


# --- an output that is an input ------------------------------------------------------------------

def _alias(target, tmp_path, how):
    if how == "same path":
        return target
    alias = tmp_path / f"alias-{how}"
    (os.link if how == "hard link" else os.symlink)(target, alias)
    return alias


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
@pytest.mark.parametrize("option", ["--nll-out", "--checkpoint", "--plot"])
@pytest.mark.parametrize("victim", ["input", "model"])
def test_an_output_that_is_an_input_is_refused_untouched(model_copy, text_file, tmp_path, how,
                                                         option, victim):
    target = text_file if victim == "input" else model_copy
    path = _alias(target, tmp_path, how)
    if option == "--plot":
        path = tmp_path / "plot.png"
        os.symlink(target, path)
    before = sha(target)
    result = run_cli("score", model_copy, text_file, option, path, "--max-tokens", "64")
    assert_one_line_error(result, "same file", victim)
    assert sha(target) == before


def test_an_output_that_is_piped_stdin_is_refused(model_copy, text_file):
    before = sha(text_file)
    with open(text_file, "rb") as stdin:
        result = finish(spawn("score", model_copy, "-", "--nll-out", text_file, stdin=stdin))
    assert_one_line_error(result, "same file", "input")
    assert sha(text_file) == before


def test_an_output_that_is_in_the_model_folder_is_refused(tiny_dir, text_file):
    folder, _ = tiny_dir("gqa")
    weights = next(folder.glob("*.safetensors"))
    before = sha(weights)
    result = run_cli("score", folder, text_file, "--checkpoint", weights, "--max-tokens", "64")
    assert_one_line_error(result, "same file", "model")
    assert sha(weights) == before


def test_two_outputs_that_are_one_file_are_refused(model_copy, text_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("score", model_copy, text_file, "--nll-out", out, "--checkpoint", out)
    assert_one_line_error(result, "same file", "--nll-out")
    assert not out.exists()


def test_resume_and_checkpoint_may_be_one_file(model_copy, text_file, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    args = ("--checkpoint", ckpt, "--checkpoint-every", "64", "--chunk-size", "32")
    first = run_cli("score", model_copy, text_file, "--max-tokens", "96", *args, "--json")
    assert first.returncode == 0, first.stderr
    again = run_cli("score", model_copy, text_file, "--resume", ckpt, *args, "--json")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
def test_convert_refuses_to_write_over_its_source(model_copy, tmp_path, how):
    out = _alias(model_copy, tmp_path, how)
    before = sha(model_copy)
    result = run_cli("convert", model_copy, out)
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    assert b"same file" in result.stderr
    assert sha(model_copy) == before


def test_convert_refuses_to_write_into_its_source_folder(tiny_dir):
    folder, _ = tiny_dir("gqa")
    config = folder / "config.json"
    before = sha(config)
    result = invoke_cli("convert", folder, config)
    assert result.returncode == 1 and b"same file" in result.stderr, result.stderr
    assert sha(config) == before


# --- --resume with an NLL file that lost lines ---------------------------------------------------

@pytest.fixture
def scored_with_checkpoint(model_copy, text_file, tmp_path):
    """A finished run that checkpointed at 64 and 128 tokens and wrote its NLLs."""
    ckpt, nll = tmp_path / "run.ckpt", tmp_path / "nll.tsv"
    args = ("--chunk-size", "32", "--checkpoint", ckpt, "--checkpoint-every", "64",
            "--nll-out", nll)
    done = run_cli("score", model_copy, text_file, "--max-tokens", "150", *args)
    assert done.returncode == 0, done.stderr
    return ckpt, nll, args


def test_resume_with_a_shorter_nll_out_is_refused(model_copy, text_file, scored_with_checkpoint):
    ckpt, nll, args = scored_with_checkpoint
    with open(nll, "r+b") as f:
        f.truncate(100)
    result = run_cli("score", model_copy, text_file, "--resume", ckpt, *args)
    assert_one_line_error(result, "--nll-out", "missing")
    assert os.path.getsize(nll) == 100  # not padded, not cut


def test_resume_with_the_nll_out_gone_is_refused(model_copy, text_file, scored_with_checkpoint):
    ckpt, nll, args = scored_with_checkpoint
    nll.unlink()
    result = run_cli("score", model_copy, text_file, "--resume", ckpt, *args)
    assert_one_line_error(result, "--nll-out", "does not exist")


def test_resume_rewrites_the_lines_after_the_checkpoint_exactly(model_copy, text_file,
                                                                scored_with_checkpoint):
    ckpt, nll, args = scored_with_checkpoint
    whole = nll.read_bytes()
    result = run_cli("score", model_copy, text_file, "--resume", ckpt, *args,
                     "--max-tokens", "150")
    assert result.returncode == 0, result.stderr
    assert nll.read_bytes() == whole


# --- write errors ---------------------------------------------------------------------------------

def test_nll_out_on_a_full_disk(model_copy, text_file):
    result = run_cli("score", model_copy, text_file, "--nll-out", "/dev/full",
                     "--max-tokens", "100")
    ends_with_summary_then_error(result, "/dev/full", "no space")


def _file_size_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_disk_that_fills_mid_run_leaves_whole_lines(model_copy, text_file, tmp_path):
    nll = tmp_path / "nll.tsv"
    proc = spawn("score", model_copy, text_file, "--nll-out", nll, "--chunk-size", "16",
                 preexec_fn=_file_size_limit(1500))
    result = finish(proc)
    ends_with_summary_then_error(result, str(nll), "cannot write")
    rows = whole_lines(nll)
    assert len(rows) > 0 and int(rows[-1][0]) == len(rows)  # positions 1..n, nothing torn


def test_stdout_on_a_full_disk_keeps_the_summary(model_copy, text_file):
    with open("/dev/full", "wb") as full:
        result = finish(spawn("score", model_copy, text_file, "--max-tokens", "64",
                              stdout=full))
    ends_with_summary_then_error(result, "stdout", "no space")


@pytest.mark.parametrize("command", ["generate", "info"])
def test_other_commands_on_a_full_stdout(model_copy, command):
    args = ["-p", "hello", "--max-tokens", "4"] if command == "generate" else []
    with open("/dev/full", "wb") as full:
        result = finish(spawn(command, model_copy, *args, stdout=full))
    assert_one_line_error(result, "stdout", "no space")


def _unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        return "/proc"  # root writes through permissions; nobody creates files in /proc
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


@pytest.mark.parametrize("option", ["--checkpoint", "--plot"])
def test_an_unwritable_folder_is_refused_before_scoring(model_copy, text_file, tmp_path, option):
    path = os.path.join(_unwritable_folder(tmp_path), "out.png")
    start = time.monotonic()
    result = run_cli("score", model_copy, text_file, option, path)
    assert_one_line_error(result, "cannot write")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("where", ["missing folder", "unwritable folder"])
def test_convert_into_a_folder_it_cannot_write(model_copy, tmp_path, where):
    folder = tmp_path / "nowhere" if where == "missing folder" else _unwritable_folder(tmp_path)
    result = run_cli("convert", model_copy, os.path.join(folder, "out.safetensors"))
    lines = stderr_lines(result)
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr
    assert "cannot write" in lines[-1]


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(model_copy, text_file,
                                                                     tmp_path):
    from minillm import load
    from minillm.checkpoint import read_checkpoint
    probe, ckpt = tmp_path / "probe.ckpt", tmp_path / "run.ckpt"
    args = ("--chunk-size", "32", "--checkpoint-every", "64")
    run_cli("score", model_copy, text_file, "--max-tokens", "64", "--checkpoint", probe, *args)
    first_size = os.path.getsize(probe)  # later checkpoints hold more slots: they are larger
    result = finish(spawn("score", model_copy, text_file, "--checkpoint", ckpt, *args,
                          preexec_fn=_file_size_limit(first_size + 16)))
    ends_with_summary_then_error(result, str(ckpt), "cannot write")
    session, record = read_checkpoint(str(ckpt), load(model_copy))
    assert session.position == record["tokens"] == 64
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# --- pipes and FIFOs ------------------------------------------------------------------------------

def test_nll_out_into_a_pipe(model_copy, text_file):
    result = run_cli("score", model_copy, text_file, "--nll-out", "/dev/stdout",
                     "--max-tokens", "50", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 50 and lines[0].startswith("1\t")  # 49 NLL lines, then the JSON


def test_nll_out_into_a_fifo(model_copy, text_file, tmp_path):
    fifo = tmp_path / "nll.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = run_cli("score", model_copy, text_file, "--nll-out", fifo, "--max-tokens", "40")
    reader.join(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert got and len(got[0].decode().splitlines()) == 39


# --- temporaries ----------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_removed(model_copy, text_file, tmp_path):
    out, ckpt = tmp_path / "out.safetensors", tmp_path / "run.ckpt"
    stale = [tmp_path / f"out.safetensors.tmp{_dead_pid()}",
             tmp_path / f"run.ckpt.tmp{_dead_pid()}"]
    alive = tmp_path / f"out.safetensors.tmp{os.getppid()}"  # a live process's: left alone
    for path in stale + [alive]:
        path.write_bytes(b"partial")
    assert invoke_cli("convert", model_copy, out).returncode == 0
    assert invoke_cli("score", model_copy, text_file, "--max-tokens", "32",
                      "--checkpoint", ckpt).returncode == 0
    assert not any(p.exists() for p in stale) and alive.exists()


@pytest.mark.real_model
def test_sigterm_during_convert_leaves_no_temporary(smollm2_gguf_path, tmp_path):
    out = tmp_path / "out.safetensors"
    proc = spawn("convert", smollm2_gguf_path, out)
    deadline = time.monotonic() + TIMEOUT
    while not list(tmp_path.glob("out.safetensors.tmp*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode == 143, result.stderr
    assert list(tmp_path.iterdir()) == []


# --- threads, Ctrl-C at start-up, a closed stdin -------------------------------------------------

def test_threads_beyond_the_cores_are_lowered_once(model_copy):
    cores = len(os.sched_getaffinity(0))
    result = run_cli("info", model_copy, "--threads", str(cores + 6))
    assert result.returncode == 0, result.stderr
    warned = [line for line in stderr_lines(result) if "--threads" in line]
    assert len(warned) == 1 and f"lowered to {cores}" in warned[0], warned


def test_threads_beyond_the_cores_never_reach_blas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from minillm_cli.common import set_threads
    cores = len(os.sched_getaffinity(0))
    before = threadpoolctl.threadpool_info()
    try:
        with pytest.warns(UserWarning, match="lowered"):
            set_threads(1000)
        blas = [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["user_api"] == "blas"]
        assert blas and max(blas) <= cores
    finally:
        for lib in before:
            threadpoolctl.threadpool_limits(lib["num_threads"], user_api=lib["user_api"])


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6])
def test_ctrl_c_during_start_up_has_no_traceback(model_copy, delay):
    proc = spawn("info", model_copy, preexec_fn=_default_sigint)
    time.sleep(delay)  # the point of the test: a signal at an arbitrary moment of start-up
    proc.send_signal(signal.SIGINT)
    result = finish(proc)
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    assert result.returncode in (0, 130, -signal.SIGINT), result.stderr


@pytest.mark.parametrize("command, code", [("score", 1), ("chat", 0)])
def test_a_closed_stdin(model_copy, command, code):
    result = finish(spawn(command, model_copy, preexec_fn=lambda: os.close(0)))
    assert result.returncode == code and b"Traceback" not in result.stderr, result.stderr
    assert result.stdout == b""
    if code:
        assert_one_line_error(result, "nothing to score")


# --- options checked before any work -------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value", [
    ("--seed", "-1"), ("--temperature", "nan"), ("--top-p", "nan"), ("--min-p", "nan"),
    ("--repeat-penalty", "nan"), ("--temperature", "inf"), ("--repeat-penalty", "inf"),
])
def test_sampling_options_are_checked_alike(model_copy, command, option, value):
    args = ["-p", "hi"] if command == "generate" else []
    assert_usage_error(invoke_cli(command, model_copy, *args, option, value), option)


@pytest.mark.parametrize("command", ["score", "chat"])
@pytest.mark.parametrize("option", ["--n-local", "--n-global"])
def test_full_attention_refuses_window_settings(model_copy, command, option):
    result = invoke_cli(command, model_copy, "--attention", "full", option, "4", stdin=b"hi")
    assert_usage_error(result, option.lstrip("-").replace("-", "_"))


def test_a_plot_format_that_cannot_be_drawn_is_refused_first(model_copy, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke_cli("score", model_copy, text_file, "--plot", tmp_path / "curve.txt")
    assert_usage_error(result, "--plot", ".png")
    assert not (tmp_path / "curve.txt").exists()


def test_a_plot_in_another_format_is_written(model_copy, text_file, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke_cli("score", model_copy, text_file, "--plot", tmp_path / "curve.svg",
                        "--max-tokens", "64")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curve.svg").read_bytes().lstrip().startswith(b"<?xml")


def test_refuse_overlaps_names_the_input(tmp_path):
    from minillm.errors import MiniLLMError
    from minillm.files import refuse_overlaps
    a = tmp_path / "a"
    a.write_text("x")
    with pytest.raises(MiniLLMError, match="--out .* the same file as the text"):
        refuse_overlaps({"--out": str(tmp_path / "." / "a")}, {"the text": str(a)})
    refuse_overlaps({"--out": "/dev/null", "--other": "/dev/null"}, {"the text": str(a)})


# --- a long prompt shows a sign of life -----------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_long_prompt_shows_progress(real_model_path, command):
    text = (STDLIB / "os.py").read_text()[:5000]
    args = ["-p", text] if command == "generate" else []
    result = run_cli(command, real_model_path, *args, "--progress", "--max-tokens", "1",
                     "--temperature", "0", stdin=text.encode())
    assert result.returncode == 0, result.stderr
    shown = result.stderr.decode().replace("\r", "\n").splitlines()
    counts = [line.split()[1] for line in shown if line.startswith("prompt ")]
    assert len(counts) >= 2, shown
    fed, total = counts[-1].split("/")
    assert fed == total and int(total.replace(",", "")) > 1024
    quiet = run_cli(command, real_model_path, *args, "--no-progress", "--max-tokens", "1",
                    "--temperature", "0", stdin=text.encode())
    assert b"prompt " not in quiet.stderr and quiet.stdout == result.stdout
