"""What every command shares: model loading options, error and warning reporting, exit codes."""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings

import click

import minillm
from minillm.errors import MiniLLMError
from minillm.sampling import SamplingParams

EXIT_SIGINT = 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"minillm: warning: {message}", file=sys.stderr, flush=True)


def setup_process() -> None:
    """One-line warnings; a closed stdout ends the process quietly (exit 141), as for any Unix
    tool."""
    warnings.showwarning = _show_warning
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def reports_errors(fn):
    """Turn library errors into one clear line and exit 1; Ctrl-C into exit 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MiniLLMError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            sys.exit(EXIT_SIGINT)
    return wrapper


def model_argument(fn):
    return click.argument("model", type=click.Path(dir_okay=True, path_type=str))(fn)


def backend_options(fn):
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="CPU threads (default: all cores): BLAS's, and with at most 4, "
                           "the threads a long chunk is split over.")(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default="auto",
                      show_default=True,
                      help="Array backend: cupy when it imports and sees a GPU (auto), "
                           "else numpy.")(fn)
    return fn


def load_model(path: str, backend: str, threads: int | None):
    if threads:
        set_threads(threads)
    return minillm.load(path, backend=backend)


def set_threads(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        os.environ["OMP_NUM_THREADS"] = str(n)  # only reaches BLAS pools not yet started
        return
    threadpool_limits(n)


def sampling_options(fn):
    """The same sampling options on `chat` and `generate`."""
    d = SamplingParams()
    opts = [
        click.option("--max-tokens", type=click.IntRange(min=0), default=d.max_tokens,
                     show_default=True, help="Most new tokens per answer."),
        click.option("--seed", type=int, default=None,
                     help="Random seed (same seed, same answer)."),
        click.option("--repeat-last-n", type=click.IntRange(min=0), default=d.repeat_last_n,
                     show_default=True, help="How many recent tokens the repeat penalty sees."),
        click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True),
                     default=d.repeat_penalty, show_default=True,
                     help="Penalty for recently seen tokens (1.0 = off)."),
        click.option("--min-p", type=click.FloatRange(0, 1), default=d.min_p, show_default=True,
                     help="Drop tokens below min-p x the top probability (0 = off)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=d.top_p,
                     show_default=True, help="Nucleus sampling mass (1.0 = off)."),
        click.option("--top-k", type=click.IntRange(min=0), default=d.top_k, show_default=True,
                     help="Sample among the k most likely tokens (0 = off)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=d.temperature,
                     show_default=True, help="Sampling temperature; 0 = greedy (argmax)."),
    ]
    for opt in opts:
        fn = opt(fn)
    return fn


def sampling_params(kw: dict) -> SamplingParams:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
            "seed", "max_tokens")
    return SamplingParams(**{k: kw.pop(k) for k in keys})
