"""Text <-> token ids: one interface over a `tokenizers` (tokenizer.json) or SentencePiece backend.

Host-only code: ids are plain Python ints. BOS is prepended only when the tokenizer's own config
asks for it (`add_bos_token`); EOS is never appended by encode().
"""

from __future__ import annotations

import json
import re

from .errors import ModelFileError, one_line
from .formats.hf_folder import post_processor_bos

_REPLACEMENT = "\ufffd"
# An incomplete UTF-8 character spans at most 3 pending bytes, each in its own token at worst; past
# this many held-back ids a trailing U+FFFD is real text (or undecodable bytes) and is let through.
_MAX_PENDING = 8


def _adds_prefix_space(normalizer, pre_tokenizer) -> bool:
    """Whether a tokenizer.json puts a space before the text (Prepend "▁", Metaspace, ByteLevel)."""
    def parts(node):
        if not isinstance(node, dict):
            return []
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [p for n in inner for p in parts(n)] if inner else [node]

    for node in parts(normalizer) + parts(pre_tokenizer):
        kind = node.get("type")
        if kind == "Prepend" and node.get("prepend") == "\u2581":
            return True
        if kind == "Metaspace" and node.get("prepend_scheme", "always") != "never" \
                and node.get("add_prefix_space", True):
            return True
        if kind == "ByteLevel" and node.get("add_prefix_space"):
            return True
    return False


class _HFBackend:
    """A `tokenizers.Tokenizer`; a second copy encodes with special tokens treated as plain text."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._parsing = HFTokenizer.from_str(json_text)
            self._literal = HFTokenizer.from_str(json_text)
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON or schema
            raise ModelFileError(f"invalid tokenizer.json: {one_line(err)}") from None
        self._literal.encode_special_tokens = True
        vocab = self._parsing.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        decoder = self._parsing.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in decoder.items() if tok.special)
        bos = post_processor_bos(json_text)
        self.default_bos = self.token_to_id(bos) if bos is not None else None
        self.default_eos = None
        spec = json.loads(json_text)
        self.prefixes_space = _adds_prefix_space(spec.get("normalizer"), spec.get("pre_tokenizer"))

    def encode(self, text: str, special: bool) -> list[int]:
        backend = self._parsing if special else self._literal
        return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._parsing.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, s: str) -> int | None:
        return self._parsing.token_to_id(s)


class _SPBackend:
    """A SentencePiece model. It never parses control tokens in text, so special=True splits
    them out."""

    def __init__(self, model_bytes: bytes):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
            for i in range(self._sp.get_piece_size()):  # a piece that is not UTF-8 fails
                self._sp.id_to_piece(i)                    # here, not in the middle of a stream
        except Exception as err:
            raise ModelFileError(f"invalid SentencePiece model: {one_line(err)}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        pieces = sorted(filter(None, map(self._sp.id_to_piece, self.special_ids)), key=len,
                        reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self.default_bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.default_eos = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        # add_dummy_prefix: "a" encodes as "▁a"
        pieces = self._sp.encode("a", out_type=str)
        self.prefixes_space = bool(pieces) and pieces[0].startswith("\u2581")

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self._sp.encode(text)
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start : match.start()])
            ids.append(self._sp.piece_to_id(match.group()))
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        # sentencepiece drops control ids silently; write them out between decoded runs instead.
        parts, run = [], []
        for i in ids:
            if i not in self.special_ids:
                run.append(i)
            elif not skip_special:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, s: str) -> int | None:
        i = self._sp.piece_to_id(s)
        return i if self._sp.id_to_piece(i) == s else None  # unknown pieces map to <unk>


class Tokenizer:
    """encode/decode with the model's own rules: BOS only where its config asks, EOS never.

    A tokenizer config is the normalized one every model source carries (plain add_bos_token,
    bos_token and eos_token: `minillm.formats.hf_folder.normalize_tokenizer_config`).
    """

    def __init__(self, backend, add_bos: bool, bos_id: int | None, eos_id: int | None):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.special_ids: frozenset[int] = backend.special_ids
        self.add_bos = add_bos
        self.bos_id = bos_id
        self.eos_id = eos_id
        if add_bos and bos_id is None:
            raise ModelFileError("the tokenizer config asks for a BOS token but names none")

    @classmethod
    def _build(cls, backend, config: dict | None, add_bos_default: bool,
               bos_id, eos_id) -> Tokenizer:
        config = config or {}

        def config_id(key: str, default: int | None) -> int | None:
            token = config.get(key)
            found = backend.token_to_id(token) if isinstance(token, str) else None
            return found if found is not None else default

        bos = bos_id if bos_id is not None else config_id("bos_token", backend.default_bos)
        eos = eos_id if eos_id is not None else config_id("eos_token", backend.default_eos)
        add_bos = config.get("add_bos_token")
        add_bos = add_bos_default if add_bos is None else bool(add_bos)
        return cls(backend, add_bos, bos, eos)

    @classmethod
    def from_tokenizer_json(
        cls, json_text: str, tokenizer_config: dict | None = None, *, bos_id=None, eos_id=None
    ) -> Tokenizer:
        backend = _HFBackend(json_text)
        # Without a config, BOS is added only where the tokenizer.json's post-processor adds it.
        return cls._build(backend, tokenizer_config, backend.default_bos is not None,
                          bos_id, eos_id)

    @classmethod
    def from_sentencepiece(
        cls, model_bytes: bytes, tokenizer_config: dict | None = None, *, bos_id=None, eos_id=None
    ) -> Tokenizer:
        backend = _SPBackend(model_bytes)
        return cls._build(backend, tokenizer_config, backend.default_bos is not None,
                          bos_id, eos_id)

    @classmethod
    def from_source(cls, src, *, bos_id=None, eos_id=None) -> Tokenizer:
        """A model source's tokenizer (see minillm.formats): tokenizer.json, else SentencePiece."""
        if src.tokenizer_json is not None:
            return cls.from_tokenizer_json(src.tokenizer_json, src.tokenizer_config,
                                           bos_id=bos_id, eos_id=eos_id)
        return cls.from_sentencepiece(src.sentencepiece_model, src.tokenizer_config,
                                      bos_id=bos_id, eos_id=eos_id)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; special=True turns special-token strings in it into their ids."""
        ids = self._backend.encode(text, special)
        return [self.bos_id] + ids if self.add_bos else ids

    def encode_continuation(self, text: str, first: bool) -> list[int]:
        """Ids of a piece of a longer literal text cut before a space (see minillm.textstream).

        Tokenizers that prefix the text with a space ("▁", add_prefix_space) would add one at
        every piece: there the piece's own leading space is dropped and the prefix stands for it.
        """
        if first:
            return self.encode(text)
        if self._backend.prefixes_space and text.startswith(" "):
            text = text[1:]
        return self._backend.encode(text, False)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, s: str) -> int | None:
        return self._backend.token_to_id(s)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Turns ids arriving one at a time into text, never emitting half a character.

    The ids already emitted are kept as decoding context (a whole previous step), so a piece's
    leading space decodes as it would mid-text; the window is trimmed at every emission.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special)
        self._ids: list[int] = []  # context ids, then ids not yet emitted
        self._n_context = 0
        self._context_text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        pending = len(self._ids) - self._n_context
        complete = len(text) > len(self._context_text) and not text.endswith(_REPLACEMENT)
        if not complete and pending <= _MAX_PENDING:
            return ""
        new = text[len(self._context_text) :]
        self._ids = self._ids[self._n_context :]
        self._n_context = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """The held-back rest (incomplete bytes become U+FFFD); the decoder then starts afresh."""
        new = self._decode(self._ids)[len(self._context_text) :]
        self._ids, self._n_context, self._context_text = [], 0, ""
        return new


def check_vocab(tokenizer: Tokenizer, n_embeddings: int) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding row for."""
    if tokenizer.vocab_size > n_embeddings:
        raise ModelFileError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model has only "
            f"{n_embeddings} embedding rows: they do not belong together"
        )
