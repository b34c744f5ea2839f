"""Rotary position embeddings with exact angles at any position.

Angles are `position * inv_freq` computed in float64 and passed through cos/sin in float64
before casting: a float32 angle at position 10^8 is noise. Layout is Hugging Face's
"rotate half": the first and second halves of each head vector form the rotated pairs.
"""

from __future__ import annotations

import math

import numpy as np

from .config import Config


def inv_freq(cfg: Config) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2], float64, with rope scaling applied."""
    d = cfg.head_dim
    freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        return freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(freq, scaling)
    return freq


def _llama3_scale(freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp
    between."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    smooth = (old_len / wavelen - low) / (high - low)
    ramp = (1 - smooth) * freq / factor + smooth * freq
    out = np.where(wavelen > old_len / low, freq / factor, freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, ramp, out)


def cos_sin(positions, freq: np.ndarray, xp=np):
    """cos and sin tables [len(positions), head_dim/2] as float32 on the backend."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * freq[None, :]
    return (xp.asarray(np.cos(angles).astype(np.float32)),
            xp.asarray(np.sin(angles).astype(np.float32)))


def apply_rope(x, cos, sin, xp=np, out=None):
    """x rotated by its positions' angles, as a C-contiguous array of x's shape (`out` if given).

    x: [..., head_dim], any layout (e.g. a transposed view); cos/sin: [..., head_dim/2],
    broadcast against x's halves.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = xp.empty(x.shape, dtype=xp.float32) if out is None else out
    o1, o2 = out[..., :half], out[..., half:]
    xp.multiply(x1, cos, out=o1)
    o1 -= x2 * sin
    xp.multiply(x2, cos, out=o2)
    o2 += x1 * sin
    return out
