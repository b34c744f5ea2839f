"""`minillm score`: perplexity of a stream of any length, in constant memory."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import stat
import sys
import time

import click

from minillm.attention import attention_spec
from minillm.errors import MiniLLMError, WriteError
from minillm.files import model_files, prepare_output, refuse_overlaps, same_file
from minillm.scoring import NLLCurve, Scorer

from .common import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    PROGRESS_EVERY_S,
    attention_options,
    backend_options,
    load_model,
    model_argument,
    progress_option,
    reports_errors,
    write_stdout,
)


class _Stop:
    """SIGINT/SIGTERM stop the run within a layer (the chunk under way is dropped: results and
    checkpoint stay consistent); a second signal ends the process at once."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            # checkpoints are written to a temporary file and renamed: the one there is whole
            os.write(2, b"\nminillm: interrupted again: exiting now\n")  # no buffer: safe here
            os._exit(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def _summary(stats, as_json: bool) -> str:
    s = stats.summary()
    if as_json:  # strict JSON: no NaN/Infinity literals (nothing predicted, NaN weights)
        s = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in s.items()}
        return json.dumps(s) + "\n"
    return (f"tokens          {s['tokens']}\n"
            f"mean NLL        {s['mean_nll']:.4f} nats\n"
            f"perplexity      {s['perplexity']:.3f}\n"
            f"bits per byte   {s['bits_per_byte']:.4f}\n"
            f"seconds         {s['seconds']:.1f}\n"
            f"tokens/s        {s['tokens_per_second']:.1f}\n")


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.last = enabled, 0.0

    def __call__(self, stats, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        end = "\n" if final else ""
        sys.stderr.write(f"\r{stats.tokens:>12,} tokens  {stats.tokens_per_second:8.1f} tok/s  "
                         f"ppl {stats.perplexity:9.3f}{end}")
        sys.stderr.flush()


@click.command()
@model_argument
@click.argument("input_file", metavar="[FILE|-]", default="-", type=click.Path(allow_dash=True))
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object on the last line of stdout.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Stop after N tokens.")
@click.option("--nll-out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write 'position<TAB>token id<TAB>NLL' per prediction, flushed per chunk.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Draw NLL against position (log-spaced windows) into a PNG (needs matplotlib).")
@attention_options("the stream's keys", ceiling=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens fed at a time.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save the run here every --checkpoint-every tokens and on Ctrl-C / SIGTERM.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Tokens between checkpoints.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from a checkpoint (same model, input and settings).")
@progress_option
@backend_options
@reports_errors
def score(model, input_file, as_json, max_tokens, nll_out, plot_path, attention, n_global,
          n_local, ceiling, chunk_size, checkpoint, checkpoint_every, resume, progress, backend,
          threads):
    """Score a text stream: token count, mean NLL, perplexity, bits per byte, tokens/s.

    Reads FILE, or stdin when FILE is '-' or absent, piece by piece: a stream of any length
    is scored in constant memory. Ctrl-C prints what was scored so far (exit 130).
    """
    if plot_path:
        _check_plot_format(plot_path)
    _check_outputs(model, input_file, nll_out, checkpoint, plot_path, resume)
    m = load_model(model, backend, threads)
    try:
        spec = attention_spec(m.config, attention, n_global, n_local, ceiling)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    stop = _Stop()
    scorer = _make_scorer(m, spec, chunk_size, max_tokens, resume)
    stream, seekable = _open_input(input_file)
    if resume:
        scorer.seek_input(stream, seekable)
    nll_file = NllOut(nll_out, scorer.notes.get("nll_out_bytes")) if nll_out else None
    curve = NLLCurve()
    show = _Progress(sys.stderr.isatty() if progress is None else progress)
    next_checkpoint = (scorer.stats.tokens // checkpoint_every + 1) * checkpoint_every

    def on_chunk(sc, first, ids, nll):
        nonlocal next_checkpoint
        if nll_file:
            sc.notes["nll_out_bytes"] = nll_file.write(first, ids, nll)
        if plot_path:
            curve.add(first, nll)
        if checkpoint and sc.stats.tokens >= next_checkpoint:
            sc.save(checkpoint)
            next_checkpoint += checkpoint_every
        show(sc.stats)

    try:
        stats = scorer.run(stream, on_chunk=on_chunk, stop=stop)
        if checkpoint and stop():
            scorer.save(checkpoint)
    except WriteError:  # what was scored still reaches the user, then the one error line
        show(scorer.result(), final=True)
        sys.stderr.write(_summary(scorer.result(), False))
        raise
    finally:
        if nll_file:
            nll_file.close()
    show(stats, final=True)
    if stop():
        print(f"minillm: interrupted after {stats.tokens} tokens", file=sys.stderr)
        sys.stderr.write(_summary(stats, False))
        sys.exit(EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM)
    if stats.tokens == 0:
        raise MiniLLMError("nothing to score: the input is empty")
    try:
        write_stdout(_summary(stats, as_json))
    except WriteError:
        sys.stderr.write(_summary(stats, False))
        raise
    if plot_path:
        from minillm.plot import plot_curves
        plot_curves(plot_path, {f"{spec.preset}": curve.points()},
                    title=os.path.basename(str(input_file)),
                    training_length=m.config.max_position_embeddings)


def _check_plot_format(path: str) -> None:
    from minillm.plot import plot_formats
    formats = plot_formats()  # also: matplotlib is there (before scoring, not after)
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in formats:
        raise click.BadParameter(f"{path!r} does not end in a format it can draw "
                                 f"({', '.join('.' + f for f in formats)})",
                                 param_hint="'--plot'")


def _check_outputs(model, input_file, nll_out, checkpoint, plot_path, resume) -> None:
    """Before any work: no output may be the model, the input or another output, and the
    files written whole later (checkpoint, plot) must be writable where they go."""
    refuse_overlaps(
        {"--nll-out": nll_out, "--checkpoint": checkpoint, "--plot": plot_path},
        {"the model": model_files(model),
         "the input": _stdin_fd() if input_file == "-" else input_file,
         # resuming a checkpoint and writing the next one to the same file is the usual way
         "--resume": None if same_file(resume, checkpoint) else resume})
    for path in (checkpoint, plot_path):
        if path:
            prepare_output(path)


def _make_scorer(model, spec, chunk_size, max_tokens, resume) -> Scorer:
    if resume:
        return Scorer.resume(resume, model, spec, chunk_size, max_tokens)
    from minillm.session import Session
    session = Session(model, spec.preset, spec.n_global, spec.n_local, spec.ceiling)
    return Scorer(session, chunk_size, max_tokens)


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):  # closed, or not a real file
        return None


def _open_input(path: str):
    """(binary stream, seekable); a closed stdin reads as empty."""
    if path == "-":
        return (sys.stdin.buffer if sys.stdin is not None else io.BytesIO()), False
    try:
        return open(path, "rb"), True
    except OSError as e:
        raise MiniLLMError(f"{path}: cannot read ({e.strerror})") from None


class NllOut:
    """--nll-out: one line per prediction, written a chunk at a time straight to the file (no
    buffer to lose). A failed write is cut back to the last whole line, so the file never ends
    mid-line; pipes and FIFOs work (and are never cut)."""

    def __init__(self, path: str, resume_at: int | None):
        """resume_at: the bytes the checkpoint's run had written (None: start afresh)."""
        self.path = path
        flags = os.O_WRONLY if resume_at is not None else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if resume_at is not None and not os.path.exists(path):
            raise MiniLLMError(f"--nll-out {path} does not exist, but the checkpoint's run wrote "
                               f"{resume_at} bytes there: resume with that file")
        try:
            self.fd = os.open(path, flags, 0o666)
        except OSError as e:
            raise WriteError(f"{path}: cannot write ({e.strerror})") from None
        self.is_file = stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.size = resume_at or 0
        if resume_at is not None and self.is_file:
            have = os.fstat(self.fd).st_size
            if have < resume_at:
                os.close(self.fd)
                raise MiniLLMError(f"--nll-out {path} holds {have} bytes, but the checkpoint's "
                                   f"run wrote {resume_at}: lines are missing; resume with the "
                                   f"file that run wrote, or start again")
            os.ftruncate(self.fd, resume_at)  # lines written after the checkpoint come again
            os.lseek(self.fd, 0, os.SEEK_END)

    def write(self, first: int, ids, nll) -> int:
        """Append one chunk's lines ('position<TAB>id<TAB>NLL'); returns the bytes written."""
        lines = "".join(f"{first + i}\t{t}\t{x:.6f}\n"
                        for i, (t, x) in enumerate(zip(ids, nll)) if first + i).encode()
        try:
            rest = memoryview(lines)
            while rest:
                rest = rest[os.write(self.fd, rest):]
        except OSError as e:
            if self.is_file:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.size)
            kept = f"lines up to position {first - 1} kept" if first > 1 else "no line kept"
            raise WriteError(f"{self.path}: cannot write ({e.strerror}); {kept}") from None
        self.size += len(lines)
        return self.size

    def close(self) -> None:
        os.close(self.fd)
