"""Scoring a byte stream of any length: per-token NLL in constant memory, resumable.

The stream is read and tokenized piece by piece (minillm.textstream), fed through a session in
chunks, and summed. A checkpoint holds the session, the running sums and where in the input
the next token comes from, so an interrupted run continues to the same result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import BinaryIO

import numpy as np

from .attention import AttentionSpec
from .checkpoint import CHECKPOINT_KEYS, read_checkpoint, write_checkpoint
from .config import is_int
from .errors import MiniLLMError
from .session import Interrupted, Session, check_chunk_size
from .textstream import read_pieces

CHECK_WINDOW = 1 << 20  # the last bytes before the resume point, hashed to recognise the input


class ScoreWarning(UserWarning):
    """The scores are NaN: the model computed NaN (NaN or inf in its weights or activations)."""


@dataclass
class ScoreStats:
    tokens: int = 0          # tokens read and fed
    predicted: int = 0       # tokens with an NLL (all but a first token without BOS)
    total_nll: float = 0.0   # nats
    n_bytes: int = 0         # input bytes the scored tokens cover (as read, before any U+FFFD)
    seconds: float = 0.0

    def add(self, nll: np.ndarray, first_position: int) -> None:
        """Count predictions (NLL of the tokens from first_position on); the first NaN among
        them is reported once, since a NaN result otherwise comes with no reason."""
        total = float(np.sum(nll, dtype=np.float64))
        if math.isnan(total) and not math.isnan(self.total_nll):
            at = first_position + int(np.flatnonzero(np.isnan(nll))[0])
            warnings.warn(f"the model's NLL is NaN from token {at} on (NaN or inf in its weights "
                          "or activations): the mean NLL, perplexity and bits per byte are NaN",
                          ScoreWarning, stacklevel=3)
        self.predicted += len(nll)
        self.total_nll += total

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.predicted if self.predicted else float("nan")

    @property
    def perplexity(self) -> float:
        if not self.predicted:
            return float("nan")
        try:
            return math.exp(self.mean_nll)
        except OverflowError:  # a mean NLL above ~709 nats
            return float("inf")

    @property
    def bits_per_byte(self) -> float:
        """NaN where nothing was predicted: 0.0 would claim a perfect prediction."""
        if not (self.predicted and self.n_bytes):
            return float("nan")
        return self.total_nll / math.log(2) / self.n_bytes

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"tokens": self.tokens, "mean_nll": self.mean_nll, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "predicted": self.predicted,
                "bytes": self.n_bytes}


@dataclass
class InputPosition:
    """Where the next token comes from: the piece starting at `piece_start`, after `skip` ids."""
    piece_start: int = 0
    skip: int = 0
    window_sha256: str = hashlib.sha256(b"").hexdigest()  # of the CHECK_WINDOW bytes before it
    scored_sha256: str | None = None  # of the piece's first `skip` ids (None: not checked)


def _ids_bytes(ids) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


class Scorer:
    """Feeds a stream through a session and keeps the sums; `stats` is valid between chunks."""

    def __init__(self, session: Session, chunk_size: int = 512, max_tokens: int | None = None):
        check_chunk_size(chunk_size)
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an int >= 1 (got {max_tokens!r})")
        self.session, self.chunk_size, self.max_tokens = session, chunk_size, max_tokens
        self.tokenizer = session.model.tokenizer
        self.stats = ScoreStats()
        self.at = InputPosition()
        self._tail = b""  # recent input bytes before the current piece (bounded)
        self._piece, self._piece_ids = None, None  # a piece being scored and its ids
        self._scored = hashlib.sha256()  # of the current piece's ids fed so far
        self.notes: dict = {}  # the caller's own flat state, saved with checkpoints

    def run(self, stream: BinaryIO, on_chunk: Callable | None = None,
            stop: Callable[[], bool] = lambda: False) -> ScoreStats:
        """Score until EOF, max_tokens or stop(); on_chunk(scorer, first_position, ids, nll)."""
        start_time = time.perf_counter() - self.stats.seconds
        skip = self.at.skip
        # resuming inside a piece: the ids skipped must be the ones the checkpoint scored
        check, skipped = (self.at.scored_sha256 if skip else None), hashlib.sha256()
        pieces = read_pieces(stream, start=self.at.piece_start)
        for piece in pieces:
            ids = self.tokenizer.encode_continuation(piece.text, first=piece.start == 0)
            if check is not None:
                skipped.update(_ids_bytes(ids[:skip]))
                if skip <= len(ids):
                    self._check_skipped(skipped, check)
                    check = None
            self.at = InputPosition(piece.start, skip, hashlib.sha256(self._tail).hexdigest())
            self._scored = hashlib.sha256(_ids_bytes(ids[:skip]))
            done = self._score_piece(piece, ids, skip, on_chunk, stop, start_time)
            skip = max(0, skip - len(ids))
            if not done:
                break
            self._tail = (self._tail + piece.raw)[-CHECK_WINDOW:]
        if check is not None:
            self._check_skipped(skipped, check)
        self.stats.seconds = time.perf_counter() - start_time
        return self.result()

    @staticmethod
    def _check_skipped(skipped, want: str) -> None:
        if skipped.hexdigest() != want:
            raise MiniLLMError("the input does not continue the text the checkpoint scored "
                               "(the tokens already scored differ)")

    def _score_piece(self, piece, ids, skip, on_chunk, stop, start_time) -> bool:
        """Feed one piece's ids (after `skip` already fed); False when the run should stop."""
        st = self.stats
        self._piece, self._piece_ids = piece, ids
        a = end = min(skip, len(ids))
        while a < len(ids):
            if stop() or (self.max_tokens is not None and st.tokens >= self.max_tokens):
                return False
            if a == end:
                end = min(len(ids), a + self.chunk_size)
                if self.max_tokens is not None:
                    end = min(end, a + self.max_tokens - st.tokens)
            # [a, end) one of the session's chunks at a time: an interrupted call fed nothing
            b = a + self.session.chunk_length(end - a, self.chunk_size)
            first = self.session.position
            try:
                nll = self.session.nll(ids[a:b], chunk_size=self.chunk_size)
            except Interrupted:  # a signal abandoned the chunk: the session is still at `first`
                return False
            st.tokens += b - a
            # only the stream's very first token has no prediction: a NaN anywhere else is a
            # real NaN (NaN weights) and must show in the result, not be skipped
            scored = nll[1:] if first == 0 else nll
            st.add(scored, first + len(nll) - len(scored))
            self._scored.update(_ids_bytes(ids[a:b]))
            self.at.skip = a = b
            st.seconds = time.perf_counter() - start_time
            if on_chunk:
                on_chunk(self, first, ids[b - len(nll):b], nll)
        st.n_bytes += len(piece.raw)  # bytes count once a piece is complete
        self._piece, self._piece_ids = None, None
        return True

    def result(self) -> ScoreStats:
        """The stats, with the bytes of a piece that was only partly scored."""
        st = dataclasses.replace(self.stats)
        if self._piece_ids is not None and self.at.skip:
            st.n_bytes += self._scored_bytes(self._piece, self._piece_ids, self.at.skip)
        return st

    def _scored_bytes(self, piece, ids, n: int) -> int:
        """The input bytes a piece's first n ids cover.

        Their share of the piece's text is counted from its end: the text less what the other
        ids decode to after them, so that a leading space a tokenizer drops or adds in decoding
        falls on the right side. A character split between the two (byte-level tokens) goes
        with the ids not yet scored: its first bytes decode to U+FFFD, which differs from the
        character, unless the character is itself a U+FFFD (invalid input); then the bytes
        left over, decoded alone, add U+FFFDs of their own, which a clean cut never does.
        Each U+FFFD that replaced invalid input counts the bytes it replaced (Piece.raw_length).
        """
        decode = self.tokenizer.decode
        whole, scored = decode(ids, skip_special=True), decode(ids[:n], skip_special=True)
        common = len(os.path.commonprefix([whole, scored]))
        if common == len(scored) and scored.endswith("\ufffd") and \
                len(scored) + len(decode(ids[n:], skip_special=True)) > len(whole):
            common -= 1
        return piece.raw_length(max(0, len(piece.text) - (len(whole) - common)))

    # --- checkpoints (minillm.checkpoint): one flat record -----------------------------------
    def save(self, path: str) -> None:
        self.at.scored_sha256 = self._scored.hexdigest()
        record = {"chunk_size": self.chunk_size, **asdict(self.stats), **asdict(self.at),
                  **self.notes}
        write_checkpoint(path, self.session, record)

    @classmethod
    def resume(cls, path: str, model, spec: AttentionSpec, chunk_size: int = 512,
               max_tokens: int | None = None) -> Scorer:
        """A scorer resuming a checkpoint; refused unless made with the same model and settings."""
        session, record = read_checkpoint(path, model)
        have = {"chunk_size": record.get("chunk_size"), **asdict(session.spec)}
        want = {"chunk_size": chunk_size, **asdict(spec)}
        if have != want:
            diffs = [f"{k} {have[k]} there, {want[k]} here" for k in want if have[k] != want[k]]
            raise MiniLLMError(f"{path}: the checkpoint was made with other settings "
                               f"({'; '.join(diffs)})")
        stats = _from_record(ScoreStats, record, path)
        at = _from_record(InputPosition, record, path)
        scorer = cls(session, chunk_size, max_tokens)
        scorer.stats, scorer.at = stats, at
        own = {"chunk_size"} | {f.name for f in fields(ScoreStats) + fields(InputPosition)}
        scorer.notes = {k: v for k, v in record.items()
                        if k not in own and k not in CHECKPOINT_KEYS}
        return scorer

    def seek_input(self, stream: BinaryIO, seekable: bool) -> None:
        """Position `stream` at the resume point, checking it holds the text scored before."""
        start = self.at.piece_start
        lo = max(0, start - CHECK_WINDOW)
        if seekable:
            stream.seek(lo)
        else:
            _discard(stream, lo)
        window = stream.read(start - lo)
        if len(window) != start - lo or hashlib.sha256(window).hexdigest() != self.at.window_sha256:
            raise MiniLLMError("the input does not continue the text the checkpoint scored "
                               f"(its first {start} bytes differ)")
        self._tail = window


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,),
                "str | None": (str, type(None))}


def _from_record(cls, record: dict, path: str):
    """A ScoreStats or InputPosition from a checkpoint's record, each field of its own type,
    counts not negative (a damaged record is refused, never a traceback later)."""
    values = {}
    for f in fields(cls):
        if f.name not in record:
            raise MiniLLMError(f"{path}: not a checkpoint of `minillm score` (no {f.name!r})")
        value = record[f.name]
        if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[f.type]) or (
                f.type == "int" and value < 0):  # a NaN total is honest (NaN weights)
            raise MiniLLMError(f"{path}: a damaged checkpoint ({f.name} is {value!r})")
        values[f.name] = value
    return cls(**values)


def _discard(stream: BinaryIO, n: int) -> None:
    while n > 0:
        data = stream.read(min(n, 1 << 20))
        if not data:
            raise MiniLLMError(f"the input is shorter than the checkpoint's {n} bytes")
        n -= len(data)


class NLLCurve:
    """Mean NLL in log-spaced position buckets: O(log n) memory for a stream of n tokens."""

    PER_OCTAVE = 8

    def __init__(self):
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, first_position: int, nll: np.ndarray) -> None:
        pos = np.arange(first_position, first_position + len(nll))
        ok = ~np.isnan(nll) & (pos > 0)
        if not ok.any():
            return
        buckets = np.floor(np.log2(pos[ok]) * self.PER_OCTAVE).astype(np.int64)
        for b, total, count in zip(*_group_sums(buckets, nll[ok].astype(np.float64))):
            self.sums[b] = self.sums.get(b, 0.0) + total
            self.counts[b] = self.counts.get(b, 0) + count

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(bucket centre positions, mean NLL) in position order."""
        keys = sorted(self.sums)
        centres = np.array([2 ** ((k + 0.5) / self.PER_OCTAVE) for k in keys])
        means = np.array([self.sums[k] / self.counts[k] for k in keys])
        return centres, means


def _group_sums(keys: np.ndarray, values: np.ndarray):
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq.tolist(), np.bincount(inverse, weights=values).tolist(), \
        np.bincount(inverse).tolist()
