"""Hugging Face model folders: the only place that knows their files and tokenizer-config rules.

A folder holds config.json, model.safetensors (or shards named by model.safetensors.index.json),
tokenizer.json or tokenizer.model, tokenizer_config.json and maybe a chat template file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFileError, one_line
from .safetensors import SafetensorsFile, stored_dtypes


class HFFolderSource:
    """A Hugging Face model folder (or its model.safetensors): config, tokenizer, lazy tensors."""

    def __init__(self, path):
        path = str(path)
        if os.path.isdir(path):
            self.folder, weights = path, None
        else:
            self.folder, weights = os.path.dirname(path) or ".", path
        self.name = self.folder
        self._files = self._open_weights(weights)
        self.config = _read_json(self.folder, "config.json")
        self._where = {k: f for f in self._files for k in f.entries}
        tokenizer = read_tokenizer(self.folder)
        self.tokenizer_json = tokenizer.tokenizer_json
        self.sentencepiece_model = tokenizer.sentencepiece_model
        self.tokenizer_config = tokenizer.tokenizer_config
        self.chat_template = tokenizer.chat_template

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _open_weights(self, weights: str | None) -> list[SafetensorsFile]:
        if weights is not None:
            return [SafetensorsFile(weights)]
        if os.path.exists(self._file("model.safetensors")):
            return [SafetensorsFile(self._file("model.safetensors"))]
        index = _read_json(self.folder, "model.safetensors.index.json", required=False)
        if index is None:
            raise ModelFileError(f"{self.name}: no model.safetensors or "
                                 f"model.safetensors.index.json in the folder"
                                 f"{_other_models(self.folder)}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{self.name}: model.safetensors.index.json has no weight_map")
        shards = {}
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(self._file(shard)):
                raise ModelFileError(f"{self.name}: the shard index names {shard}, "
                                     f"which does not exist")
            shards[shard] = SafetensorsFile(self._file(shard))
        for tensor, shard in weight_map.items():
            if tensor not in shards[shard].entries:
                raise ModelFileError(f"{self.name}: the shard index puts {tensor} in {shard}, "
                                     f"which does not hold it")
        return list(shards.values())

    @property
    def stored_dtype(self) -> str:
        return stored_dtypes(self._files)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def tensor(self, name: str) -> np.ndarray:
        return self._where[name].tensor(name)


def _other_models(folder: str) -> str:
    """A hint naming the model files a folder holds under other names (a GGUF, a minillm file)."""
    found = sorted(n for n in os.listdir(folder) if n.lower().endswith((".gguf", ".safetensors")))
    if not found:
        return ""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"; it holds {found[0]!r}{more}: give that file as the model"


@dataclass(frozen=True)
class FolderTokenizer:
    """A folder's tokenizer as a model source presents it (see minillm.formats)."""

    tokenizer_json: str | None
    sentencepiece_model: bytes | None
    tokenizer_config: dict
    chat_template: str | None


def read_tokenizer(folder) -> FolderTokenizer:
    """tokenizer.json (preferred) or tokenizer.model, the normalized config, the chat template."""
    folder = str(folder)
    tokenizer_json, sentencepiece_model = _read(folder, "tokenizer.json"), None
    if tokenizer_json is not None:
        add_bos_default = post_processor_bos(tokenizer_json) is not None
    elif (sentencepiece_model := _read(folder, "tokenizer.model", binary=True)) is not None:
        add_bos_default = True  # LlamaTokenizer's default
    else:
        raise ModelFileError(f"{folder}: no tokenizer.json or tokenizer.model in the folder")
    raw = _read_json(folder, "tokenizer_config.json", required=False) or {}
    return FolderTokenizer(tokenizer_json, sentencepiece_model,
                           normalize_tokenizer_config(raw, add_bos_default),
                           _chat_template(folder, raw))


def _chat_template(folder: str, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template:
        return template
    # recent transformers save the template beside tokenizer_config.json
    jinja = _read(folder, "chat_template.jinja")
    if jinja is not None:
        return jinja
    return (_read_json(folder, "chat_template.json", required=False) or {}).get("chat_template")


def post_processor_bos(tokenizer_json: str) -> str | None:
    """The special token tokenizer.json's post-processor puts before the text (Llama 3), if any."""
    try:
        post = json.loads(tokenizer_json).get("post_processor") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    processors = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for p in processors:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return first["SpecialToken"]["id"] if "SpecialToken" in first else None
    return None


def normalize_tokenizer_config(raw: dict, add_bos_default: bool) -> dict:
    """Keep what the runtime needs: add_bos_token and the BOS/EOS texts as plain strings."""
    out = {"add_bos_token": bool(raw.get("add_bos_token", add_bos_default))}
    for key in ("bos_token", "eos_token"):
        v = raw.get(key)
        if isinstance(v, dict):  # a serialized AddedToken
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    return out


def _read(folder: str, name: str, binary: bool = False):
    """A file's bytes (or UTF-8 text), or None when it does not exist."""
    try:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        return data if binary else data.decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{folder}: cannot read {name} ({one_line(e)})") from None


def _read_json(folder: str, name: str, required: bool = True):
    text = _read(folder, name)
    if text is None:
        if not required:
            return None
        raise ModelFileError(f"{folder}: no {name} in the folder")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{folder}: {name} is not valid JSON ({e.msg})") from None
