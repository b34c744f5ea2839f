"""Strict inputs, honest numbers (issue 12): what the library refuses instead of coercing, and
what it reports instead of a wrong number or a raw NumPy warning.

- token ids, session options and chunk sizes of the wrong type are a TypeError, never silently
  truncated, flattened or parsed;
- config values a model cannot run with are refused at load, naming the file and the key;
- no RuntimeWarning line reaches a user: the math runs quietly and a NaN result is said once;
- a session too large for the memory is refused before allocating, in one line;
- bits per byte count the input's own bytes, and are null where nothing was predicted.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    BACKEND,
    assert_one_line_error,
    invoke_cli,
    rng_ids,
    run_cli,
    stderr_lines,
)

import minillm
from minillm import parallel
from minillm.cache import cache_bytes, session_bytes
from minillm.errors import MiniLLMError, ModelFileError
from minillm.generate import generate_ids
from minillm.sampling import SamplingParams
from minillm.scoring import Scorer
from minillm.textstream import InputWarning, raw_prefix_length
from minillm.weights import WeightWarning

# --- editing a copy of the tiny single file -------------------------------------------------------

def edited_copy(src: Path, dst: Path, config: dict | None = None, tensor=None) -> Path:
    """src rewritten to dst with config keys changed and/or one float32 element of a tensor set
    (tensor = (name, index, value)). Layout: 8-byte little-endian header length, JSON, data."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    if config:
        cfg = json.loads(header["__metadata__"]["minillm.config"])
        cfg.update(config)
        header["__metadata__"]["minillm.config"] = json.dumps(cfg)
    if tensor:
        name, index, value = tensor
        assert header[name]["dtype"] == "F32"
        begin = header[name]["data_offsets"][0] + 4 * index
        data = data[:begin] + np.float32(value).tobytes() + data[begin + 4:]
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return dst


@pytest.fixture
def edited(tiny_file, tmp_path):
    def make(config=None, tensor=None):
        return edited_copy(tiny_file, tmp_path / "edited.safetensors", config, tensor)
    return make


# --- 1. token ids ---------------------------------------------------------------------------------

NOT_IDS = {  # name: (ids, what the message says was given)
    "floats": ([1.7, 2.2], "float 1.7 at index 0"),
    "float array": (np.array([1.7, 2.2]), "1-D array of float64"),
    "nested list": ([[1, 2], [3, 4]], "list [1, 2] at index 0"),
    "2-D array": (np.array([[1, 2], [3, 4]]), "2-D array of int64, shape (2, 2)"),
    "str": ("12", "str '12'"),
    "bytes": (b"12", "bytes b'12'"),
    "bool": (True, "bool True"),
    "bare int": (5, "int 5"),
    "numpy scalar": (np.int64(5), "0-D array of int64"),
    "bools": ([True, False], "bool True at index 0"),
    "bool array": (np.array([True, False]), "1-D array of bool"),
    "str among ints": ([1, "2"], "str '2' at index 1"),
    "float among ints": ([1, 2.0], "float 2.0 at index 1"),
}


@pytest.mark.parametrize("ids,given", NOT_IDS.values(), ids=NOT_IDS.keys())
@pytest.mark.parametrize("entry", ["feed", "nll", "logits"])
def test_ids_that_are_not_a_1d_sequence_of_integers_are_refused(tiny_model, ids, given, entry):
    session = tiny_model.session()
    call = {"feed": session.feed, "nll": session.nll, "logits": tiny_model.logits}[entry]
    with pytest.raises(TypeError, match="token ids must be a 1-D") as err:
        call(ids)
    assert given in str(err.value).split("; got ", 1)[1], str(err.value)
    assert session.position == 0


def test_generation_refuses_text_where_ids_belong(tiny_model):
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(TypeError, match="token ids"):
        list(generate_ids(tiny_model.session(), "hello", params))


@pytest.mark.parametrize("ids", [
    [5, 17, 3], (5, 17, 3), range(5, 8), np.array([5, 17, 3], np.int32),
    np.array([5, 17, 3], np.uint16), [np.int64(5), np.int32(17), 3],
], ids=["list", "tuple", "range", "int32", "uint16", "numpy ints"])
def test_integer_ids_of_any_kind_give_the_same_logits(tiny_model, ids):
    expected = tiny_model.logits([int(i) for i in ids])
    np.testing.assert_array_equal(tiny_model.logits(ids), expected)


def test_empty_ids_are_allowed(tiny_model):
    session = tiny_model.session()
    assert session.feed([]).shape == (0, tiny_model.config.vocab_size)
    assert session.nll(np.array([], dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("ids,bad,index", [
    ([3, 300], 300, 1), ([-1], -1, 0), ([2 ** 70], 2 ** 70, 0),
    (np.array([4, 2 ** 63], np.uint64), 2 ** 63, 1),
])
def test_ids_out_of_range_name_the_id(tiny_model, ids, bad, index):
    with pytest.raises(MiniLLMError, match=f"token id {bad} \\(at index {index}\\).*0 to 299"):
        tiny_model.session().feed(ids)


# --- 2. session options ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(n_local=16.7), dict(n_local="16"), dict(n_local=np.float64(16)), dict(n_global=2.0),
    dict(n_global=True), dict(ceiling="8"), dict(attention=None), dict(attention=b"window"),
], ids=str)
def test_session_options_of_the_wrong_type(tiny_model, kw):
    with pytest.raises(TypeError, match=next(iter(kw))):
        tiny_model.session(**kw)


def test_session_options_as_numpy_ints(tiny_model):
    s = tiny_model.session(n_global=np.int64(2), n_local=np.int32(16), ceiling=np.int16(8))
    assert (s.spec.n_global, s.spec.n_local, s.spec.ceiling) == (2, 16, 8)
    assert all(type(v) is int for v in (s.spec.n_global, s.spec.n_local, s.spec.ceiling))


@pytest.mark.parametrize("kw", [dict(n_local=0), dict(n_global=-1), dict(attention="sliding")],
                         ids=str)
def test_session_options_out_of_range_stay_value_errors(tiny_model, kw):
    with pytest.raises(ValueError):
        tiny_model.session(**kw)


@pytest.mark.parametrize("chunk_size", [True, 2.5, "4", np.float64(4)], ids=repr)
@pytest.mark.parametrize("entry", ["feed", "nll"])
def test_chunk_size_of_the_wrong_type(tiny_model, entry, chunk_size):
    session = tiny_model.session()
    with pytest.raises(TypeError, match="chunk_size"):
        getattr(session, entry)([1, 2, 3], chunk_size=chunk_size)
    assert session.position == 0


# --- 3. config values that cannot work ------------------------------------------------------------

BAD_CONFIG = [
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", "1e-5"),
    ("rms_norm_eps", math.nan), ("rms_norm_eps", math.inf),
    ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", "1e4"),
    ("num_hidden_layers", 2.5), ("num_hidden_layers", "2"), ("num_hidden_layers", True),
    ("hidden_size", 64.0), ("num_attention_heads", "4"), ("num_key_value_heads", 2.0),
    ("vocab_size", 300.5), ("intermediate_size", 96.0), ("max_position_embeddings", 64.5),
    ("head_dim", 16.0),
    ("bos_token_id", 300), ("bos_token_id", -1), ("bos_token_id", "0"),
    ("eos_token_id", 300), ("eos_token_id", [1, 999]), ("eos_token_id", 1.0),
]


@pytest.mark.parametrize("key,value", BAD_CONFIG, ids=lambda v: repr(v))
def test_config_values_that_cannot_work_are_refused_at_load(edited, key, value):
    path = edited(config={key: value})
    assert_one_line_error(invoke_cli("info", path), "edited.safetensors", key)


@pytest.mark.parametrize("scaling,key", [
    ({"rope_type": "linear", "factor": 0}, "rope_scaling.factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 16}, "high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
], ids=["linear factor 0", "llama3 high == low", "llama3 without its factors"])
def test_rope_scaling_that_cannot_work_is_refused_at_load(edited, scaling, key):
    path = edited(config={"rope_scaling": scaling})
    assert_one_line_error(invoke_cli("info", path), "edited.safetensors", key)


def test_a_refused_config_value_is_a_model_file_error():
    from minillm.config import Config
    with pytest.raises(ModelFileError, match="my.json: rope_theta"):
        Config.from_dict(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, vocab_size=300, rope_theta=0),
                         source="my.json")


# --- 4. no raw NumPy warning reaches a user -------------------------------------------------------

def assert_no_numpy_warning(result) -> list[str]:
    lines = stderr_lines(result)
    raw = [line for line in lines if "RuntimeWarning" in line or "encountered in" in line]
    assert not raw, lines
    assert "Traceback" not in result.stderr.decode()
    return lines


def summary(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.decode().splitlines()[-1])


TEXT = b"hello world, the quick brown fox jumps over the lazy dog. " * 8
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def test_score_with_inf_weights_warns_once_about_nan(edited):
    result = run_cli("score", edited(tensor=(Q_PROJ, 5, np.inf)), "--json", stdin=TEXT)
    s = summary(result)
    lines = assert_no_numpy_warning(result)
    assert len(lines) == 2, lines  # the tensor, then the NaN result
    assert Q_PROJ in lines[0] and "NaN" in lines[1]
    assert s["mean_nll"] is None and s["bits_per_byte"] is None


def test_score_with_finite_weights_that_overflow_says_why_it_is_nan(edited):
    """No NaN or inf in the file, so no load warning: the NaN result is the only news."""
    result = run_cli("score", edited(tensor=("model.layers.0.input_layernorm.weight", 0, 1e30)),
                     "--json", stdin=TEXT)
    s = summary(result)
    (line,) = assert_no_numpy_warning(result)
    assert "NaN" in line and "warning" in line
    assert s["mean_nll"] is None


def test_a_huge_mean_nll_has_an_infinite_perplexity_not_a_traceback(edited):
    result = run_cli("score", edited(tensor=(NORM, 0, 1e30)), "--json", stdin=TEXT)
    s = summary(result)
    assert assert_no_numpy_warning(result) == []
    assert s["mean_nll"] > 1000 and s["perplexity"] is None


def test_greedy_generation_with_inf_weights(edited):
    result = run_cli("generate", edited(tensor=(Q_PROJ, 5, np.inf)), "-p", "hello world",
                     "--max-tokens", "3", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    lines = assert_no_numpy_warning(result)
    assert len(lines) == 2 and Q_PROJ in lines[0] and "NaN logits" in lines[1], lines


def test_an_extreme_repeat_penalty_is_quiet(tiny_file):
    result = run_cli("generate", tiny_file, "-p", "hello hello hello world", "--max-tokens", "8",
                     "--repeat-penalty", "1e300", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


def test_a_tiny_temperature_is_greedy(tiny_file):
    """The limit of sampling as the temperature goes to 0 is argmax, not NaN."""
    args = ("generate", tiny_file, "-p", "hello world", "--max-tokens", "8", "--seed", "3")
    tiny = run_cli(*args, "--temperature", "1e-320")  # overflows a float64 logit
    greedy = run_cli(*args, "--temperature", "0")
    assert tiny.returncode == 0 and tiny.stderr == b"", tiny.stderr
    assert tiny.stdout == greedy.stdout



@pytest.mark.skipif(BACKEND != "numpy", reason="CuPy does not check floating-point errors")
def test_worker_threads_are_quiet_too(edited, two_workers):
    with pytest.warns(WeightWarning):
        model = minillm.load(edited(tensor=(Q_PROJ, 5, np.inf)), backend=BACKEND)
    assert parallel.parts_for(64, model.xp) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nll = model.session().nll(rng_ids(64, 300), chunk_size=64)
        logits = model.session().feed(rng_ids(64, 300), chunk_size=64)
    assert np.isnan(nll[1:]).all() and np.isnan(logits).any()
    assert [str(w.message) for w in caught] == []


# --- 5. a session larger than the memory ----------------------------------------------------------

def test_a_cache_larger_than_the_memory_is_one_line(tiny_file):
    result = run_cli("score", tiny_file, "--n-local", 10 ** 13, stdin=b"hello world")
    line = assert_one_line_error(result, "GB", "available", "n_local")
    assert "5,200,000" in line  # 10^13 slots of 2 layers x 2 heads x (k + v) x 16 floats, + pos


def test_the_check_comes_before_any_allocation(tiny_model, monkeypatch):
    def never(*args):
        raise AssertionError("allocated")
    monkeypatch.setattr("minillm.cache.available_bytes", lambda xp: 10 ** 6)
    monkeypatch.setattr("minillm.session.KVCache", never)
    need = session_bytes(tiny_model.config, 10, 64, tiny_model.xp)
    with pytest.raises(MiniLLMError, match=f"needs {need / 1e9:.2f} GB.*only 0.00 GB"):
        tiny_model.session()


def test_a_memory_error_while_allocating_is_the_same_line(tiny_model, monkeypatch):
    def out_of_memory(*args):
        raise MemoryError("Unable to allocate 215. GiB")
    monkeypatch.setattr("minillm.cache.available_bytes", lambda xp: None)  # not known
    monkeypatch.setattr("minillm.session.KVCache", out_of_memory)
    with pytest.raises(MiniLLMError, match="the session needs .* GB"):
        tiny_model.session(n_local=32)


def test_a_cache_mapping_refused_is_the_same_line(tiny_model, monkeypatch):
    """The cache's small-page mapping (minillm.cache.zeros) failing, as under an address-space
    limit, is a MemoryError like NumPy's, so the session reports it the same way."""
    from minillm.session import AttentionWarning

    def refused(*args):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr("minillm.cache.available_bytes", lambda xp: None)
    monkeypatch.setattr("minillm.cache.mmap.mmap", refused)
    # (a window past the tiny model's training length warns); keys of 2 x 2 heads x 16: 16 MB
    with pytest.warns(AttentionWarning), \
            pytest.raises(MiniLLMError, match="the session needs .* GB"):
        tiny_model.session(n_local=1 << 16)


def assert_estimate_holds(model, n_global, n_local):
    """The cache exactly; with the workspace grown by a 512-token chunk, within 1% (a buffer
    the forward pass adds must be counted in minillm.cache.workspace_bytes too)."""
    cfg = model.config
    s = model.session(n_global=n_global, n_local=n_local)
    assert s.cache.nbytes == cache_bytes(cfg, n_global, n_local)
    s.nll(rng_ids(512, cfg.vocab_size), chunk_size=512)
    need = session_bytes(cfg, n_global, n_local, model.xp)
    assert 0.99 * need <= s.nbytes <= 1.01 * need, (s.nbytes, need)


def test_the_estimate_is_what_a_session_takes(tiny_model):
    assert_estimate_holds(tiny_model, 4, 48)


def test_the_estimate_is_what_a_session_of_the_real_model_takes(real_model):
    assert_estimate_holds(real_model, 10, 1024)


def test_info_reports_the_session_estimate(tiny_file):
    from minillm.info import model_info
    model = minillm.load(tiny_file, backend=BACKEND)
    report = model_info(model)
    assert report["default_cache_mb"] == round(model.session().cache.nbytes / 1e6, 1)
    session_mb = session_bytes(model.config, 10, 64, model.xp) / 1e6
    assert report["memory_needed_mb"] == round(report["weights_mb_float32"] + session_mb, 1)


# --- 6. honest numbers ----------------------------------------------------------------------------

def test_one_token_has_no_bits_per_byte(tiny_file):
    s = summary(run_cli("score", tiny_file, "--json", stdin=b"a"))
    assert s["tokens"] == 1 and s["bits_per_byte"] is None


INVALID = ("héllo wörld 日本 ".encode() * 3 + b"\xff\xfe\xc3 and more \xe2\x82 text " * 4
           + "😀 end".encode())


def test_invalid_utf8_counts_the_bytes_read(tiny_file):
    s = summary(run_cli("score", tiny_file, "--json", stdin=INVALID))
    assert s["bytes"] == len(INVALID)
    total = s["mean_nll"] * s["predicted"]
    assert s["bits_per_byte"] == pytest.approx(total / math.log(2) / len(INVALID), rel=1e-9)


def bytes_of_first_tokens(tiny_dir, data: bytes, n: int) -> int:
    """The oracle: tokenizers' own character offsets, and the longest prefix of the raw bytes
    that decodes to the characters before token n (found by trying every length)."""
    from tokenizers import Tokenizer
    text = data.decode("utf-8", errors="replace")
    encoding = Tokenizer.from_file(str(tiny_dir("gqa")[0] / "tokenizer.json")).encode(
        text, add_special_tokens=False)
    chars = encoding.offsets[n][0]  # a character split between tokens n-1 and n is not in
    return max(b for b in range(len(data) + 1)
               if data[:b].decode("utf-8", errors="replace") == text[:chars])


def score_bytes(model, data: bytes, **kw) -> Scorer:
    scorer = Scorer(model.session(), chunk_size=16, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        scorer.run(io.BytesIO(data))
    return scorer


def test_max_tokens_counts_the_bytes_of_the_tokens_scored(tiny_model, tiny_dir):
    """Every cut: inside words, between the bytes of a character, of a U+FFFD, of an emoji."""
    n_ids = len(tiny_model.tokenizer.encode(INVALID.decode("utf-8", errors="replace")))
    for n in range(1, n_ids):
        st = score_bytes(tiny_model, INVALID, max_tokens=n).result()
        assert st.tokens == n
        assert st.n_bytes == bytes_of_first_tokens(tiny_dir, INVALID, n), n


def test_a_bos_token_has_no_bytes(tiny_file, tiny_dir):
    model = minillm.load(tiny_file, backend=BACKEND)
    model.tokenizer.add_bos = True  # as Llama 2's tokenizers do: <s> is not in the input
    for n in (1, 2, 9):
        st = score_bytes(model, INVALID, max_tokens=n + 1).result()
        assert st.n_bytes == bytes_of_first_tokens(tiny_dir, INVALID, n)


def test_a_resumed_run_counts_the_bytes_of_the_input(tiny_model, tmp_path):
    whole = score_bytes(tiny_model, INVALID).result()
    assert whole.n_bytes == len(INVALID)
    partial = score_bytes(tiny_model, INVALID, max_tokens=37)
    partial.save(str(tmp_path / "run.ckpt"))
    resumed = Scorer.resume(str(tmp_path / "run.ckpt"), tiny_model, partial.session.spec,
                            chunk_size=16)
    stream = io.BytesIO(INVALID)
    resumed.seek_input(stream, seekable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        st = resumed.run(stream)
    assert (st.tokens, st.n_bytes) == (whole.tokens, len(INVALID))
    assert st.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6)


def test_raw_prefix_length_against_trying_every_length():
    rng = random.Random(0)
    parts = [b"a", b" ", "é".encode(), "日".encode(), "😀".encode(), b"\xff", b"\xc3",
             b"\xe2\x82", b"\xf0\x9f\x98", b"\x80", "\ufffd".encode()]
    for _ in range(500):
        raw = b"".join(rng.choice(parts) for _ in range(rng.randrange(12)))
        text = raw.decode("utf-8", errors="replace")
        for n in range(len(text) + 1):
            want = max(b for b in range(len(raw) + 1)
                       if raw[:b].decode("utf-8", errors="replace") == text[:n])
            assert raw_prefix_length(raw, n) == want, (raw, n)


# --- the library's other entry points ------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(top_k=2.5), dict(max_tokens="8"), dict(seed=1.5),
                                dict(repeat_last_n=True), dict(temperature="0.5"),
                                dict(top_p=float("nan")), dict(min_p=float("inf"))], ids=repr)
def test_sampling_params_of_the_wrong_type(kw):
    from minillm.sampling import SamplingParams
    with pytest.raises(TypeError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_a_negative_seed_is_refused():
    from minillm.sampling import SamplingParams
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)


@pytest.mark.parametrize("message", [123, b"hello", None], ids=repr)
def test_a_chat_message_is_text(tiny_chat_file, message):
    import minillm
    chat = minillm.load(tiny_chat_file).chat(temperature=0, max_tokens=2)
    with pytest.raises(TypeError, match="str"):
        chat.send(message)
    assert chat.messages == []


@pytest.mark.parametrize("kw", [dict(chunk_size=2.5), dict(chunk_size="8"),
                                dict(max_tokens=1.5), dict(max_tokens=0)], ids=repr)
def test_scorer_options_of_the_wrong_type_or_range(tiny_model, kw):
    from minillm.scoring import Scorer
    with pytest.raises((TypeError, ValueError)):
        Scorer(tiny_model.session(), **kw)


def test_the_full_cache_outgrowing_memory_is_one_line(tiny_model, monkeypatch):
    from minillm.session import AttentionWarning
    with pytest.warns(AttentionWarning):
        s = tiny_model.session(attention="full")
    s.feed(rng_ids(8, tiny_model.config.vocab_size), logits="none")
    monkeypatch.setattr("minillm.cache.available_bytes", lambda xp: 10 ** 3)
    with pytest.raises(MiniLLMError, match="the session needs .* GB"):
        s.feed(rng_ids(2000, tiny_model.config.vocab_size), logits="none")
    assert s.position == 8 + 512  # the first chunk fit the 1024 slots; the next one was refused


@pytest.mark.parametrize("key,value", [("tokens", "12"), ("tokens", -5), ("predicted", 1.5),
                                       ("total_nll", "x"), ("skip", None), ("piece_start", True),
                                       ("window_sha256", 3)], ids=repr)
def test_a_score_checkpoint_with_a_damaged_field_is_refused(tiny_model, tmp_path, key, value):
    from minillm.checkpoint import CHECKPOINT_KEYS, read_checkpoint, write_checkpoint
    from minillm.scoring import Scorer
    scorer = Scorer(tiny_model.session(), chunk_size=16)
    scorer.run(io.BytesIO(b"hello world " * 20))
    path = str(tmp_path / "run.ckpt")
    scorer.save(path)
    session, record = read_checkpoint(path, tiny_model)
    own = {k: v for k, v in record.items() if k not in CHECKPOINT_KEYS}
    write_checkpoint(path, session, {**own, key: value})
    with pytest.raises(MiniLLMError, match=key):
        Scorer.resume(path, tiny_model, session.spec, chunk_size=16)
