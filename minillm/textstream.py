"""Reading a byte stream of any size as text pieces that tokenize exactly like the whole.

Pieces are cut in the raw bytes at a space that follows an ASCII letter or digit and precedes a
non-space: every supported pre-tokenizer (GPT-2 / Llama 3 regexes, SentencePiece's "▁" words)
ends a token there and starts the next one with that space, so tokenizing piece by piece
gives the ids of tokenizing the whole text. An ASCII space is never inside a UTF-8 sequence,
so each piece also decodes on its own. A run of more than `max_run` bytes with no such
boundary is cut anyway (at a character boundary), with a warning.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

READ_BLOCK = 1 << 18      # bytes read at a time
MAX_RUN = 1 << 20         # the longest stretch without a safe cut before cutting anyway
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


class InputWarning(UserWarning):
    """The input is not clean text (invalid UTF-8, NUL bytes) or had to be cut unsafely."""


@dataclass
class Piece:
    text: str
    start: int        # byte offset of the piece in the stream
    raw: bytes        # the bytes it covers

    def raw_length(self, n_chars: int) -> int:
        """The input bytes behind the first n_chars characters of text (see raw_prefix_length)."""
        return len(self.raw) if n_chars >= len(self.text) else raw_prefix_length(self.raw, n_chars)


def raw_prefix_length(raw: bytes, n_chars: int) -> int:
    """How many bytes of raw decode (UTF-8, invalid bytes replaced) to its first n_chars
    characters. A U+FFFD that replaced invalid bytes stands for those bytes (one to three, the
    span Python's decoder replaces at once), not for the three bytes of its own encoding."""
    data, pos, left = memoryview(raw), 0, n_chars
    while left > 0 and pos < len(raw):
        try:
            text, _ = codecs.utf_8_decode(data[pos:], "strict", True)
        except UnicodeDecodeError as e:  # valid up to e.start, then one U+FFFD for the span
            text, bad_end = bytes(data[pos:pos + e.start]).decode("utf-8"), pos + e.end
        else:
            bad_end = None
        if left <= len(text) or bad_end is None:
            return pos + len(text[:left].encode("utf-8"))
        left -= len(text) + 1
        pos = bad_end
    return pos


def _last_safe_cut(buf: bytes) -> int:
    """The largest k with buf[k] == b' ', buf[k-1] ASCII alnum, buf[k+1] not whitespace; else -1."""
    k = buf.rfind(b" ", 1, len(buf) - 1)
    while k > 0:
        if buf[k - 1] in _ALNUM and buf[k + 1] not in _WHITESPACE:
            return k
        k = buf.rfind(b" ", 1, k)
    return -1


def _char_boundary(buf: bytes, k: int) -> int:
    """Move k back so that it does not split a UTF-8 sequence (continuation bytes are 10xxxxxx)."""
    j = k
    while j > 0 and (buf[j] & 0xC0) == 0x80:
        j -= 1
    return j or k


class _Decoder:
    """Decodes pieces with replacement; one warning for unclean text (invalid UTF-8, NUL bytes)."""

    def __init__(self):
        self.warned: set[str] = set()

    def __call__(self, raw: bytes) -> str:
        problems = []
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("is not valid UTF-8 (invalid bytes are replaced by U+FFFD)")
            text = raw.decode("utf-8", errors="replace")
        if "\x00" in text:
            problems.append("contains NUL bytes (binary data?)")
        if problems:  # one line for the whole stream, however much of it is binary
            self.warn("text", f"the input {' and '.join(problems)}; scoring it as text")
        return text

    def warn(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, InputWarning, stacklevel=4)


def read_pieces(stream: BinaryIO, start: int = 0, block: int = READ_BLOCK,
                max_run: int = MAX_RUN) -> Iterator[Piece]:
    """Yield text pieces of a binary stream, each ending at a safe cut (the last one at EOF).

    start: the stream's byte offset at the first read (when resuming mid-file).
    """
    decode, buf, offset = _Decoder(), b"", start
    while data := stream.read(block):
        buf += data
        if len(buf) < block:
            continue
        cut = _last_safe_cut(buf)
        if cut < 0:
            if len(buf) <= max_run:
                continue
            decode.warn("cut", f"no safe place to cut the input for {max_run} bytes; cutting "
                               f"inside a word (the tokens there may differ slightly)")
            cut = _char_boundary(buf, max_run)
        raw, buf = buf[:cut], buf[cut:]
        yield Piece(decode(raw), offset, raw)
        offset += len(raw)
    if buf:
        yield Piece(decode(buf), offset, buf)
