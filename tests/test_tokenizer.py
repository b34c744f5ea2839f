"""Tokenizer tests: SmolLM2's GGUF tokenizer against independent oracles (marked real_model),
and SentencePiece models."""

import io
import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece
from helpers import reusing_gguf_reader
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from minillm.errors import ModelFileError
from minillm.formats.gguf import tokenizer_from_gguf
from minillm.formats.hf_folder import read_tokenizer
from minillm.tokenizer import Tokenizer, check_vocab

GPL3 = Path("/usr/share/common-licenses/GPL-3")

TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "café naïve résumé Ångström façade Œuvre",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️",
    "def f(x):\n\treturn x  # tab\n        pass\n\n\n",
    "   leading and trailing spaces   ",
    "line one\r\nline two\r\n\r\n",
    "\n\n  0. numbers 12345 3.14159 1,000,000 2024-01-01",
    "literal <|im_start|>user and <|endoftext|> here <|im_end|>",
    "non\u00a0breaking\u2009thin, zero\u200bwidth, tabs\t\tand\x0bvt",
    "don't I'll we've THEY'RE it's",
    "",
]


def _has_digit(text: str) -> bool:
    return any(c.isnumeric() for c in text)


def _stream(tokenizer, ids, skip_special=False):
    decoder = tokenizer.stream_decoder(skip_special)
    pieces = [decoder.add(i) for i in ids]
    return pieces, decoder.flush()


def _assert_streams_like_decode(tokenizer, ids, skip_special=False):
    pieces, rest = _stream(tokenizer, ids, skip_special)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special)
    assert not any("\ufffd" in p for p in pieces)


# --- SmolLM2 (byte-level BPE from GGUF): marked real_model -------------------------------------


@pytest.fixture(scope="module")
def smollm_json(smollm2_gguf_reader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer config) minillm rebuilds from the GGUF's fields."""
    return tokenizer_from_gguf(smollm2_gguf_reader)


@pytest.fixture(scope="module")
def smollm(smollm_json):
    json_text, config = smollm_json
    return Tokenizer.from_tokenizer_json(json_text, config)


@pytest.fixture(scope="module")
def reference(smollm2_gguf_reader):
    """An independent build: GGUF vocab and merges with SmolLM2's pre-tokenizer written out here."""
    fields = smollm2_gguf_reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    ref = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ref.decoder = decoders.ByteLevel()
    return ref


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf_path, smollm2_gguf_reader):
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_gguf_path)
    with reusing_gguf_reader(path, smollm2_gguf_reader):  # parsed once a session
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.real_model
def test_smollm_config(smollm):
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)
    assert smollm.vocab_size == 49152
    assert smollm.special_ids == frozenset(range(17))
    assert smollm.token_to_id("<|im_end|>") == 2
    assert smollm.token_to_id("no such token") is None


@pytest.mark.real_model
@pytest.mark.skipif(not GPL3.is_file(), reason="Debian's GPL-3 text is not installed")
def test_gpl3_golden_token_count(smollm):
    text = GPL3.read_text("utf-8")
    ids = smollm.encode(text)
    assert len(ids) == 7639  # transformers' GGUF conversion gives 7,658: it drops the digit split
    assert smollm.decode(ids) == text


@pytest.mark.real_model
def test_digits_split_one_by_one(smollm):
    assert len(smollm.encode("12345")) == 5
    pieces = [smollm.decode([i]) for i in smollm.encode("\n\n  0. and 2024")]
    assert "0" in pieces and pieces[-4:] == ["2", "0", "2", "4"]


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_matches_independent_reference(smollm, reference, text):
    ids = smollm.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert smollm.decode(ids) == text


@pytest.mark.real_model
@pytest.mark.parametrize("text", [t for t in TEXTS if not _has_digit(t) and "<|" not in t])
def test_matches_transformers_gguf_without_digits(smollm, transformers_gguf, text):
    assert smollm.encode(text) == transformers_gguf.encode(text, add_special_tokens=False)


@pytest.mark.real_model
def test_special_tokens_parsed_only_on_request(smollm):
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = smollm.encode(text, special=True)
    assert parsed[0] == 1 and 2 in parsed
    literal = smollm.encode(text)
    assert not {1, 2} & set(literal)
    assert smollm.decode(literal) == smollm.decode(parsed) == text
    assert smollm.decode(parsed, skip_special=True) == "user\nhi"


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_smollm_stream_decoder(smollm, text):
    _assert_streams_like_decode(smollm, smollm.encode(text))


@pytest.mark.real_model
def test_smollm_stream_decoder_skips_special(smollm):
    ids = smollm.encode("<|im_start|>assistant\nfine 👍🏽<|im_end|>", special=True)
    _assert_streams_like_decode(smollm, ids, skip_special=True)
    _assert_streams_like_decode(smollm, ids)


# --- SentencePiece: a tiny model trained here, used directly and through a GGUF -------------------


SP_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "Café naïve résumé über straße",
    " leading space and  double  spaces ",
    "unseen letters: ø ß Ω and 日本語 and 😀 👨‍👩‍👧",
    "tabs\tand\nnewlines\r\n",
    "digits 12345 and 3.14",
    "literal <s> and </s> inside",
    "",
]


@pytest.fixture(scope="module")
def sp_model_bytes() -> bytes:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve",
             "résumé", "über", "straße", "hello", "12", "345"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    model = io.BytesIO()
    # Llama's settings: BPE, byte fallback, no normalization, digits apart, whitespace kept.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def sp(sp_model_bytes):
    return sentencepiece.SentencePieceProcessor(model_proto=sp_model_bytes)


def _token_type(sp, i: int) -> int:
    for kind, check in ((2, sp.is_unknown), (3, sp.is_control), (5, sp.is_unused), (6, sp.is_byte)):
        if check(i):
            return kind
    return 1


@pytest.fixture(scope="module")
def sp_gguf_tokenizer(sp, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "sp.gguf"
    n = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([_token_type(sp, i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    json_text, config = tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    assert config == {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    return Tokenizer.from_tokenizer_json(json_text, config)


@pytest.fixture(scope="module", params=["sentencepiece", "gguf"])
def sp_tokenizer(request, sp_model_bytes, sp_gguf_tokenizer):
    if request.param == "gguf":
        return sp_gguf_tokenizer
    return Tokenizer.from_sentencepiece(sp_model_bytes)


def test_sentencepiece_config(sp_tokenizer, sp):
    assert (sp_tokenizer.bos_id, sp_tokenizer.eos_id, sp_tokenizer.add_bos) == (1, 2, True)
    assert sp_tokenizer.vocab_size == sp.get_piece_size()
    assert {1, 2} <= sp_tokenizer.special_ids
    assert sp_tokenizer.token_to_id("▁the") == sp.piece_to_id("▁the")
    assert sp_tokenizer.token_to_id("no such piece") is None


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_ids_match(sp_tokenizer, sp, text):
    ids = sp_tokenizer.encode(text)
    assert ids == [sp.bos_id()] + sp.encode(text)
    assert sp_tokenizer.decode(ids, skip_special=True) == text


def test_sentencepiece_uses_byte_fallback(sp):
    assert any(sp.is_byte(i) for i in sp.encode("😀 日本語"))


def test_sentencepiece_special_tokens(sp_tokenizer):
    parsed = sp_tokenizer.encode("<s>hi</s>", special=True)
    assert parsed[:2] == [1, 1] and parsed[-1] == 2
    assert not {1, 2} & set(sp_tokenizer.encode("<s>hi</s>")[1:])


@pytest.mark.parametrize("text", SP_TEXTS)
@pytest.mark.parametrize("skip_special", [False, True])
def test_sentencepiece_stream_decoder(sp_tokenizer, text, skip_special):
    _assert_streams_like_decode(sp_tokenizer, sp_tokenizer.encode(text), skip_special)


def test_stream_decoder_releases_invalid_bytes(sp_tokenizer):
    """Bytes that never form a character must not be held back for the rest of the stream."""
    lone = sp_tokenizer.token_to_id("<0xFF>")
    ids = [lone] * 20 + sp_tokenizer.encode("hello")[1:]
    pieces, rest = _stream(sp_tokenizer, ids)
    assert "".join(pieces) + rest == sp_tokenizer.decode(ids)
    assert len(rest) < 10


# --- folders and bad input --------------------------------------------------------------------


@pytest.mark.real_model
def test_folder_prefers_tokenizer_json(tmp_path, sp_model_bytes, smollm_json):
    json_text, config = smollm_json
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    (tmp_path / "tokenizer.json").write_text(json_text, "utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tokenizer = Tokenizer.from_source(read_tokenizer(tmp_path))
    assert tokenizer.vocab_size == 49152
    assert tokenizer.add_bos and tokenizer.encode("hi")[0] == 1


def test_folder_sentencepiece_config(tmp_path, sp_model_bytes, sp):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes)
    config = {"add_bos_token": False, "eos_token": {"content": "<s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_source(read_tokenizer(tmp_path))
    assert tokenizer.encode("hello") == sp.encode("hello")
    assert tokenizer.eos_id == 1


def test_overrides_from_model_config(sp_model_bytes):
    tokenizer = Tokenizer.from_sentencepiece(sp_model_bytes, bos_id=2, eos_id=1)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (2, 1)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(ModelFileError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_source(read_tokenizer(tmp_path))


def test_corrupt_sentencepiece_model():
    with pytest.raises(ModelFileError, match="SentencePiece"):
        Tokenizer.from_sentencepiece(b"\x00\xffnot a model" * 10)


@pytest.mark.parametrize("text", ["{not json", '{"model": {"type": "Nope"}}', "[]"])
def test_invalid_tokenizer_json(text):
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_tokenizer_json(text)


def test_corrupt_files_in_folder_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_source(read_tokenizer(tmp_path))


def test_vocab_check(sp_model_bytes):
    tokenizer = Tokenizer.from_sentencepiece(sp_model_bytes)
    check_vocab(tokenizer, 400)
    check_vocab(tokenizer, 512)  # padded embeddings are fine
    with pytest.raises(ModelFileError, match="400.*399"):
        check_vocab(tokenizer, 399)


class _FakeReader:
    """Just enough of gguf.GGUFReader for tokenizer_from_gguf."""

    class _Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    def __init__(self, **values):
        self.fields = {f"tokenizer.ggml.{k}": self._Field(v) for k, v in values.items()}


def test_gguf_unknown_pre_tokenizer_refused():
    reader = _FakeReader(model="gpt2", pre="mystery-9000", tokens=["a", "b", "ab"], merges=["a b"])
    with pytest.raises(ModelFileError, match="mystery-9000"):
        tokenizer_from_gguf(reader)


def test_gguf_unknown_tokenizer_model_refused():
    with pytest.raises(ModelFileError, match="'bert'"):
        tokenizer_from_gguf(_FakeReader(model="bert", tokens=["a"]))


@pytest.mark.parametrize(
    "pre, expected",
    [("llama-bpe", [2, 5, 3, 4]), ("gpt2", [2, 6, 4]), ("smollm", [2, 5, 3, 4])],
)
def test_gguf_pre_tokenizers(pre, expected):
    """Llama 3 keeps a space apart from the digits after it; GPT-2 merges them; smollm splits
    digits."""
    tokens = ["a", "b", "ab", "1", "2", "Ġ", "Ġ1"]
    reader = _FakeReader(model="gpt2", pre=pre, tokens=tokens, merges=["a b", "Ġ 1"])
    tokenizer = Tokenizer.from_tokenizer_json(*tokenizer_from_gguf(reader))
    assert tokenizer.encode("ab 12") == expected
    assert tokenizer.decode(expected) == "ab 12"
