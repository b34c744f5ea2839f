"""Conversion: GGUF and Hugging Face folders -> one self-contained safetensors file.

The oracles are independent: transformers builds and saves the reference model, the `gguf`
package writes the GGUF (with llama.cpp's Q/K permutation applied here), and
`safetensors.numpy` reads the converted file back.
"""

import base64
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import load_file as load_torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from minillm.config import Config  # noqa: E402
from minillm.convert import convert  # noqa: E402
from minillm.errors import ModelFileError  # noqa: E402
from minillm.formats import open_model  # noqa: E402
from minillm.formats.gguf import GGUFSource, unpermute_qk  # noqa: E402
from minillm.formats.hf_folder import HFFolderSource  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: LlamaConfig's default bos/eos ids
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
TEXT = "The year 2024 had 366 days; the quick brown fox jumps over the lazy dog 12345 times."

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (LlamaModel.permute)."""
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, n, rest = hf.split(".", 3)
    return f"blk.{n}.{LAYER_TO_GGUF[rest.removesuffix('.weight')]}.weight"


# -- fixtures: a tiny BPE tokenizer and tiny random Llamas saved the Hugging Face way

@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "hello world, hello there"] * 20, trainer)
    return tok


def save_tiny_llama(folder: pathlib.Path, bpe: Tokenizer, tie: bool, **save_kwargs) -> pathlib.Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=bpe.get_vocab_size(), tie_word_embeddings=tie,
        max_position_embeddings=256, rope_theta=50000.0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, **save_kwargs)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "bos_token": "<s>", "eos_token": {"content": "</s>"},
         "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_folder(request, tmp_path_factory, bpe) -> pathlib.Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hf"), bpe, tie=request.param)


def hf_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def hf_config(folder: pathlib.Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def write_gguf(path, folder: pathlib.Path, bpe: Tokenizer, qtype=gguf.GGMLQuantizationType.F32,
               drop=(), extra=()) -> pathlib.Path:
    """A llama.cpp-style GGUF of the tiny model: permuted Q/K rows, tokenizer of type gpt2.

    drop: HF tensor names to leave out; extra: (GGUF name, raw array, ggml type) to add as is.
    """
    cfg = hf_config(folder)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    add_gpt2_tokenizer(w, bpe)
    for name, a in hf_tensors(folder).items():
        if name in drop:
            continue
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, kv_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a)
    for name, raw, ggml_type in extra:
        w.add_tensor(name, raw, raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def add_gpt2_tokenizer(w, bpe: Tokenizer) -> None:
    vocab = json.loads(bpe.to_str())["model"]
    tokens = [bpe.id_to_token(i) for i in range(bpe.get_vocab_size())]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, hf_folder, bpe) -> pathlib.Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf_folder, bpe)


def assert_one_line_message(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, msg


# -- the Q/K permutation

@pytest.mark.parametrize("n_head,head_dim,cols",
                         [(1, 2, 3), (4, 16, 64), (9, 64, 5), (3, 64, 1), (8, 128, 2)])
def test_unpermute_qk_inverts_llama_cpp_permutation(n_head, head_dim, cols):
    w = np.random.default_rng(n_head).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)


def test_unpermute_qk_handles_vectors():
    b = np.arange(32, dtype=np.float32)  # a bias-shaped row vector
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, 4), 4), b)


# -- Hugging Face folder -> single file

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_convert_hf_folder(hf_folder, tmp_path, dtype):
    out = convert(hf_folder, tmp_path / "m.safetensors", dtype=dtype)
    got, want = load_torch(out), hf_tensors(hf_folder)  # NumPy has no bfloat16: read with torch
    tied = hf_config(hf_folder)["tie_word_embeddings"]
    assert set(got) == set(want) - ({"lm_head.weight"} if tied else set())
    for name, a in got.items():
        assert a.dtype == getattr(torch, dtype)
        # exact for float32; float16/bfloat16 exactly as torch rounds them
        expected = torch.from_numpy(want[name]).to(getattr(torch, dtype))
        assert torch.equal(a, expected), name
    meta = read_metadata(out)
    assert meta["minillm.format"] == "1"
    assert (Config.from_dict(json.loads(meta["minillm.config"]))
            == Config.from_dict(hf_config(hf_folder)))
    assert json.loads(meta["minillm.tokenizer_config"]) == {
        "add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    assert meta["minillm.chat_template"] == TEMPLATE
    assert meta["minillm.tokenizer_json"] == (hf_folder / "tokenizer.json").read_text()


def read_metadata(path) -> dict:
    with safe_open(path, "np") as f:
        return f.metadata()


def test_convert_hf_model_file_and_template_file(tmp_path, bpe):
    folder = save_tiny_llama(tmp_path / "hf", bpe, tie=False)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    out = convert(folder / "model.safetensors", tmp_path / "m.safetensors")
    meta = read_metadata(out)
    assert meta["minillm.chat_template"] == "{{ messages }}"
    assert json.loads(meta["minillm.tokenizer_config"]) == {"add_bos_token": True}


def test_convert_sentencepiece_folder_stores_the_model_bytes(tmp_path, bpe):
    folder = save_tiny_llama(tmp_path / "hf", bpe, tie=True)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x00\x01not really sentencepiece\xff")
    src = HFFolderSource(folder)
    assert src.tokenizer_json is None and src.tokenizer_config["add_bos_token"] is False
    meta = read_metadata(convert(folder, tmp_path / "m.safetensors"))
    stored = base64.b64decode(meta["minillm.sentencepiece_b64"])
    assert stored == (folder / "tokenizer.model").read_bytes()
    assert "minillm.tokenizer_json" not in meta


def test_sharded_folder(tmp_path, bpe):
    folder = save_tiny_llama(tmp_path / "hf", bpe, tie=False, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert not (folder / "model.safetensors").exists()
    src = open_model(folder)
    ref = {}
    for shard in folder.glob("model-*.safetensors"):
        ref.update(load_file(str(shard)))
    assert set(src.keys()) == set(ref)
    for name, a in ref.items():
        assert src.shape(name) == a.shape
        np.testing.assert_array_equal(src.tensor(name), a)
    got = load_file(convert(folder, tmp_path / "m.safetensors"))
    assert set(got) == set(ref)


def test_inv_freq_is_skipped(tmp_path, bpe):
    folder = save_tiny_llama(tmp_path / "hf", bpe, tie=True)
    tensors = hf_tensors(folder)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    got = load_file(convert(folder, tmp_path / "m.safetensors"))
    assert not any(k.endswith("inv_freq") for k in got)


# -- GGUF

def test_gguf_source_matches_hf(gguf_file, hf_folder, bpe):
    src = open_model(gguf_file)
    assert isinstance(src, GGUFSource)
    want = hf_tensors(hf_folder)
    assert set(src.keys()) == set(want)
    for name, ref in want.items():
        assert src.shape(name) == ref.shape
        a = src.tensor(name)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, ref, err_msg=name)
    assert Config.from_dict(src.config) == Config.from_dict(hf_config(hf_folder))
    assert src.config["rms_norm_eps"] == 1e-6  # float32 in the file, shortest decimal here
    assert src.chat_template == TEMPLATE
    assert src.tokenizer_config == {"add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    rebuilt = Tokenizer.from_str(src.tokenizer_json)
    assert rebuilt.encode(TEXT).ids == bpe.encode(TEXT).ids


def test_convert_gguf(gguf_file, hf_folder, tmp_path):
    got = load_file(convert(gguf_file, tmp_path / "m.safetensors"))
    want = hf_tensors(hf_folder)
    assert set(got) == set(want)
    for name, ref in want.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)
    meta = read_metadata(tmp_path / "m.safetensors")
    assert (Config.from_dict(json.loads(meta["minillm.config"]))
            == Config.from_dict(hf_config(hf_folder)))
    assert meta["minillm.chat_template"] == TEMPLATE
    assert "minillm.tokenizer_json" in meta


def test_gguf_q8_0_round_trip(tmp_path, hf_folder, bpe):
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf(tmp_path / "q8.gguf", hf_folder, bpe, qtype=q8)
    src = GGUFSource(path)
    cfg = hf_config(hf_folder)
    for name, ref in hf_tensors(hf_folder).items():
        a = src.tensor(name)
        if ref.ndim == 1:
            np.testing.assert_array_equal(a, ref)
            continue
        # Q8_0: blocks of 32, step max|x| / 127 (half a step of rounding, plus the float16 scale's)
        np.testing.assert_allclose(a, ref, rtol=0, atol=np.abs(ref).max() / 127, err_msg=name)
        n_head = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}.get(
            name.split(".")[-2])
        stored = llama_cpp_permute(ref, n_head) if n_head else ref
        exact = gguf.quants.dequantize(gguf.quants.quantize(stored, q8), q8)
        np.testing.assert_array_equal(a, unpermute_qk(exact, n_head) if n_head else exact)


@pytest.mark.real_model
def test_real_smollm2_gguf(smollm2_gguf_path):
    src = GGUFSource(smollm2_gguf_path)  # minillm's own GGUF parser: a fraction of a second
    c = src.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"]) == (576, 30, 9, 3)
    # a GGUFSource is not a mapping: keys() is all it has
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in src.keys()  # noqa: SIM118
    assert ((c["vocab_size"], c["rope_theta"], c["max_position_embeddings"])
            == (49152, 100000.0, 8192))
    assert c["rms_norm_eps"] == 1e-5 and c["head_dim"] == 64
    cfg = Config.from_dict(c)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, (2,))
    q = src.tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and q.dtype == np.float32 and np.isfinite(q).all()
    assert src.shape("model.embed_tokens.weight") == (49152, 576)
    assert "<|im_start|>" in src.chat_template


# -- bad input: one clear line naming the file

def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a model at all" * 10)
    with pytest.raises(ModelFileError) as e:
        GGUFSource(p)
    assert_one_line_message(e, "junk.gguf", "not a GGUF")
    with pytest.raises(ModelFileError) as e:
        convert(p, tmp_path / "out.safetensors")
    assert_one_line_message(e, "junk.gguf")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("keep", [0.5, 0.02, 10])
def test_truncated_gguf(gguf_file, tmp_path, keep):
    data = gguf_file.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ModelFileError) as e:
        open_model(p)
    assert_one_line_message(e, "cut.gguf")


def test_gguf_of_another_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError) as e:
        convert(p, tmp_path / "out.safetensors")
    assert_one_line_message(e, "gpt2.gguf", "'gpt2'")


def test_gguf_with_a_type_gguf_cannot_dequantize(tmp_path, hf_folder, bpe):
    up = "model.layers.0.mlp.up_proj.weight"
    rows, cols = hf_tensors(hf_folder)[up].shape
    q8_1 = (gguf_name(up), np.zeros((rows, cols // 32 * 40), np.uint8),
            gguf.GGMLQuantizationType.Q8_1)
    path = write_gguf(tmp_path / "q81.gguf", hf_folder, bpe, drop={up}, extra=[q8_1])
    with pytest.raises(ModelFileError) as e:  # refused on open, not halfway through a conversion
        GGUFSource(path)
    assert_one_line_message(e, "q81.gguf", "Q8_1")


def test_gguf_llama3_rope_freqs_refused(tmp_path, hf_folder, bpe):
    rope_freqs = ("rope_freqs.weight", np.ones(8, np.float32), gguf.GGMLQuantizationType.F32)
    path = write_gguf(tmp_path / "l3.gguf", hf_folder, bpe, extra=[rope_freqs])
    with pytest.raises(ModelFileError) as e:
        GGUFSource(path)
    assert_one_line_message(e, "l3.gguf", "rope_freqs")


def test_folder_without_config(tmp_path, hf_folder):
    folder = tmp_path / "noconfig"
    shutil.copytree(hf_folder, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFileError) as e:
        convert(folder, tmp_path / "out.safetensors")
    assert_one_line_message(e, "noconfig", "config.json")


def test_folder_without_weights_or_tokenizer(tmp_path, hf_folder):
    folder = tmp_path / "partial"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError) as e:
        open_model(folder)
    assert_one_line_message(e, "partial", "tokenizer.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError) as e:
        open_model(folder)
    assert_one_line_message(e, "partial", "model.safetensors")


def test_shard_index_naming_a_missing_shard(tmp_path, bpe):
    folder = save_tiny_llama(tmp_path / "sharded", bpe, tie=False, max_shard_size="50KB")
    missing = sorted(folder.glob("model-*.safetensors"))[-1]
    missing.unlink()
    with pytest.raises(ModelFileError) as e:
        open_model(folder)
    assert_one_line_message(e, "sharded", missing.name)


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError) as e:
        open_model(tmp_path / "nope.gguf")
    assert_one_line_message(e, "nope.gguf")


def test_cli_entry(gguf_file, tmp_path, capsys):
    from click.testing import CliRunner

    from minillm_cli.main import cli

    def main(argv):  # `minillm convert ARGV`: its exit status, its stderr to capsys
        result = CliRunner().invoke(cli, ["convert", *argv])
        sys.stderr.write(result.stderr)
        return result.exit_code

    out = tmp_path / "cli.safetensors"
    assert main([str(gguf_file), str(out), "--dtype", "float16"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert load_file(str(out))["model.norm.weight"].dtype == np.float16
    assert main([str(tmp_path / "missing.gguf"), str(out)]) == 1
    assert "missing.gguf" in capsys.readouterr().err


# -- a minillm file as SRC, and sources that are no Hugging Face folder

def with_metadata(src: pathlib.Path, out: pathlib.Path, changes: dict) -> pathlib.Path:
    """A copy of a safetensors file, written by the reference library, with metadata keys
    changed (a value of None: the key removed)."""
    with safe_open(str(src), "np") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(changes)
    save_file(tensors, str(out), metadata={k: v for k, v in meta.items() if v is not None})
    return out


def test_convert_a_minillm_file_again(hf_folder, tmp_path):
    """A minillm file is a source like any other: converted again, e.g. to bfloat16, it keeps
    its config, tokenizer and template, and its weights are rounded once."""
    first = convert(hf_folder, tmp_path / "first.safetensors")
    again = convert(first, tmp_path / "again.safetensors", dtype="bfloat16")
    with safe_open(first, "np") as a, safe_open(again, "np") as b:
        assert a.metadata() == b.metadata()
    rounded = {k: v.to(torch.bfloat16) for k, v in load_torch(first).items()}
    got = load_torch(again)
    assert got.keys() == rounded.keys()
    assert all(torch.equal(got[k], rounded[k]) for k in got)


def test_a_folder_holding_a_minillm_file_as_model_safetensors(hf_folder, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    convert(hf_folder, folder / "model.safetensors")  # no config.json beside: the file has one
    out = convert(folder, tmp_path / "out.safetensors")
    with safe_open(folder / "model.safetensors", "np") as a, safe_open(out, "np") as b:
        assert a.metadata() == b.metadata()


def test_sources_that_are_no_model_name_the_problem(gguf_file, hf_folder, tmp_path):
    only_gguf = tmp_path / "only_gguf"
    only_gguf.mkdir()
    shutil.copy(gguf_file, only_gguf / "tiny.gguf")
    with pytest.raises(ModelFileError) as e:
        convert(only_gguf, tmp_path / "out.safetensors")
    assert_one_line_message(e, "only_gguf", "no model.safetensors", "'tiny.gguf'", "give that file")

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(hf_folder / "model.safetensors", lone / "weights.safetensors")
    with pytest.raises(ModelFileError) as e:
        convert(lone / "weights.safetensors", tmp_path / "out.safetensors")
    assert_one_line_message(e, "weights.safetensors", "config.json", "Hugging Face folder")
    assert "minillm convert" not in str(e.value)  # what the user is running already

    with pytest.raises(ModelFileError) as e:
        convert(hf_folder / "config.json", tmp_path / "out.safetensors")
    assert_one_line_message(e, "config.json", "not a model", "GGUF", "safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("key, value, words", [
    ("minillm.tokenizer_config", '{"add_bos_token": tru', ["minillm.tokenizer_config", "not JSON"]),
    ("minillm.tokenizer_config", "[1, 2]", ["minillm.tokenizer_config", "array, not an object"]),
    ("minillm.tokenizer_config", '{"add_bos_token": "no"}', ["add_bos_token", "string"]),
    ("minillm.tokenizer_config", '{"eos_token": 2}', ["eos_token", "number"]),
    ("minillm.config", "{not json", ["minillm.config", "not JSON"]),
    ("minillm.config", '"a string"', ["minillm.config", "string, not an object"]),
    ("minillm.sentencepiece_b64", "not base64!", ["minillm.sentencepiece_b64", "base64"]),
    ("minillm.format", "2", ["format '2'"]),
])
def test_corrupt_minillm_metadata_names_its_key(hf_folder, tmp_path, key, value, words):
    good = convert(hf_folder, tmp_path / "good.safetensors")
    bad = with_metadata(good, tmp_path / "bad.safetensors", {key: value})
    with pytest.raises(ModelFileError) as e:
        open_model(bad)
    assert_one_line_message(e, "bad.safetensors", *words)
    assert "config is not JSON" not in str(e.value)


def _same_as_the_gguf_package(ours, theirs):
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert {k: f.contents() for k, f in ours.fields.items()} == fields
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, [int(d) for d in t.shape]) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_gguf_file_reads_what_the_gguf_package_reads(tmp_path, hf_folder, bpe):
    from minillm.formats.gguf_file import GGUFFile

    q8 = write_gguf(tmp_path / "q8.gguf", hf_folder, bpe, qtype=gguf.GGMLQuantizationType.Q8_0)
    _same_as_the_gguf_package(GGUFFile(q8), gguf.GGUFReader(str(q8)))


@pytest.mark.real_model
def test_gguf_file_reads_smollm2_as_the_gguf_package(smollm2_gguf_path, smollm2_gguf_reader):
    from minillm.formats.gguf_file import GGUFFile

    _same_as_the_gguf_package(GGUFFile(smollm2_gguf_path), smollm2_gguf_reader)
