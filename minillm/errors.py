"""Errors that reach the user as one clear line (the CLI prints str(err) and exits 1)."""

from __future__ import annotations


class MiniLLMError(Exception):
    """Base class: a runtime error whose message is one line meant for the user."""


class ModelFileError(MiniLLMError):
    """A model file (or folder) is missing, corrupt, inconsistent or unsupported."""


def one_line(err: BaseException) -> str:
    """A library's error message to quote in ours: all of it on one line, or the error's type."""
    return " ".join(str(err).split()) or type(err).__name__


class WriteError(MiniLLMError):
    """An output could not be written (full disk, read-only folder, closed stream): what was
    computed is still reported, then this line."""
