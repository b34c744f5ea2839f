"""`minillm chat` end to end: a pseudo-terminal session on SmolLM2 (pexpect), pipe mode, and
the command's usage errors and help (in this process, through click's CliRunner)."""

from __future__ import annotations

import re
import subprocess

import pytest
from click.testing import CliRunner
from helpers import cli_env, default_sigint, invoke_cli, minillm_command

from minillm_cli.main import cli

TIMEOUT = 60  # seconds for any single expectation
PROMPT = "> "
CONVERSATION = re.compile(r"\[conversation (\d+) tokens")


def env() -> dict:
    return cli_env(TERM="dumb")


def spawn(model, *args):
    pexpect = pytest.importorskip("pexpect")
    cmd = minillm_command()
    # started as a shell starts a foreground job, SIGINT at its default: a pytest running with
    # SIGINT ignored would pass SIG_IGN on, and Ctrl-C during an answer would do nothing
    child = pexpect.spawn(cmd[0], cmd[1:] + ["chat", str(model), "--temperature", "0", *args],
                          env=env(), encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 200),
                          preexec_fn=default_sigint)
    child.expect_exact(PROMPT)
    return child


def ask(child, question: str) -> str:
    """Send a line, return everything printed up to the next prompt (answer, stats)."""
    child.sendline(question)
    child.expect_exact(question)  # readline's echo
    child.expect_exact(PROMPT)
    return child.before


def ended(child) -> int:
    import pexpect
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def run(model, *args, stdin: str):
    cmd = minillm_command() + ["chat", str(model), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env(),
                          timeout=TIMEOUT)


@pytest.mark.real_model
def test_interactive_session(real_model_path):
    child = spawn(real_model_path, "--max-tokens", "300", "--verbose")
    try:
        first = ask(child, "What is the capital of France?")
        assert "Paris" in first
        tokens = int(CONVERSATION.search(first).group(1))

        follow = ask(child, "Repeat the name of the city you just mentioned.")
        assert "Paris" in follow  # needs the first turn: it is still in the cache
        grown = int(CONVERSATION.search(follow).group(1))
        assert grown > tokens

        # Ctrl-C in the middle of a long answer: the prompt comes back, the partial answer stays
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("knight.")
        child.expect(r"\w+\W+\w+\W+\w+\W+\w+")  # a few pieces of the answer
        child.sendcontrol("c")
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT)
        after_interrupt = int(CONVERSATION.search(child.before).group(1))
        assert after_interrupt > grown + 10

        child.sendline("")  # an empty line is ignored: just a new prompt
        child.expect_exact(PROMPT)
        assert "conversation" not in child.before

        assert "unknown command /foo" in ask(child, "/foo")
        assert "/reset" in ask(child, "/help")

        child.send("half a line")  # Ctrl-C on typed text drops the line, does not quit
        child.expect_exact("half a line")
        child.sendcontrol("c")
        child.expect_exact(PROMPT)

        assert "cleared" in ask(child, "/reset")
        again = ask(child, "What is the capital of France?")
        assert "Paris" in again
        assert int(CONVERSATION.search(again).group(1)) == tokens  # the cache started empty

        child.sendcontrol("d")
        assert ended(child) == 0
    finally:
        child.close(force=True)


@pytest.mark.parametrize("quit_with", ["ctrl-c", "/exit"])
def test_quit_at_the_prompt_exits_0(tiny_chat_file, quit_with):
    """No answer is asked for: the tiny model (with a chat template) stands in for SmolLM2."""
    child = spawn(tiny_chat_file)
    try:
        if quit_with == "ctrl-c":
            child.sendcontrol("c")
        else:
            child.sendline(quit_with)
        assert ended(child) == 0
    finally:
        child.close(force=True)


@pytest.mark.real_model
def test_pipe_answers_once(real_model_path):
    result = run(real_model_path, "--temperature", "0", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert PROMPT not in result.stdout and "/help" not in result.stdout  # only the answer
    assert result.stdout.endswith("\n") and result.stdout.count("\n") <= 3


@pytest.mark.parametrize("stdin", ["", "\n  \n"])
def test_pipe_empty_input_prints_nothing(tiny_chat_file, stdin):
    result = run(tiny_chat_file, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_bad_settings_are_usage_errors(tiny_chat_file):
    result = invoke_cli("chat", tiny_chat_file, "--n-local", "10", "--n-global", "20",
                        stdin=b"hi\n")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "n_global" in err and "Traceback" not in err


def test_missing_model_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["chat", str(tmp_path / "nope.safetensors")], input="hi\n")
    assert result.exit_code == 1
    assert "no such file" in result.output and "Traceback" not in result.output


def test_help_documents_every_option_and_the_controls():
    result = CliRunner().invoke(cli, ["chat", "--help"])
    assert result.exit_code == 0
    for option in ("--system", "--verbose", "--n-local", "--n-global", "--attention",
                   "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                   "--repeat-last-n", "--seed", "--max-tokens", "--backend", "--threads"):
        assert option in result.output
    for control in ("/reset", "/exit", "Ctrl-C", "Ctrl-D", "exit status 0"):
        assert control in result.output
    command = cli.commands["chat"]
    assert all(p.help for p in command.params if p.param_type_name == "option")
