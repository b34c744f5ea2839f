"""Model files: every reader and writer of a file format lives in this package.

- `safetensors`: safetensors files (strict header checks, memory-mapped tensors) and the writer.
- `single_file`: minillm's own self-contained .safetensors (its `minillm.*` metadata, both ways).
- `hf_folder`: Hugging Face folders, and the tokenizer-config rules they share with GGUF.
- `gguf`: llama.cpp's GGUF files, their tokenizer rebuilt as a tokenizer.json.

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
        return HFFolderSource(path)
    if _is_gguf(path):
        return GGUFSource(path)
    file = SafetensorsFile(path)
    if is_single_file(file):
        return SingleFileSource(file)
    if not os.path.exists(os.path.join(os.path.dirname(path) or ".", "config.json")):
        raise ModelFileError(f"{os.path.basename(path)}: a safetensors file without a "
                             f"model config (neither minillm metadata nor config.json "
                             f"beside it); convert it with `minillm convert`")
    return HFFolderSource(path)


def _is_gguf(path: str) -> bool:
    """GGUF by its magic bytes, or by its name (then a damaged GGUF is reported as one)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    return magic == b"GGUF" or path.lower().endswith(".gguf")
