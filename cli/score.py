"""`minillm score`: perplexity of a stream of any length, in constant memory."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import click

from minillm.attention import PRESETS, attention_spec
from minillm.errors import MiniLLMError
from minillm.scoring import NLLCurve, Scorer

from .common import EXIT_SIGINT, backend_options, load_model, model_argument, reports_errors

EXIT_SIGTERM = 143
PROGRESS_EVERY_S = 0.5


class _Stop:
    """SIGINT/SIGTERM end the run at the next chunk boundary (results and checkpoint intact)."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def _print_summary(stats, as_json: bool, out) -> None:
    s = stats.summary()
    if as_json:  # strict JSON: no NaN/Infinity literals (nothing predicted, NaN weights)
        s = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in s.items()}
        print(json.dumps(s), file=out, flush=True)
        return
    print(f"tokens          {s['tokens']}\n"
          f"mean NLL        {s['mean_nll']:.4f} nats\n"
          f"perplexity      {s['perplexity']:.3f}\n"
          f"bits per byte   {s['bits_per_byte']:.4f}\n"
          f"seconds         {s['seconds']:.1f}\n"
          f"tokens/s        {s['tokens_per_second']:.1f}", file=out, flush=True)


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
@click.option("--attention", type=click.Choice(PRESETS), default="lminfinite", show_default=True,
              help="lminfinite (Λ mask + distance ceiling), window (local window only), "
                   "full (unbounded cache: memory grows).")
@click.option("--n-global", type=click.IntRange(min=0), default=None,
              help="Starting tokens kept forever [lminfinite default: 10].")
@click.option("--n-local", type=click.IntRange(min=1), default=None,
              help="Local window [default: the model's training length].")
@click.option("--ceiling", type=click.IntRange(min=0), default=None,
              help="Distance ceiling for the global tokens [default: n_local].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens fed at a time.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save the run here every --checkpoint-every tokens and on Ctrl-C / SIGTERM.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Tokens between checkpoints.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Continue from a checkpoint (same model, input and settings).")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr [default: when stderr is a terminal].")
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
        from minillm.plot import require_matplotlib
        require_matplotlib()  # fail before scoring, not after
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
    nll_file = _open_nll_out(nll_out, scorer)
    curve = NLLCurve()
    show = _Progress(sys.stderr.isatty() if progress is None else progress)
    next_checkpoint = (scorer.stats.tokens // checkpoint_every + 1) * checkpoint_every

    def on_chunk(sc, first, ids, nll):
        nonlocal next_checkpoint
        if nll_file:
            nll_file.write("".join(f"{first + i}\t{t}\t{x:.6f}\n"
                                   for i, (t, x) in enumerate(zip(ids, nll)) if first + i))
            nll_file.flush()
            sc.notes["nll_out_bytes"] = nll_file.tell()
        if plot_path:
            curve.add(first, nll)
        if checkpoint and sc.stats.tokens >= next_checkpoint:
            sc.save(checkpoint)
            next_checkpoint += checkpoint_every
        show(sc.stats)

    stats = scorer.run(stream, on_chunk=on_chunk, stop=stop)
    if checkpoint and stop():
        scorer.save(checkpoint)
    show(stats, final=True)
    if nll_file:
        nll_file.close()
    if stop():
        print(f"minillm: interrupted after {stats.tokens} tokens", file=sys.stderr)
        _print_summary(stats, False, sys.stderr)
        sys.exit(EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM)
    if stats.tokens == 0:
        raise MiniLLMError("nothing to score: the input is empty")
    if plot_path:
        from minillm.plot import plot_curves
        plot_curves(plot_path, {f"{spec.preset}": curve.points()},
                    title=os.path.basename(str(input_file)),
                    training_length=m.config.max_position_embeddings)
    _print_summary(stats, as_json, sys.stdout)


def _make_scorer(model, spec, chunk_size, max_tokens, resume) -> Scorer:
    if resume:
        return Scorer.resume(resume, model, spec, chunk_size, max_tokens)
    from minillm.session import Session
    session = Session(model, spec.preset, spec.n_global, spec.n_local, spec.ceiling)
    return Scorer(session, chunk_size, max_tokens)


def _open_input(path: str):
    """(binary stream, seekable)."""
    if path == "-":
        return sys.stdin.buffer, False
    try:
        return open(path, "rb"), True
    except OSError as e:
        raise MiniLLMError(f"{path}: cannot read ({e.strerror})") from None


def _open_nll_out(path, scorer):
    """Open --nll-out; on resume, cut it back to what the checkpoint had written, then append."""
    if not path:
        return None
    try:
        if "nll_out_bytes" in scorer.notes and os.path.exists(path):
            f = open(path, "r+", encoding="utf-8")
            f.truncate(scorer.notes["nll_out_bytes"])
            f.seek(0, os.SEEK_END)
            return f
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise MiniLLMError(f"{path}: cannot write ({e.strerror})") from None
