"""Session checkpoints: the cache slots in use plus one flat metadata record, written atomically.

File: a NumPy .npz holding `k`, `v`, `k_raw`, `pos`, `last_hidden` and `meta`, the UTF-8 JSON of
a flat record: `format`, `model` (the model's fingerprint), the attention settings (`preset`,
`n_global`, `n_local`, `ceiling`), `position`, and whatever flat keys the caller adds (the
scorer adds its sums and where it is in the input). Checkpoints of format 1 (minillm 0.1 before
this module) nested a second JSON inside; they are refused with a message saying so.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import numpy as np

from .backend import to_device, to_host
from .errors import MiniLLMError

FORMAT = 2
ARRAYS = ("k", "v", "k_raw", "pos", "last_hidden")
CHECKPOINT_KEYS = ("format", "model", "preset", "n_global", "n_local", "ceiling", "position")


def write_checkpoint(path: str, session, record: dict | None = None) -> None:
    """Write `session` and the caller's flat `record` to `path`: a temporary file, fsynced, then
    renamed over `path`, so a crash leaves either the old checkpoint or the new one."""
    record = dict(record or {})
    flat = (str, int, float, bool, type(None))
    clash = [k for k in record if k in CHECKPOINT_KEYS or not isinstance(record[k], flat)]
    if clash:
        raise ValueError(f"checkpoint record keys must be flat and not {CHECKPOINT_KEYS}: {clash}")
    spec = session.spec
    meta = {"format": FORMAT, "model": session.model.fingerprint, "preset": spec.preset,
            "n_global": spec.n_global, "n_local": spec.n_local, "ceiling": spec.ceiling,
            "position": session.position, **record}
    last = session.last_hidden
    arrays = dict(session.cache.used_slots(),
                  last_hidden=to_host(last) if last is not None else np.zeros(0, np.float32))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable."""
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


def read_checkpoint(path: str, model):
    """(the saved session for `model`, the flat record). One clear MiniLLMError otherwise."""
    from .session import AttentionWarning, Session

    try:
        with np.load(path) as f:
            meta = json.loads(f["meta"].tobytes())
            arrays = {k: f[k] for k in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise MiniLLMError(f"{path}: not a minillm checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise MiniLLMError(f"{path}: a checkpoint of format {version}, this minillm reads format "
                           f"{FORMAT} only: start the run again")
    if meta.get("model") != model.fingerprint:
        raise MiniLLMError(f"{path}: the checkpoint was made with another model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttentionWarning)
            session = Session(model, meta["preset"], meta["n_global"], meta["n_local"],
                              meta["ceiling"])
        session.cache.restore(arrays["k"], arrays["v"], arrays["k_raw"], arrays["pos"],
                              meta["position"])
    except (KeyError, TypeError, ValueError) as e:
        raise MiniLLMError(f"{path}: a damaged minillm checkpoint ({type(e).__name__})") from None
    if arrays["last_hidden"].size:
        session.last_hidden = to_device(model.xp, arrays["last_hidden"])
    return session, meta
