"""`minillm.load`: a small façade over config, weights, tokenizer and backend."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings

import numpy as np

from .backend import get_backend, to_host
from .config import Config
from .errors import ModelFileError
from .rope import inv_freq
from .tensorfile import SafetensorsFile
from .tokenizer import Tokenizer, check_vocab
from .weights import load_weights


class SingleFileSource:
    """minillm's self-contained .safetensors: config, tokenizer and template in __metadata__."""

    def __init__(self, file: SafetensorsFile):
        meta, name = file.metadata, os.path.basename(file.path)
        self.file = file
        try:
            self.config = json.loads(meta["minillm.config"])
            self.tokenizer_config = json.loads(meta.get("minillm.tokenizer_config", "{}"))
        except json.JSONDecodeError:
            raise ModelFileError(f"{name}: corrupt minillm metadata (config is not JSON)") from None
        if not isinstance(self.tokenizer_config, dict):
            raise ModelFileError(f"{name}: corrupt minillm metadata (tokenizer config)")
        self.tokenizer_json = meta.get("minillm.tokenizer_json")
        self.sentencepiece_model = None
        if "minillm.sentencepiece_b64" in meta:
            try:
                self.sentencepiece_model = base64.b64decode(meta["minillm.sentencepiece_b64"],
                                                            validate=True)
            except ValueError:
                raise ModelFileError(f"{name}: corrupt SentencePiece model in metadata") from None
        if self.tokenizer_json is None and self.sentencepiece_model is None:
            raise ModelFileError(f"{name}: the file carries no tokenizer")
        self.chat_template = meta.get("minillm.chat_template")

    def keys(self):
        return list(self.file.entries)

    def shape(self, key):
        return self.file.shape(key)

    def tensor(self, key):
        return self.file.tensor(key)


def open_model_source(path: str):
    """The source behind a path: our single file, a HF folder or its model.safetensors, a GGUF."""
    from .convert import open_source

    path = str(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            file = SafetensorsFile(path)
            if "minillm.config" in file.metadata:
                return SingleFileSource(file)
            if not os.path.exists(os.path.join(os.path.dirname(path) or ".", "config.json")):
                raise ModelFileError(f"{os.path.basename(path)}: a safetensors file without a "
                                     f"model config (neither minillm metadata nor config.json "
                                     f"beside it); convert it with `minillm convert`")
    return open_source(path)


def build_tokenizer(src, cfg: Config, name: str) -> Tokenizer:
    bos = cfg.bos_token_id
    eos = cfg.eos_token_id[0] if cfg.eos_token_id else None
    try:
        if src.tokenizer_json is not None:
            tok = Tokenizer.from_tokenizer_json(src.tokenizer_json, src.tokenizer_config,
                                                bos_id=bos, eos_id=eos)
        else:
            tok = Tokenizer.from_sentencepiece(src.sentencepiece_model, src.tokenizer_config,
                                               bos_id=bos, eos_id=eos)
        check_vocab(tok, cfg.vocab_size)
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e}") from None
    return tok


def stored_dtype(src) -> str:
    """The dtypes the weights are stored in, e.g. "F32" or "BF16,F32"."""
    files = [src.file] if isinstance(src, SingleFileSource) else getattr(src, "_files", None)
    if not files:
        return "GGUF (dequantized to F32)"
    return ",".join(sorted({f.dtype(k) for f in files for k in f.entries}))


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
        src = open_model_source(path)
        self.config = Config.from_dict(src.config, source=name)
        self.tokenizer = build_tokenizer(src, self.config, name)
        self.chat_template: str | None = src.chat_template
        self.stored_dtype = stored_dtype(src)
        self.weights = load_weights(src, self.config, self.xp, name)
        self.fingerprint = fingerprint(self.config, self.weights)
        self.freq = inv_freq(self.config)  # float64 RoPE inverse frequencies
        self.eos_ids = frozenset(self.config.eos_token_id) | (
            {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set())

    @property
    def backend(self) -> str:
        return "numpy" if self.xp is np else "cupy"

    def session(self, attention: str = "lminfinite", n_global: int | None = None,
                n_local: int | None = None, ceiling: int | None = None):
        from .session import Session
        return Session(self, attention, n_global, n_local, ceiling)

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
