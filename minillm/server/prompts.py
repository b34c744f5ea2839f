"""What a request asks the model to continue: the chat template's render, or a raw prompt, as
text and ids (minillm.chat's template rules: sandboxed Jinja, special tokens parsed)."""

from __future__ import annotations

import warnings

import numpy as np

from ..chat import FALLBACK_STOP_TEXT, FALLBACK_TEMPLATE, ChatTemplate, end_of_turn_ids
from .engine import Prompt
from .protocol import ApiError


class Prompts:
    def __init__(self, model):
        self.tokenizer = tok = model.tokenizer
        if model.chat_template:
            self.template = ChatTemplate(model.chat_template, tok)
            self.chat_stop_texts: tuple[str, ...] = ()
        else:
            warnings.warn("the model has no chat template: /v1/chat/completions uses a plain "
                          "'User:/Assistant:' format", stacklevel=2)
            self.template = ChatTemplate(FALLBACK_TEMPLATE, tok)
            self.chat_stop_texts = tuple(FALLBACK_STOP_TEXT)
        self.text_stop_ids = frozenset(model.eos_ids)
        self.chat_stop_ids = self.text_stop_ids | end_of_turn_ids(self.template, tok)

    def chat(self, messages: list[dict]) -> Prompt:
        """The conversation rendered with the generation prompt (MiniLLMError when the
        template refuses it); the template writes its own BOS."""
        text = self.template.render(messages, add_generation_prompt=True)
        ids = self.encode_more(text)
        if not ids:
            raise ApiError(400, "the chat template rendered the messages as nothing",
                           param="messages", code="invalid_value")
        return self._prompt(text, ids)

    def completion(self, prompt: str) -> Prompt:
        ids = self.tokenizer.encode(prompt, special=True)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return self._prompt(prompt, ids)

    def encode_more(self, text: str) -> list[int]:
        """Ids of text that follows other text: special tokens parsed, no BOS."""
        ids = self.tokenizer.encode(text, special=True)
        return ids[1:] if self.tokenizer.add_bos else ids

    def _prompt(self, text: str, ids: list[int]) -> Prompt:
        return Prompt(text, np.asarray(ids, dtype=np.int64), self.encode_more)
