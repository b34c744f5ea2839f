"""The text the benchmarks read: by default the Python standard library's own source, which
every machine with Python has (`make demo` scores it too); `--text FILE` (repeatable) names
other files instead."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def text_files(given: list[str] | None) -> list[Path]:
    """The files named with --text, else the standard library's top-level modules, in order."""
    if given:
        return [Path(p) for p in given]
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def add_text_option(parser) -> None:
    parser.add_argument("--text", action="append", default=None, metavar="FILE",
                        help="a text file to read (repeatable) [default: the Python standard "
                             "library's *.py files]")


class RepeatedFiles:
    """A read()-able byte stream of the files, concatenated and repeated without end."""

    def __init__(self, paths: list[Path]):
        self.paths, self.i, self.f = paths, 0, None

    def read(self, n: int) -> bytes:
        while True:
            if self.f is None:
                self.f = open(self.paths[self.i % len(self.paths)], "rb")
                self.i += 1
            data = self.f.read(n)
            if data:
                return data
            self.f.close()
            self.f = None


def read_chars(paths: list[Path], n_chars: int) -> str:
    """The first n_chars characters of the files read one after another."""
    stream, data = RepeatedFiles(paths), b""
    while len(data) < 4 * n_chars:
        data += stream.read(1 << 16)
    return data.decode("utf-8", errors="replace")[:n_chars]
