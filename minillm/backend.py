"""The NumPy/CuPy switch: the only module that imports cupy.

Model code receives `xp` (the array module) and is written once against it; tokenizer,
sampling and the CLI stay on the host, and logits cross to the host once per step.
"""

from __future__ import annotations

import numpy as np

from .errors import MiniLLMError

BACKENDS = ("auto", "numpy", "cupy")

# what model code takes and returns: a numpy.ndarray, or on the GPU a cupy.ndarray (same API)
Array = np.ndarray


def _cupy_with_gpu():
    """The cupy module when it imports and sees a GPU, else None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, CUDA driver errors, ...: no usable GPU
        return None
    return None


def get_backend(name: str = "auto"):
    """The array module for `name`: auto picks cupy when it can run, else numpy."""
    if name not in BACKENDS:
        raise MiniLLMError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "numpy":
        return np
    cupy = _cupy_with_gpu()
    if cupy is not None:
        return cupy
    if name == "cupy":
        raise MiniLLMError("backend cupy requested but cupy is not installed or sees no GPU "
                           "(pip install minillm[gpu])")
    return np


def to_device(xp, a):
    """Move a host array to the backend (no copy on numpy)."""
    return a if xp is np else xp.asarray(a)


def to_host(a) -> np.ndarray:
    """Bring an array back to the host as a NumPy array (no copy on numpy)."""
    return a if isinstance(a, np.ndarray) else a.get()
