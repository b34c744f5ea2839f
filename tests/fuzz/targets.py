"""What a reader must do with any file: load it (and the model or session then works), or refuse
it with one MiniLLMError. Anything else is a bug: another exception, an input that takes longer
than TIME_LIMIT seconds, or one that makes the reader allocate more than MEMORY_LIMIT bytes
(traced by tracemalloc, which sees NumPy's buffers too, untouched pages included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

import minillm
from minillm.api import build_tokenizer
from minillm.checkpoint import read_checkpoint
from minillm.config import Config
from minillm.convert import convert
from minillm.errors import MiniLLMError
from minillm.formats import open_model
from minillm.weights import check_source

TIME_LIMIT = float(os.environ.get("FUZZ_TIME_LIMIT", 10))
# The seeds are ~100 KB and load with a few MB of temporaries: 256 MB means the reader
# believed a size the file does not have.
MEMORY_LIMIT = 256 << 20
LARGE_FILE = 8 << 20  # a GGUF this large (the real SmolLM2) is read but not loaded and run


class Hang(BaseException):
    """One input ran past TIME_LIMIT. A BaseException, so that no reader's `except Exception`
    can turn it into a refusal."""


class ReaderBug(AssertionError):
    """A reader did something other than load or refuse with one clean line."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(limit: int):
    """Fails afterwards if the traced peak exceeded `limit` plus what the body declares it may
    take (yielded: a dict, "allowed" bytes): the input then made the reader allocate what the
    file declared instead of what it holds."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    allowance = {"allowed": 0}
    try:
        yield allowance
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    if peak > limit + allowance["allowed"]:
        raise ReaderBug(f"allocated {peak / 2**20:.0f} MB (limit {limit / 2**20:.0f} MB)")


def _single_file_or_gguf(path: Path) -> None:
    """Open, load, run two tokens and the chat template, convert and load the result."""
    open_model(path)
    model = minillm.load(path, backend="numpy")
    model.logits([0, 1])
    # full attention: the default window could be wider than a tiny max_position_embeddings
    model.chat(attention="full").render([{"role": "user", "content": "hi"}])
    out = path.with_name("converted.safetensors")
    convert(path, out, dtype="bfloat16")
    minillm.load(out, backend="numpy").logits([1])


def _gguf_without_weights(path: Path) -> None:
    """For a large GGUF: the file, its config, tokenizer and tensor list; one small tensor."""
    src = open_model(path)
    cfg = Config.from_dict(src.config, source=path.name)
    build_tokenizer(src, cfg, path.name)
    check_source(src, cfg, path.name)
    src.tensor("model.norm.weight")


def _checkpoint(path: Path, model) -> int:
    """Read; the session then continues a stream. Returns the session's bytes: its cache is as
    large as the settings the checkpoint names (n_local, a user's choice), and Session itself
    refuses one larger than the memory there is."""
    session, _ = read_checkpoint(str(path), model)
    session.feed([3, 4], logits="last")
    session.nll([5, 6, 7])
    return session.nbytes


def check(reader: str, data: bytes, model=None, folder: Path | None = None,
          trace_memory: bool = True) -> str:
    """"loaded" or "refused" for `data` given to `reader`; ReaderBug otherwise.

    model: the model the checkpoint seeds belong to (reader "checkpoint" only).
    folder: where to write the input (emptied afterwards); a temporary folder by default.
    trace_memory: bound the allocations with tracemalloc (it triples the time per input: a
    campaign bounds its address space instead).
    """
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        suffix = {"gguf": ".gguf", "checkpoint": ".ckpt"}.get(reader, ".safetensors")
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                limit = memory_limit(MEMORY_LIMIT) if trace_memory else contextlib.nullcontext({})
                with limit as allowance, time_limit(TIME_LIMIT):
                    try:
                        if reader == "checkpoint":
                            allowance["allowed"] = _checkpoint(path, model)
                        elif reader == "gguf" and len(data) > LARGE_FILE:
                            _gguf_without_weights(path)
                        else:
                            _single_file_or_gguf(path)
                    except MiniLLMError as e:
                        message = str(e)
                        if not message or "\n" in message:
                            raise ReaderBug(f"not one line: {message!r}") from None
                        return "refused"
        except Hang as e:
            raise ReaderBug(f"hang: {e}") from None
        finally:
            for p in folder.iterdir():
                p.unlink()
    return "loaded"
