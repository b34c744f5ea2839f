"""Errors that reach the user as one clear line (the CLI prints str(err) and exits 1)."""


class MiniLLMError(Exception):
    """Base class: a runtime error whose message is one line meant for the user."""


class ModelFileError(MiniLLMError):
    """A model file (or folder) is missing, corrupt, inconsistent or unsupported."""
