"""`minillm info` / `minillm generate` on good and bad model files (issue 2; docs/DESIGN.md,
"Model files" and the table of inputs in "Interfaces others rely on").

Every bad input gets exit status 1 and exactly one line on stderr naming the file and the
problem, never a traceback: these run the installed command as a process. Options out of
range are click usage errors (exit 2): those need no process and run in this one.
Broken files are made by rewriting the header of a converted tiny model
(8-byte little-endian header length, JSON header, data).
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_one_line_error,
    assert_usage_error,
    chatml,
    invoke_cli,
    run_cli,
    stderr_lines,
    tiny_tokenizer,
)

CHATML_FRANCE = chatml("What is the capital of France?")
NORM = "model.norm.weight"


# --- building broken single files ---------------------------------------------------------------

def read_file(path) -> tuple[dict, bytes]:
    """(header dict with __metadata__, data bytes) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_file(path, header: dict, data: bytes) -> Path:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + data)
    return Path(path)


def rewrite(src, dst, edit) -> Path:
    """Copy src to dst through edit(header, data) -> new data or None (edit the header in place)."""
    header, data = read_file(src)
    header = copy.deepcopy(header)
    new = edit(header, data)
    return write_file(dst, header, data if new is None else new)


def edit_config(**changes):
    def edit(header, data):
        cfg = json.loads(header["__metadata__"]["minillm.config"])
        cfg.update(changes)
        header["__metadata__"]["minillm.config"] = json.dumps(cfg)
    return edit


def set_value(name: str, index: int, value: float):
    """Overwrite one float32 element of tensor `name` in the data."""
    def edit(header, data):
        begin = header[name]["data_offsets"][0] + 4 * index
        return data[:begin] + np.float32(value).tobytes() + data[begin + 4:]
    return edit


@pytest.fixture
def broken(tiny_file, tmp_path):
    """broken(edit) -> path of a copy of the tiny file rewritten by edit."""
    def make(edit, name="broken.safetensors"):
        return rewrite(tiny_file, tmp_path / name, edit)
    return make


# --- a good file --------------------------------------------------------------------------------

def test_info_prints_the_config(tiny_file):
    result = run_cli("info", tiny_file)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    for key, value in (("hidden_size", "64"), ("num_hidden_layers", "2"),
                       ("num_key_value_heads", "2"), ("vocab_size", "300"),
                       ("stored_dtype", "F32"), ("parameters", "")):
        line = next((x for x in out.splitlines() if x.strip().startswith(key + ":")), None)
        assert line is not None and line.strip().endswith(value), (key, out)
    assert result.stderr == b""


def test_info_json(tiny_file):
    result = run_cli("info", tiny_file, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hidden_size"] == 64 and report["num_attention_heads"] == 4
    assert report["vocab_size"] == 300 and report["max_position_embeddings"] == 64
    assert report["parameters"] > 0 and report["memory_needed_mb"] > 0


def test_generate_on_the_tiny_file(tiny_file):
    result = run_cli("generate", tiny_file, "-p", "hello world", "--max-tokens", "5",
                     "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"\n") and result.stderr == b""


@pytest.mark.real_model
def test_generate_greedy_says_paris(real_model_path):
    result = run_cli("generate", real_model_path, "-p", CHATML_FRANCE, "--temperature", "0",
                     "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout.decode("utf-8")
    assert "Traceback" not in result.stderr.decode()


# --- files that are not models ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["info", "generate"])
def test_missing_path(tmp_path, command):
    path = tmp_path / "nope.safetensors"
    extra = ["-p", "hi"] if command == "generate" else []
    assert_one_line_error(run_cli(command, path, *extra), "nope.safetensors", "no such file")


NOT_MODELS = {
    "random_bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "text_file": b"This is a plain text file, not a model.\nIt has a few lines.\n" * 20,
    "short_text": b"hello\n",
    "empty_file": b"",
}


@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize("kind", NOT_MODELS)
def test_not_a_model_file(tmp_path, kind, command):
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(NOT_MODELS[kind])
    extra = ["-p", "hi"] if command == "generate" else []
    assert_one_line_error(run_cli(command, path, *extra), path.name, "not a safetensors file")


def test_gguf_magic_with_garbage(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 100)
    assert_one_line_error(run_cli("info", path), path.name, "GGUF")


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "notjson.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 64)
    assert_one_line_error(run_cli("info", path), path.name, "header")


def test_metadata_that_is_not_a_string_map(broken):
    def edit(header, data):
        header["__metadata__"]["minillm.config"] = {"hidden_size": 64}
    assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "metadata")


def test_tokenizer_config_that_is_not_an_object(broken):
    def edit(header, data):
        header["__metadata__"]["minillm.tokenizer_config"] = "[1, 2]"
    assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "tokenizer config")


# --- truncated files ----------------------------------------------------------------------------

def _cut(tiny_file, tmp_path, where: str) -> Path:
    raw = tiny_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    keep = {"length": 5, "header": 8 + n // 2, "data": 8 + n + (len(raw) - 8 - n) // 2,
            "last_byte": len(raw) - 1}[where]
    path = tmp_path / f"cut_in_{where}.safetensors"
    path.write_bytes(raw[:keep])
    return path


@pytest.mark.parametrize("where", ["length", "header", "data", "last_byte"])
def test_truncated_file(tiny_file, tmp_path, where):
    path = _cut(tiny_file, tmp_path, where)
    line = assert_one_line_error(run_cli("info", path), path.name)
    assert "truncated" in line or "too short" in line


def test_truncated_file_on_generate(tiny_file, tmp_path):
    path = _cut(tiny_file, tmp_path, "data")
    assert_one_line_error(run_cli("generate", path, "-p", "hello"), path.name, "truncated")


# --- headers that lie ---------------------------------------------------------------------------

def _wrong_offsets(header, data):
    begin, end = header[NORM]["data_offsets"]
    header[NORM]["data_offsets"] = [begin, end + 4]  # one element more than the shape holds


def _wrong_offsets_shifted(header, data):
    begin, end = header[NORM]["data_offsets"]
    header[NORM]["data_offsets"] = [begin + 8, end + 8]  # past the end of the data


def _shape_beyond_the_file(header, data):
    # a consistent entry (offsets match the shape) for more bytes than the file holds
    begin, _ = header[NORM]["data_offsets"]
    header[NORM]["shape"] = [64, 64]
    header[NORM]["data_offsets"] = [begin, begin + 64 * 64 * 4]


def _overlapping(header, data):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def _unsupported_dtype(header, data):
    header[NORM]["dtype"] = "I8"
    begin, end = header[NORM]["data_offsets"]
    header[NORM]["data_offsets"] = [begin, begin + (end - begin) // 4]


def _negative_offsets(header, data):
    header[NORM]["data_offsets"] = [-256, 0]


def _entry_not_an_object(header, data):
    header[NORM] = "F32"


LIES = {
    "wrong_data_offsets": (_wrong_offsets, ("header lies", NORM)),
    "offsets_past_the_end": (_wrong_offsets_shifted, ("header lies", NORM)),
    "shape_needs_more_bytes_than_the_file": (_shape_beyond_the_file, ("header lies", NORM)),
    "overlapping_tensors": (_overlapping, ("overlap",)),
    "unsupported_dtype": (_unsupported_dtype, ("unsupported dtype", "I8", NORM)),
    "negative_offsets": (_negative_offsets, (NORM,)),
    "entry_not_an_object": (_entry_not_an_object, (NORM,)),
}


@pytest.mark.parametrize("lie", LIES)
def test_header_that_lies(broken, lie):
    edit, needles = LIES[lie]
    assert_one_line_error(run_cli("info", broken(edit), limit_memory=True),
                          "broken.safetensors", *needles)


@pytest.mark.parametrize("shape", [[2 ** 40, 2 ** 40], [2 ** 20, 2 ** 20], [2 ** 31, 1]])
def test_huge_shapes_refused_before_any_allocation(broken, shape):
    def edit(header, data):
        begin, _ = header[NORM]["data_offsets"]
        header[NORM]["shape"] = shape
        header[NORM]["data_offsets"] = [begin, begin + int(np.prod(shape, dtype=object)) * 4]
    # run with 1 GB of address space: allocating what the header declares would fail loudly
    assert_one_line_error(run_cli("info", broken(edit), limit_memory=True),
                          "broken.safetensors", NORM)


def test_huge_header_length(tmp_path):
    path = tmp_path / "hugeheader.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" * 8)
    assert_one_line_error(run_cli("info", path, limit_memory=True), path.name, "not a safetensors")


# --- files that do not make a model ------------------------------------------------------------

def test_missing_tensor(broken):
    def edit(header, data):
        del header["model.layers.1.mlp.up_proj.weight"]
    assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "missing tensor",
                          "model.layers.1.mlp.up_proj.weight")


def test_missing_tensor_on_generate(broken):
    def edit(header, data):
        del header[NORM]
    assert_one_line_error(run_cli("generate", broken(edit), "-p", "hi"), "broken.safetensors",
                          "missing tensor", NORM)


def test_shape_that_contradicts_the_config(broken):
    assert_one_line_error(run_cli("info", broken(edit_config(intermediate_size=95))),
                          "broken.safetensors", "mlp", "shape", "[96, 64]", "[95, 64]")


def test_more_layers_in_the_config_than_in_the_file(broken):
    assert_one_line_error(run_cli("info", broken(edit_config(num_hidden_layers=3))),
                          "broken.safetensors", "missing tensor", "model.layers.2.")


def test_unexpected_tensor(broken):
    def edit(header, data):
        end = len(data)
        header["model.layers.0.self_attn.q_proj.bias"] = {"dtype": "F32", "shape": [0],
                                                          "data_offsets": [end, end]}
    assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "unexpected tensor")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_unknown_architecture(broken, command):
    path = broken(edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    extra = ["-p", "hi"] if command == "generate" else []
    assert_one_line_error(run_cli(command, path, *extra), "broken.safetensors",
                          "unsupported architecture", "GPT2LMHeadModel")


def test_unknown_architecture_in_a_folder(tiny_dir, tmp_path):
    folder, _ = tiny_dir("gqa")
    copy_ = shutil.copytree(folder, tmp_path / "gpt2_folder")
    cfg = json.loads((copy_ / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (copy_ / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("info", copy_), "gpt2_folder", "unsupported architecture")


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0},
                                     {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling(broken, scaling):
    path = broken(edit_config(rope_scaling=scaling))
    kind = scaling.get("rope_type") or scaling["type"]
    assert_one_line_error(run_cli("info", path), "broken.safetensors", "rope scaling", kind)


def test_unsupported_rope_parameters_style(broken):
    path = broken(edit_config(rope_scaling=None,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    assert_one_line_error(run_cli("info", path), "broken.safetensors", "rope scaling", "longrope")


def test_tokenizer_larger_than_the_embedding(broken):
    big = tiny_tokenizer(400)  # more ids than the model's 300 embedding rows
    n_ids = big.get_vocab_size()
    assert n_ids > 300

    def edit(header, data):
        header["__metadata__"]["minillm.tokenizer_json"] = big.to_str()
    line = assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "tokenizer")
    assert str(n_ids) in line and "300" in line


def test_tokenizer_larger_than_config_vocab_size(broken):
    # the config's vocab_size below the tokenizer's: refused (here before the embedding's shape)
    line = assert_one_line_error(run_cli("info", broken(edit_config(vocab_size=200))),
                                 "broken.safetensors")
    assert "tokenizer" in line or "shape" in line


def test_corrupt_tokenizer(broken):
    def edit(header, data):
        header["__metadata__"]["minillm.tokenizer_json"] = '{"model": 42}'
    assert_one_line_error(run_cli("info", broken(edit)), "broken.safetensors", "tokenizer")


# --- NaN / inf weights: a warning naming the tensor, and the run goes on -------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weight_warns(broken, value):
    name = "model.layers.1.self_attn.k_proj.weight"
    result = run_cli("info", broken(set_value(name, 17, value)))
    assert result.returncode == 0, result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1 and "warning" in lines[0] and name in lines[0], lines
    assert b"hidden_size" in result.stdout


def test_nan_weight_generate_greedy_continues(broken):
    name = "model.layers.0.mlp.down_proj.weight"
    result = run_cli("generate", broken(set_value(name, 3, np.nan)), "-p", "hello",
                     "--max-tokens", "3", "--temperature", "0")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "Traceback" not in err and name in err


def test_nan_weight_generate_sampling_says_why(broken):
    """Sampling from NaN logits is impossible: one clear line, exit 1 (greedy carries on)."""
    name = "model.layers.0.mlp.down_proj.weight"
    result = run_cli("generate", broken(set_value(name, 3, np.nan)), "-p", "hello",
                     "--max-tokens", "3", "--temperature", "0.8", "--seed", "1")
    err = result.stderr.decode()
    assert "Traceback" not in err and result.returncode == 1, err
    assert "NaN or inf logits" in err


def test_nan_weight_score_reports_nan_not_a_number(broken):
    """NaN weights give NaN NLLs: the score says so (JSON null), it does not drop them."""
    result = run_cli("score", broken(set_value(NORM, 0, np.nan)), "--json",
                     stdin=b"hello world, the quick brown fox")
    assert result.returncode == 0, result.stderr
    assert NORM in result.stderr.decode()
    summary = json.loads(result.stdout.decode().splitlines()[-1], parse_constant=_no_constants)
    assert summary["tokens"] > 1 and summary["mean_nll"] is None
    assert summary["bits_per_byte"] is None


def _no_constants(name):
    raise ValueError(f"not strict JSON: {name}")


# --- usage errors: click's, checked in this process ------------------------------------------

@pytest.mark.parametrize("prompt", [""])
def test_empty_prompt_is_a_usage_error(tiny_file, prompt):
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", prompt), "prompt is empty")


def test_missing_prompt_is_a_usage_error(tiny_file):
    assert_usage_error(invoke_cli("generate", tiny_file), "--prompt")


@pytest.mark.parametrize("option,value", [
    ("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"), ("--max-tokens", "-1"),
    ("--threads", "0"), ("--top-k", "-1"), ("--min-p", "1.5"), ("--repeat-penalty", "0"),
    ("--temperature", "nan-ish"),
])
def test_option_out_of_range_is_a_usage_error(tiny_file, option, value):
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", option, value), option)


def test_info_threads_out_of_range(tiny_file):
    assert_usage_error(invoke_cli("info", tiny_file, "--threads", "0"), "--threads")
