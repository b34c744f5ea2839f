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
TOKENIZER_CONFIG_KEY = "minillm.tokenizer_config"
# the JSON metadata keys, in words for messages
JSON_KEYS = {CONFIG_KEY: "the model config", TOKENIZER_CONFIG_KEY: "the tokenizer config"}


def is_single_file(file: SafetensorsFile) -> bool:
    return CONFIG_KEY in file.metadata


class SingleFileSource:
    """A model source read from the metadata and tensors of one minillm file."""

    def __init__(self, file: SafetensorsFile):
        meta, name = file.metadata, os.path.basename(file.path)
        self.file = file
        version = meta.get("minillm.format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{name}: minillm file format {version!r}; this minillm reads "
                                 f"format {FORMAT_VERSION}")
        self.config = _json_object(meta, CONFIG_KEY, name)
        self.tokenizer_config = _tokenizer_config(meta, name)
        self.tokenizer_json = meta.get("minillm.tokenizer_json")
        self.sentencepiece_model = None
        if "minillm.sentencepiece_b64" in meta:
            try:
                self.sentencepiece_model = base64.b64decode(meta["minillm.sentencepiece_b64"],
                                                            validate=True)
            except ValueError:
                raise ModelFileError(f"{name}: corrupt minillm metadata: "
                                     f"minillm.sentencepiece_b64 is not base64") from None
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


def _json_object(meta: dict[str, str], key: str, name: str) -> dict:
    """The JSON object stored under `key`; one line naming the key and the problem otherwise."""
    what = f"{key} ({JSON_KEYS[key]})"
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser's depth
        problem = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise ModelFileError(f"{name}: corrupt minillm metadata: {what} is not JSON "
                             f"({problem})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{name}: corrupt minillm metadata: {what} is a JSON "
                             f"{_json_type(value)}, not an object")
    return value


def _tokenizer_config(meta: dict[str, str], name: str) -> dict:
    """The normalized tokenizer config `metadata` writes: add_bos_token a boolean, the BOS and
    EOS texts strings (each may be absent)."""
    key = TOKENIZER_CONFIG_KEY
    if key not in meta:
        return {}
    config = _json_object(meta, key, name)
    kinds = {"add_bos_token": (bool, "true or false"), "bos_token": (str, "a string"),
             "eos_token": (str, "a string")}
    for field, (kind, expected) in kinds.items():
        if field in config and not isinstance(config[field], kind):
            raise ModelFileError(f"{name}: corrupt minillm metadata: {field} in {key} is a JSON "
                                 f"{_json_type(config[field])}, not {expected}")
    return config


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def metadata(src, config_json: str) -> dict[str, str]:
    """The `__metadata__` that makes a file written from `src` a minillm single file."""
    meta = {
        "minillm.format": FORMAT_VERSION,
        CONFIG_KEY: config_json,
        TOKENIZER_CONFIG_KEY: json.dumps(src.tokenizer_config),
    }
    if src.tokenizer_json is not None:
        meta["minillm.tokenizer_json"] = src.tokenizer_json
    else:
        spm = base64.b64encode(src.sentencepiece_model).decode("ascii")
        meta["minillm.sentencepiece_b64"] = spm
    if src.chat_template:
        meta["minillm.chat_template"] = src.chat_template
    return meta
