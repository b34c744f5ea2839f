"""What every command shares: model loading options, error and warning reporting, exit codes."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import time
import warnings

import click

import minillm
from minillm.attention import PRESETS
from minillm.errors import MiniLLMError, WriteError
from minillm.middle import DEFAULT_FROM_LAYER
from minillm.parallel import usable_cores
from minillm.sampling import SamplingParams

from . import EXIT_SIGINT

EXIT_SIGTERM = 143


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


def attention_options(what: str, ceiling: bool = False):
    """--attention, --n-global, --n-local (and --ceiling) as chat, serve and score take them;
    `what` names whose keys lminfinite keeps in a fixed-size ring."""
    def decorate(fn):
        if ceiling:
            fn = click.option("--ceiling", type=click.IntRange(min=0), default=None,
                              help="Distance ceiling for the global tokens "
                                   "[default: n_local].")(fn)
        fn = click.option("--n-local", type=click.IntRange(min=1), default=None,
                          help="Local window in tokens [default: the model's training "
                               "length].")(fn)
        fn = click.option("--n-global", type=click.IntRange(min=0), default=None,
                          help="Starting tokens kept forever [lminfinite default: 10].")(fn)
        return click.option("--attention", type=click.Choice(PRESETS), default="lminfinite",
                            show_default=True,
                            help=f"lminfinite (Λ mask + distance ceiling: {what} stay in a "
                                 "fixed-size ring), window (local window only), full "
                                 "(unbounded cache: memory grows).")(fn)
    return decorate


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads (default: all cores): BLAS's, and at most the "
                             "threads a long chunk is split over (measured per machine: "
                             "minillm calibrate).")(fn)


def backend_options(fn):
    fn = threads_option(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default="auto",
                      show_default=True,
                      help="Array backend: cupy when it imports and sees a GPU (auto), "
                           "else numpy.")(fn)
    return fn


def load_model(path: str, backend: str, threads: int | None):
    set_threads(threads)
    return minillm.load(path, backend=backend)


def set_threads(requested: int | None) -> None:
    """BLAS threads: as requested, but never more than the cores this process may use (more
    threads than cores spin against each other: 50x slower at 8 threads on 2 cores)."""
    cores = usable_cores()
    if requested is not None and requested > cores:
        warnings.warn(f"--threads {requested} lowered to {cores}, the cores this process may "
                      "use", stacklevel=2)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        if requested:  # only reaches BLAS pools not yet started
            os.environ["OMP_NUM_THREADS"] = str(min(requested, cores))
        return
    have = max((lib["num_threads"] for lib in threadpool_info()), default=cores)
    n = min(requested or have, cores)
    if n != have:
        threadpool_limits(n)


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which every comparison lets through)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


def sampling_options(fn):
    """The same sampling options on `chat` and `generate`."""
    d = SamplingParams()
    opts = [
        click.option("--max-tokens", type=click.IntRange(min=0), default=d.max_tokens,
                     show_default=True, help="Most new tokens per answer."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
                     help="Random seed (same seed, same answer)."),
        click.option("--repeat-last-n", type=click.IntRange(min=0), default=d.repeat_last_n,
                     show_default=True, help="How many recent tokens the repeat penalty sees."),
        click.option("--repeat-penalty", type=FiniteFloat(min=0, min_open=True),
                     default=d.repeat_penalty, show_default=True,
                     help="Penalty for recently seen tokens (1.0 = off)."),
        click.option("--min-p", type=FiniteFloat(0, 1), default=d.min_p, show_default=True,
                     help="Drop tokens below min-p x the top probability (0 = off)."),
        click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=d.top_p,
                     show_default=True, help="Nucleus sampling mass (1.0 = off)."),
        click.option("--top-k", type=click.IntRange(min=0), default=d.top_k, show_default=True,
                     help="Sample among the k most likely tokens (0 = off)."),
        click.option("--temperature", type=FiniteFloat(min=0), default=d.temperature,
                     show_default=True, help="Sampling temperature; 0 = greedy (argmax)."),
    ]
    for opt in opts:
        fn = opt(fn)
    return fn


def sampling_params(kw: dict) -> SamplingParams:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
            "seed", "max_tokens")
    try:
        return SamplingParams(**{k: kw.pop(k) for k in keys})
    except ValueError as e:  # a combination the options alone cannot check
        raise click.UsageError(str(e)) from None


def top_k_middle_options(default_k: int = 0):
    """The top-k middle attention options (chat, generate, passkey)."""
    def decorate(fn):
        opts = [
            click.option("--middle-dir", type=click.Path(exists=True, file_okay=False,
                                                         writable=True, path_type=str),
                         default=None,
                         help="Folder for the middle store (a folder of its own is made in it "
                              "and removed at the end) [default: the temporary folder]."),
            click.option("--top-k-neighbours", type=click.IntRange(min=0), default=0,
                         show_default=True,
                         help="Each of the K best middle tokens comes with the middle tokens "
                              "up to N positions either side, read in order (not "
                              "LM-Infinite's method: InfLLM's idea that tokens matter with "
                              "their neighbours; K x (2N + 1) <= 8192). 0: none."),
            click.option("--top-k-insert-at", type=click.IntRange(min=0), default=None,
                         help="Distance the top-k middle keys are scored at "
                              "[default: half the training length]."),
            click.option("--top-k-from-layer", type=click.IntRange(min=0),
                         default=DEFAULT_FROM_LAYER, show_default=True,
                         help="First layer (zero-based) with top-k middle attention."),
            click.option("--top-k-middle", type=click.IntRange(min=0), default=default_k,
                         show_default=True,
                         help="The last token of each prompt and every generated token also "
                              "attend to the K best middle tokens (LM-Infinite's top-k; the "
                              "paper uses 5); every token's keys and values of the top-k "
                              "layers are kept on disk. 0: off."),
        ]
        for opt in opts:
            fn = opt(fn)
        return fn
    return decorate


def top_k_middle_settings(kw: dict) -> dict:
    """The top-k options taken out of a command's keywords, as model.session() keywords."""
    return {k: kw.pop(k) for k in ("top_k_middle", "top_k_from_layer", "top_k_insert_at",
                                   "top_k_neighbours", "middle_dir")}


PROGRESS_EVERY_S = 0.5


def progress_option(fn):
    return click.option("--progress/--no-progress", default=None,
                        help="Progress on stderr while a long input is read "
                             "[default: when stderr is a terminal].")(fn)


class PromptProgress:
    """'prompt 12,288/262,144 tokens  351 tok/s' on stderr, every PROGRESS_EVERY_S while one
    prompt is read (made anew for each prompt): a long prefill shows a sign of life, a short
    one shows nothing. The last line ends with a newline, before the answer starts."""

    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()
        self.shown = False

    def __call__(self, fed: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < PROGRESS_EVERY_S if fed < total
                                else not self.shown):
            return
        self.last, self.shown = now, True
        end = "\n" if fed == total else ""
        sys.stderr.write(f"\rprompt {fed:,}/{total:,} tokens  "
                         f"{fed / (now - self.start):,.0f} tok/s{end}")
        sys.stderr.flush()


def write_stdout(text: str) -> None:
    """Results to stdout, flushed; a write error (a full disk, /dev/full) becomes one WriteError
    line, and stdout is pointed at /dev/null so that the exit's own flush stays quiet."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):  # not a real file (a test runner's)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        raise WriteError(f"cannot write to stdout ({e.strerror or e})") from None


def on_sigterm_exit() -> None:
    """SIGTERM unwinds like Ctrl-C (exit 143), so that `finally` blocks remove temporaries."""
    def handler(signum, frame):
        sys.exit(EXIT_SIGTERM)
    signal.signal(signal.SIGTERM, handler)
