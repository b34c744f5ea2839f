"""`minillm.load`: the façade over file formats, config, tokenizer, weights and backend."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np

from . import calibrate
from .backend import get_backend, to_host
from .config import Config
from .errors import ModelFileError
from .formats import open_model
from .rope import inv_freq
from .tokenizer import Tokenizer, check_vocab
from .weights import load_weights


def build_tokenizer(src, cfg: Config, name: str) -> Tokenizer:
    """The source's tokenizer, with the model config's BOS/EOS ids first, checked against it."""
    eos = cfg.eos_token_id[0] if cfg.eos_token_id else None
    try:
        tok = Tokenizer.from_source(src, bos_id=cfg.bos_token_id, eos_id=eos)
        check_vocab(tok, cfg.vocab_size)
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from None
    return tok


def fingerprint(cfg: Config, weights) -> str:
    """A short identity of the model, for checkpoints: config plus a sample of the weights."""
    h = hashlib.sha256(cfg.to_json().encode())
    h.update(np.ascontiguousarray(weights.embed[:8]).tobytes())
    h.update(np.ascontiguousarray(to_host(weights.norm)).tobytes())
    return h.hexdigest()[:16]


class Model:
    """A loaded model: config, tokenizer, weights on a backend. Math lives in minillm.model."""

    def __init__(self, path: str, backend: str = "auto"):
        name = os.path.basename(os.path.normpath(str(path)))
        self.path = str(path)
        self.xp = get_backend(backend)
        src = open_model(path)
        self.config = Config.from_dict(src.config, source=name)
        self.tokenizer = build_tokenizer(src, self.config, name)
        self.chat_template: str | None = src.chat_template
        self.stored_dtype: str = src.stored_dtype
        self.weights = load_weights(src, self.config, self.xp, name)
        self.fingerprint = fingerprint(self.config, self.weights)
        self.freq = inv_freq(self.config)  # float64 RoPE inverse frequencies
        self.eos_ids = frozenset(self.config.eos_token_id) | (
            {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set())
        if self.xp is np:  # the chunk split for this machine: measured once, then cached
            calibrate.apply(calibrate.settings_for(self)[0])

    @property
    def backend(self) -> str:
        return "numpy" if self.xp is np else "cupy"

    def session(self, attention: str = "lminfinite", n_global: int | None = None,
                n_local: int | None = None, ceiling: int | None = None, **top_k):
        """A new session; top_k: top_k_middle, top_k_from_layer, top_k_insert_at,
        top_k_neighbours, middle_dir (and middle_dtype), see minillm.session.Session."""
        from .session import Session
        return Session(self, attention, n_global, n_local, ceiling, **top_k)

    def logits(self, ids) -> np.ndarray:
        """Float32 logits [len(ids), vocab] with ordinary causal attention (no window)."""
        from .session import AttentionWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AttentionWarning)
            s = self.session("full")
        return s.feed(ids, logits="all")

    def chat(self, system: str | None = None, **sampling):
        from .chat import Chat
        return Chat(self, system=system, **sampling)


def load(path, backend: str = "auto") -> Model:
    """Load a model: minillm's single .safetensors file, a Hugging Face folder, or a GGUF."""
    return Model(path, backend)
