"""The user's files: an output is never an input, a file is replaced whole or not at all, and the
leftovers of a killed run are cleaned up.

Outputs that are rewritten (checkpoints, converted models) go to `PATH.tmpPID` in the same
folder, are fsynced, then renamed over PATH: a crash, a full disk or a signal leaves either the
old file or the new one. A temporary whose process is gone is removed by the next write of PATH.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
from collections.abc import Iterator

from .errors import MiniLLMError, WriteError

TMP_SUFFIX = ".tmp"


def _identity(path_or_fd: str | int) -> tuple[int, int] | None:
    """(device, inode) of an existing regular file, following links; None for anything else
    (no file, a pipe, a terminal, /dev/null: nothing there to destroy)."""
    try:
        st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def same_file(a: str | int | None, b: str | int | None) -> bool:
    """Whether two paths (or descriptors) name the same existing regular file."""
    ia = _identity(a) if a is not None else None
    return ia is not None and ia == (_identity(b) if b is not None else None)


def model_files(path: str) -> list[str]:
    """The files a model path may be read from: the file itself, or every file of the folder."""
    if os.path.isdir(path):
        return [os.path.join(path, name) for name in sorted(os.listdir(path))]
    return [path]


def refuse_overlaps(outputs: dict[str, str | None],
                    inputs: dict[str, str | int | list[str] | None]) -> None:
    """Refuse any output that is the same file (device and inode: links and other spellings
    count) as an input or as another output, before anything is opened for writing.

    outputs: option name -> path (None: not given); inputs: name -> path, file descriptor or
    list of paths (None: not given). Outputs that do not exist yet cannot clash with inputs,
    but can with each other when spelled alike.
    """
    seen: dict[tuple, str] = {}
    for name, value in inputs.items():
        for item in value if isinstance(value, list) else [value]:
            ident = _identity(item) if item is not None else None
            if ident is not None:
                seen.setdefault(ident, name)
    for name, path in outputs.items():
        if path is None:
            continue
        ident = _identity(path)
        if ident is None and not os.path.exists(path):
            ident = ("new", os.path.realpath(path))
        if ident is None:
            continue  # a pipe or a device
        if ident in seen:
            raise MiniLLMError(f"{name} {path} is the same file as {seen[ident]}: "
                               "refusing to overwrite it")
        seen[ident] = name


def prepare_output(path: str) -> None:
    """Before long work: refuse an output whose folder is missing or not writable, and remove
    the temporaries that killed runs left beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise WriteError(f"{path}: cannot write: the folder {folder} does not exist")
    probe = _temporary(path)
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise WriteError(f"{path}: cannot write in {folder} ({e.strerror})") from None
    os.unlink(probe)
    remove_stale_temporaries(path)


def _temporary(path: str) -> str:
    return f"{path}{TMP_SUFFIX}{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process of this id exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Remove `PATH.tmpPID` files left by runs that were killed (their process is gone)."""
    for tmp in glob.glob(glob.escape(path) + TMP_SUFFIX + "*"):
        pid = tmp[len(path) + len(TMP_SUFFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def replace_atomically(path: str) -> Iterator:
    """A binary file to write; on success it is fsynced and renamed over `path` (and the rename
    made durable), on any exception (a write error, Ctrl-C, SIGTERM turned into SystemExit)
    the temporary is removed and `path` is untouched. Write errors become one MiniLLMError."""
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make a rename durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the data itself is synced
    finally:
        os.close(fd)
