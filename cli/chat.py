"""`minillm chat`: a thin terminal loop over minillm.chat.Chat."""

from __future__ import annotations

import dataclasses
import signal
import sys
import warnings

import click

from .common import (
    PromptProgress,
    attention_options,
    backend_options,
    load_model,
    model_argument,
    on_sigterm_exit,
    progress_option,
    reports_errors,
    sampling_options,
    sampling_params,
    top_k_middle_options,
    top_k_middle_settings,
    write_stdout,
)

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays) and empty the cache",
    "/exit": "quit (also /quit, Ctrl-D, or Ctrl-C at an empty prompt)",
    "/help": "show this help",
}
ESCAPE = "start a message with // to send a line that begins with /"


@click.command()
@model_argument
@click.option("--system", default=None, help="System prompt for the conversation.")
@attention_options("the conversation's keys")
@click.option("-v", "--verbose", is_flag=True,
              help="After each answer print tokens in the conversation, cache fill, the "
                   "middle store's size and prompt/generation tokens/s to stderr.")
@top_k_middle_options()
@sampling_options
@progress_option
@backend_options
@reports_errors
def chat(model, system, attention, n_global, n_local, verbose, progress, backend, threads,
         **kw):
    """Chat with MODEL using its chat template; the conversation never overflows.

    \b
    In a terminal: type a message and press Enter; the answer streams as it is produced.
      /reset  forget the conversation      /exit  quit      /help  commands
      Ctrl-C  stops the current answer (what was said stays in the conversation);
              at an empty prompt it quits, like Ctrl-D (exit status 0).
    With stdin not a terminal, the whole input is one message: only the answer is printed
    to stdout, then the command exits (empty input: no output, exit 0).
    """
    params = sampling_params(kw)
    top_k = top_k_middle_settings(kw)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    message = None
    if not interactive:
        message = read_stdin()
        if not message:
            return
    m = load_model(model, backend, threads)
    if top_k["top_k_middle"]:
        on_sigterm_exit()  # SIGTERM unwinds, so that the middle store is removed
    try:
        conversation = m.chat(system=system, attention=attention, n_global=n_global,
                              n_local=n_local, **top_k, **dataclasses.asdict(params))
    except ValueError as err:  # settings the session refuses, e.g. n_global > n_local
        raise click.UsageError(str(err)) from None
    with conversation:
        if not interactive:
            stream_answer(conversation, message, verbose, progress, interactive=False)
            return
        repl(conversation, verbose, progress)


def read_stdin() -> str:
    """The whole of stdin as one message ("" when stdin is closed)."""
    data = sys.stdin.buffer.read() if sys.stdin is not None else b""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        warnings.warn("stdin is not valid UTF-8: undecodable bytes were replaced", stacklevel=2)
        text = data.decode("utf-8", errors="replace")
    return text.strip()


def stream_answer(conversation, message: str, verbose: bool, progress: bool | None = None,
                  interactive: bool = True) -> None:
    """Print the answer as it streams; in a terminal Ctrl-C stops it (the partial answer stays
    in the conversation), in a pipe it ends the program (exit 130)."""
    pieces = conversation.send(message, progress=PromptProgress(progress))
    try:
        for piece in pieces:
            write_stdout(piece)
    except KeyboardInterrupt:
        if not interactive:
            raise
        write_stdout(" [interrupted]")
    finally:
        pieces.close()  # records the turn even if the interrupt landed outside the generator
    write_stdout("\n")
    if verbose:
        click.echo(format_stats(conversation.stats), err=True)


def format_stats(s: dict) -> str:
    def rate(x):
        return "-" if x is None else f"{x:.1f}"

    fill = ("unbounded" if s["cache_capacity"] is None
            else f"{s['cache_fill']:.1%} of {s['cache_capacity']} slots")
    middle = (f" | middle store {s['middle_bytes'] / 1e6:.1f} MB on disk"
              if s.get("top_k_middle") else "")
    return (f"[conversation {s['tokens']} tokens | cache {fill}, {s['cache_bytes'] / 1e6:.1f} MB"
            f"{middle} | "
            f"prompt {s['prompt_tokens']} tokens at {rate(s['prompt_tps'])} tok/s | "
            f"generation {s['generated_tokens']} tokens at {rate(s['generation_tps'])} tok/s]")


class _DiscardLine(Exception):
    """Ctrl-C on a line with text typed: drop the line, as a shell does."""


def read_line(prompt: str, readline) -> str | None:
    """One input line; None to quit (Ctrl-D, or Ctrl-C at an empty prompt)."""
    def on_sigint(signum, frame):
        # runs inside readline's input loop, while the typed text is still in its buffer
        if readline is not None and readline.get_line_buffer():
            raise _DiscardLine
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    except _DiscardLine:
        print()
        return ""
    finally:
        signal.signal(signal.SIGINT, previous)


def repl(conversation, verbose: bool, progress: bool | None = None) -> None:
    try:
        import readline
    except ImportError:  # not on every platform; input() still works without line editing
        readline = None
    click.echo("minillm chat: type a message, /help for commands, Ctrl-D to quit.", err=True)
    while True:
        line = read_line("> ", readline)
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                conversation.reset()
                click.echo("(conversation cleared)", err=True)
            elif command == "/help":
                for name, text in COMMANDS.items():
                    click.echo(f"  {name:<7} {text}", err=True)
                click.echo(f"  Ctrl-C  stops an answer; {ESCAPE}", err=True)
            else:
                click.echo(f"unknown command {command}: type /help for the commands", err=True)
            continue
        stream_answer(conversation, line[1:] if line.startswith("//") else line, verbose,
                      progress)
