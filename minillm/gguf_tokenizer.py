"""Rebuild a GGUF file's tokenizer as a tokenizer.json (for the `tokenizers` library).

Built here rather than with transformers' GGUF conversion, which drops pre-tokenizer steps such as
SmolLM2's digit split (DESIGN.md §3).
"""

from __future__ import annotations

import json

from .errors import ModelFileError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX_BYTELEVEL = {
    "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True
}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_REGEX_BYTELEVEL],
}
_LLAMA3 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**_GPT2_REGEX_BYTELEVEL, "use_regex": False},
    ],
}
# tokenizer.ggml.pre -> pre-tokenizer; names as llama.cpp writes them (smollm, starcoder and refact
# all split every digit apart before the GPT-2 regex).
_PRE_TOKENIZERS = {
    "default": _GPT2_REGEX_BYTELEVEL,
    "gpt2": _GPT2_REGEX_BYTELEVEL,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
}
_IGNORES_MERGES = {"llama-bpe", "llama3"}  # Llama 3 looks whole words up in the vocab first


def tokenizer_from_gguf(reader) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) for the tokenizer stored in a gguf.GGUFReader."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelFileError("the GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFileError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(reader, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(reader, tokens, types)
    else:
        raise ModelFileError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    return json.dumps(tokenizer, ensure_ascii=False), _tokenizer_config(reader, tokens, kind)


def _field(reader, name: str, default=None):
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def _tokenizer_config(reader, tokens: list[str], kind: str) -> dict:
    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    # llama.cpp's default: SentencePiece models start with BOS, byte-level BPE ones do not.
    config = {"add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))}
    for key in ("bos", "eos"):
        if token(key) is not None:
            config[f"{key}_token"] = token(key)
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return config


def _added_tokens(tokens: list[str], types: list[int], special_types: set[int]) -> list[dict]:
    """Tokens matched in raw text before the model runs; special ones only when parsing specials."""
    return [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t in special_types,
        }
        for i, (tok, t) in enumerate(zip(tokens, types))
        if t in special_types or t == _USER_DEFINED
    ]


def _bpe_model(tokens: list[str], merges: list, **options) -> dict:
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {tok: i for i, tok in enumerate(tokens)},
        "merges": merges,
    }
    model.update(options)
    return model


def _tokenizer_json(added, normalizer, pre_tokenizer, decoder, model) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,  # BOS is the Tokenizer class's business (add_bos)
        "decoder": decoder,
        "model": model,
    }


def _byte_level_bpe(reader, tokens: list[str], types: list[int]) -> dict:
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        supported = ", ".join(sorted(_PRE_TOKENIZERS))
        raise ModelFileError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {supported})")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError("GGUF tokenizer: a gpt2 (byte-level BPE) model without tokenizer.ggml.merges")
    model = _bpe_model(tokens, merges, ignore_merges=pre in _IGNORES_MERGES)
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    added = _added_tokens(tokens, types, {_CONTROL})
    return _tokenizer_json(added, None, _PRE_TOKENIZERS[pre], decoder, model)


def _sentencepiece_bpe(reader, tokens: list[str], types: list[int]) -> dict:
    """The equivalent of Hugging Face's LlamaTokenizerFast (legacy) for a SentencePiece BPE vocabulary."""
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelFileError("GGUF tokenizer: a llama (SentencePiece) model needs one score per token")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    if unk is None and "<unk>" in tokens:
        unk = "<unk>"
    merges = _merges_from_scores(tokens, types, scores)
    model = _bpe_model(tokens, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    normalizer = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    if _field(reader, "tokenizer.ggml.add_space_prefix", True):
        normalizer.insert(0, {"type": "Prepend", "prepend": "▁"})
    decoder = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    added = _added_tokens(tokens, types, {_CONTROL, _UNKNOWN})
    return _tokenizer_json(added, {"type": "Sequence", "normalizers": normalizer}, None, decoder, model)


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """BPE merges implied by SentencePiece scores (as transformers' SentencePieceExtractor derives them).

    SentencePiece merges the adjacent pair whose joined piece scores highest, so every split of a
    normal piece into two known pieces is a merge, ranked by the joined piece's score, descending.
    """
    ids = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL:
            continue  # control, byte and unused pieces are never the result of a merge
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in ids and right in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        merges += [(scores[i], [left, right]) for left, right in splits]
    merges.sort(key=lambda m: m[0], reverse=True)  # stable: ties keep vocabulary order
    return [pair for _, pair in merges]
