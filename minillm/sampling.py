"""Token sampling: pure functions of logits, parameters and an injected random generator.

Order (as transformers' warpers): repeat penalty, temperature, top-k, top-p, min-p, then draw.
`temperature == 0` means argmax (after the repeat penalty).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .config import is_int
from .errors import MiniLLMError

F32_MAX = float(np.finfo(np.float32).max)


class SamplingWarning(UserWarning):
    """The logits are not usable as they are (NaN): what is sampled means little."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40          # 0: off
    top_p: float = 0.95      # 1.0: off
    min_p: float = 0.05      # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None
    max_tokens: int = 256    # new tokens per answer

    def __post_init__(self):
        for name in ("top_k", "repeat_last_n", "max_tokens", "seed"):
            value = getattr(self, name)
            if not (is_int(value) or (name == "seed" and value is None)):
                raise TypeError(f"{name} must be an int (got {type(value).__name__} {value!r})")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            value = getattr(self, name)
            if not (is_int(value) or isinstance(value, (float, np.floating))) \
                    or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number (got {value!r})")
        if self.seed is not None and self.seed < 0:
            raise ValueError("seed must be >= 0")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def apply_repeat_penalty(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """CTRL-style: a recently seen token's positive logit is divided by the penalty, a negative one
    multiplied, so its probability always drops for penalty > 1."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[seen].astype(np.float64)
    with np.errstate(over="ignore"):
        scaled = np.where(vals > 0, vals / penalty, vals * penalty)
    # an extreme penalty saturates at the largest float32 logit rather than making one inf
    # (an inf logit means a broken model to filtered_probs); a NaN or inf logit stays as it is
    out[seen] = np.where(np.isfinite(vals), np.clip(scaled, -F32_MAX, F32_MAX), vals)
    return out


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution actually sampled from: [V] float64, zero outside the kept set."""
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        # the top logit to 0 first: a tiny temperature then sends the others to -inf (their
        # limit) instead of every logit to inf; an inf or NaN logit makes NaN (sample says so)
        z = (z - z.max()) / p.temperature
    if 0 < p.top_k < len(z):
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z)
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep_n = int(np.searchsorted(cum, p.top_p)) + 1  # smallest prefix reaching top_p
        drop = order[keep_n:]
        probs[drop] = 0.0
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, recent=()) -> int:
    """One token id from host logits [V]."""
    logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
    if p.temperature == 0:
        if np.isnan(logits).any():
            warnings.warn("the model produced NaN logits: greedy decoding picks tokens "
                          "arbitrarily (are the weights damaged?)", SamplingWarning, stacklevel=2)
        return int(np.argmax(logits))
    probs = filtered_probs(logits, p)
    if not np.isfinite(probs).all():
        raise MiniLLMError("the model produced NaN or inf logits: nothing to sample from "
                           "(are the weights damaged?)")
    return int(rng.choice(len(probs), p=probs))
