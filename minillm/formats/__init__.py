"""Model files: every reader and writer of a file format lives in this package.

- `safetensors`: safetensors files (strict header checks, memory-mapped tensors) and the writer.
- `single_file`: minillm's own self-contained .safetensors (its `minillm.*` metadata, both ways).
- `hf_folder`: Hugging Face folders, and the tokenizer-config rules they share with GGUF.
- `gguf`: llama.cpp's GGUF files, their tokenizer rebuilt as a tokenizer.json; `gguf_file`:
  the GGUF container itself, parsed strictly (every count and length checked against the file).

Each reader is a model source: `config` (a Hugging Face config.json dict), `tokenizer_json` or
`sentencepiece_model` (the other is None), `tokenizer_config` (add_bos_token and the BOS/EOS
texts, as `hf_folder.normalize_tokenizer_config` makes it), `chat_template` (or None),
`stored_dtype` (e.g. "F32", "BF16,F32", "GGUF (dequantized to F32)"), and float32 tensors under
Hugging Face Llama names and layouts, read lazily: `keys()`, `shape(name)`, `tensor(name)`.
`open_model(path)` picks the reader for a path.
"""

from __future__ import annotations

import os

from ..errors import ModelFileError
from .gguf import GGUFSource
from .hf_folder import HFFolderSource
from .safetensors import SafetensorsFile
from .single_file import SingleFileSource, is_single_file


def open_model(path) -> GGUFSource | HFFolderSource | SingleFileSource:
    """The source behind a path: our single file, a HF folder or its model.safetensors, a GGUF."""
    path = str(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _open_folder(path)
    name, head = os.path.basename(path), _head(path)
    # by the magic bytes, or by the name (then a damaged file is reported as what it is named)
    if head[:4] == b"GGUF" or name.lower().endswith(".gguf"):
        return GGUFSource(path)
    if head[8:9] != b"{" and not name.lower().endswith(".safetensors"):
        raise ModelFileError(f"{name}: not a model: neither a GGUF nor a safetensors file "
                             f"(nor a Hugging Face folder)")
    file = SafetensorsFile(path)
    if is_single_file(file):
        return SingleFileSource(file)
    if not os.path.exists(os.path.join(os.path.dirname(path) or ".", "config.json")):
        raise ModelFileError(f"{name}: a safetensors file with neither minillm metadata nor a "
                             f"config.json beside it; give the Hugging Face folder it belongs "
                             f"to (config.json and the tokenizer beside the weights)")
    return HFFolderSource(path)


def _open_folder(path: str) -> HFFolderSource | SingleFileSource:
    """A Hugging Face folder, or one that holds a minillm file named model.safetensors (and no
    config.json: the file carries its own)."""
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isfile(weights):
        file = SafetensorsFile(weights)
        if is_single_file(file):
            return SingleFileSource(file)
    return HFFolderSource(path)


def _head(path: str) -> bytes:
    """The first bytes of a file: enough for a GGUF's magic and a safetensors header's '{'."""
    try:
        with open(path, "rb") as f:
            return f.read(9)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
