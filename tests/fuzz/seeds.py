"""The seeds: small real files every mutation starts from, built the way users get them.

A tiny random Llama (one layer, hidden 32) is saved as a Hugging Face folder and written by
`minillm.convert` as minillm single files (float32, bfloat16, and one with a SentencePiece
tokenizer); the `gguf` package's own GGUFWriter writes it as GGUF files (F32, F16 and Q8_0
tensors; a byte-level BPE and a SentencePiece tokenizer); checkpoints come from sessions of the
float32 file after a few tokens (LM-Infinite with the ring wrapped, window, full). NumPy makes
the weights from a fixed seed (no torch: the campaign process stays small), so the seeds are the
same on every run and a stored mutation replays on the file it was found on.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEMPLATE = (
    "{% for m in messages %}{{ bos_token + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)
VOCAB = 300
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "12"]

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# seed name -> the reader it feeds
SAFETENSORS_SEEDS = ("single_f32", "single_bf16", "single_spm")
GGUF_SEEDS = ("gguf_bpe", "gguf_spm")
CHECKPOINT_SEEDS = ("ckpt_lminfinite", "ckpt_window", "ckpt_full")
REAL_GGUF_SEED = "gguf_smollm2"  # SmolLM2's own GGUF (98 MB), where it is installed


@dataclass(frozen=True)
class Seeds:
    folder: Path
    external: dict[str, Path] = field(default_factory=dict)  # seeds not built here, by name

    def path(self, name: str) -> Path:
        if name in self.external:
            return self.external[name]
        suffix = {"gguf": ".gguf", "ckpt": ".ckpt"}.get(name.split("_")[0], ".safetensors")
        return self.folder / f"{name}{suffix}"

    def bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    @property
    def model_file(self) -> Path:
        """The model every checkpoint seed belongs to."""
        return self.path("single_f32")


def build_seeds(folder: Path, real_gguf: Path | None = None) -> Seeds:
    """Write every seed into `folder` (a second call finds them there); `real_gguf`, when
    given, is the seed REAL_GGUF_SEED."""
    seeds = Seeds(Path(folder), {REAL_GGUF_SEED: Path(real_gguf)} if real_gguf else {})
    if seeds.path(CHECKPOINT_SEEDS[-1]).exists():
        return seeds
    seeds.folder.mkdir(parents=True, exist_ok=True)
    bpe_folder = _hf_folder(seeds.folder / "hf_bpe", _bpe_tokenizer_files(), bos=0, eos=1)
    sp_model = _sentencepiece_model()
    spm_folder = _hf_folder(seeds.folder / "hf_spm", {"tokenizer.model": sp_model}, bos=1, eos=2)

    from minillm.convert import convert
    convert(bpe_folder, seeds.path("single_f32"))
    convert(bpe_folder, seeds.path("single_bf16"), dtype="bfloat16")
    convert(spm_folder, seeds.path("single_spm"))
    _write_gguf(seeds.path("gguf_bpe"), bpe_folder, _bpe_tokenizer_kvs(bpe_folder))
    _write_gguf(seeds.path("gguf_spm"), spm_folder, _spm_tokenizer_kvs(sp_model))
    _write_checkpoints(seeds)
    return seeds


# --- the tiny model as a Hugging Face folder --------------------------------------------------

def _tensors(config: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def norm():
        return rng.uniform(0.5, 1.5, h).astype(np.float32)

    out = {"model.embed_tokens.weight": mat(v, h), "lm_head.weight": mat(v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": norm(), p + "self_attn.q_proj.weight": mat(h, h),
            p + "self_attn.k_proj.weight": mat(kv, h), p + "self_attn.v_proj.weight": mat(kv, h),
            p + "self_attn.o_proj.weight": mat(h, h), p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": mat(i, h), p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        })
    out["model.norm.weight"] = norm()
    return out


def _hf_folder(folder: Path, tokenizer_files: dict[str, bytes], bos: int, eos: int) -> Path:
    from minillm.formats.safetensors import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, bos_token_id=bos, eos_token_id=eos)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = _tensors(config)
    write_safetensors(str(folder / "model.safetensors"),
                      [(k, a.shape) for k, a in tensors.items()], tensors.__getitem__)
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)
    # SentencePiece (Llama) starts with BOS, byte-level BPE does not
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": "tokenizer.model" in tokenizer_files, "bos_token": "<s>",
         "eos_token": "</s>", "chat_template": TEMPLATE}))
    return folder


def _bpe_tokenizer_files() -> dict[str, bytes]:
    """A byte-level BPE tokenizer.json with <s> and </s> (ids 0 and 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return {"tokenizer.json": tok.to_str().encode()}


def _sentencepiece_model() -> bytes:
    """A SentencePiece BPE model (<unk>, <s>, </s> = 0, 1, 2; byte fallback), VOCAB pieces."""
    import sentencepiece

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        minloglevel=2, num_threads=1)
    return model.getvalue()


# --- GGUF, written by the gguf package --------------------------------------------------------

def _gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, n, rest = hf.split(".", 3)
    return f"blk.{n}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _bpe_tokenizer_kvs(folder: Path) -> list[tuple]:
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    T = gguf.GGUFValueType
    return [("tokenizer.ggml.model", "gpt2", T.STRING), ("tokenizer.ggml.pre", "smollm", T.STRING),
            ("tokenizer.ggml.tokens", tokens, T.ARRAY),
            ("tokenizer.ggml.token_type", [3 if t in ("<s>", "</s>") else 1 for t in tokens],
             T.ARRAY, T.INT32),
            ("tokenizer.ggml.merges", merges, T.ARRAY),
            ("tokenizer.ggml.bos_token_id", 0, T.UINT32),
            ("tokenizer.ggml.eos_token_id", 1, T.UINT32),
            ("tokenizer.ggml.add_bos_token", False, T.BOOL)]


def _spm_tokenizer_kvs(sp_model: bytes) -> list[tuple]:
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model)
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(n)]
    T = gguf.GGUFValueType
    return [("tokenizer.ggml.model", "llama", T.STRING),
            ("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)], T.ARRAY),
            ("tokenizer.ggml.scores", [sp.get_score(i) for i in range(n)], T.ARRAY,
             T.FLOAT32),
            ("tokenizer.ggml.token_type", kinds, T.ARRAY, T.INT32),
            ("tokenizer.ggml.bos_token_id", 1, T.UINT32),
            ("tokenizer.ggml.eos_token_id", 2, T.UINT32),
            ("tokenizer.ggml.unknown_token_id", 0, T.UINT32)]


def _write_gguf(path: Path, folder: Path, tokenizer_kvs: list[tuple]) -> None:
    import gguf

    from minillm.formats.safetensors import SafetensorsFile

    cfg = json.loads((folder / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    for kv in tokenizer_kvs:
        w.add_key_value(*kv)
    w.add_chat_template(TEMPLATE)
    src = SafetensorsFile(str(folder / "model.safetensors"))
    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    for name in src.entries:
        a = np.array(src.tensor(name))
        if name.endswith("up_proj.weight"):
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, q8), raw_dtype=q8)
        elif name.endswith("down_proj.weight"):
            w.add_tensor(_gguf_name(name), a.astype(np.float16), raw_dtype=f16)
        else:
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- checkpoints of a tiny session ------------------------------------------------------------

def _write_checkpoints(seeds: Seeds) -> None:
    import minillm
    from minillm.checkpoint import write_checkpoint
    from minillm.session import AttentionWarning

    model = minillm.load(seeds.model_file, backend="numpy")
    ids = np.random.default_rng(1).integers(0, VOCAB, 13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttentionWarning)
        ring = model.session(n_global=2, n_local=8)  # 13 tokens: the ring has wrapped
        window = model.session("window", n_local=8)
        full = model.session("full")
    ring.feed(ids, chunk_size=5, logits="none")
    window.feed(ids[:5], logits="none")
    full.feed(ids[:6], logits="none")
    write_checkpoint(str(seeds.path("ckpt_lminfinite")), ring, {"tokens": 13, "note": "seed"})
    window.save(str(seeds.path("ckpt_window")))
    full.save(str(seeds.path("ckpt_full")))
