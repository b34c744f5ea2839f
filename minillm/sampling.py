"""Token sampling: pure functions of logits, parameters and an injected random generator.

Order (as transformers' warpers): repeat penalty, temperature, top-k, top-p, min-p, then draw.
`temperature == 0` means argmax (after the repeat penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MiniLLMError


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
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution actually sampled from: [V] float64, zero outside the kept set."""
    z = logits.astype(np.float64) / p.temperature
    if 0 < p.top_k < len(z):
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max())
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
        return int(np.argmax(logits))
    probs = filtered_probs(logits, p)
    if not np.isfinite(probs).all():
        raise MiniLLMError("the model produced NaN or inf logits: nothing to sample from "
                           "(are the weights damaged?)")
    return int(rng.choice(len(probs), p=probs))
