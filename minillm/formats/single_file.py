"""minillm's own single .safetensors: the only place that reads and writes its `minillm.*` metadata.

The config, tokenizer and chat template travel in the file's `__metadata__` (a string map), so the
file needs nothing beside it; the tensors are Hugging Face Llama names and layouts.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np

from ..errors import ModelFileError
from .safetensors import SafetensorsFile, stored_dtypes

FORMAT_VERSION = "1"
CONFIG_KEY = "minillm.config"


def is_single_file(file: SafetensorsFile) -> bool:
    return CONFIG_KEY in file.metadata


class SingleFileSource:
    """A model source read from the metadata and tensors of one minillm file."""

    def __init__(self, file: SafetensorsFile):
        meta, name = file.metadata, os.path.basename(file.path)
        self.file = file
        try:
            self.config = json.loads(meta[CONFIG_KEY])
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

    @property
    def stored_dtype(self) -> str:
        return stored_dtypes([self.file])

    def keys(self) -> list[str]:
        return list(self.file.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def tensor(self, name: str) -> np.ndarray:
        return self.file.tensor(name)


def metadata(src, config_json: str) -> dict[str, str]:
    """The `__metadata__` that makes a file written from `src` a minillm single file."""
    meta = {
        "minillm.format": FORMAT_VERSION,
        CONFIG_KEY: config_json,
        "minillm.tokenizer_config": json.dumps(src.tokenizer_config),
    }
    if src.tokenizer_json is not None:
        meta["minillm.tokenizer_json"] = src.tokenizer_json
    else:
        spm = base64.b64encode(src.sentencepiece_model).decode("ascii")
        meta["minillm.sentencepiece_b64"] = spm
    if src.chat_template:
        meta["minillm.chat_template"] = src.chat_template
    return meta
