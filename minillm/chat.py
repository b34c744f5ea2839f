"""A conversation kept in one session: chat templates, turns, streaming answers. No terminal I/O.

The whole conversation lives in a single LM-Infinite session, so it never overflows. Each turn
renders the template for all messages plus the new user message; the text already in the cache
is a prefix of that render, and only the remainder is encoded and fed. A template that rewrites
history (the render no longer extends what was fed), or a turn cut short where the text fed so
far is not known, costs a reset and a full re-feed, never a wrong cache.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import deque
from collections.abc import Iterator
from datetime import datetime

from .errors import MiniLLMError, one_line
from .generate import generate_ids
from .middle import DEFAULT_FROM_LAYER
from .sampling import SamplingParams

# Used when the model file carries no chat template (base models, tiny test models).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
FALLBACK_STOP_TEXT = ("\nUser:",)  # a base model continues the dialogue by itself: cut it there
_PROBE = "\x00minillm-probe\x00"  # an assistant message whose end shows the template's end of turn


def compile_template(source: str):
    """A Jinja template compiled as transformers' apply_chat_template compiles it (sandboxed)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """The model's chat template, with the tokenizer's bos/eos token strings as variables."""

    def __init__(self, source: str, tokenizer):
        import jinja2

        try:
            self._template = compile_template(source)
        except jinja2.exceptions.TemplateError as err:
            raise MiniLLMError(f"the model's chat template is not valid Jinja: "
                               f"{one_line(err)}") from None
        self._tokens = {}
        for name, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
            if token_id is not None:
                self._tokens[name] = tokenizer.decode([token_id])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=None,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except jinja2.exceptions.TemplateError as err:  # including the template's raise_exception
            raise MiniLLMError(f"the chat template refused the conversation: "
                               f"{one_line(err)}") from None
        except Exception as err:  # the template's own code failed: 1/0, endless recursion, ...
            raise MiniLLMError(f"the chat template failed: {one_line(err)}") from None


def end_of_turn_ids(template: ChatTemplate, tokenizer) -> frozenset[int]:
    """The special token the template writes right after an assistant message (e.g. <|eot_id|>)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = template.render(messages, add_generation_prompt=False)
    except MiniLLMError:
        return frozenset()
    if _PROBE not in text:
        return frozenset()
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    for token in _encode(tokenizer, after):
        if token in tokenizer.special_ids:
            return frozenset({token})
        if tokenizer.decode([token]).strip():  # real text before any special token: none
            break
    return frozenset()


def _encode(tokenizer, text: str) -> list[int]:
    """Ids of template text: special tokens parsed, no BOS added (the template writes its own)."""
    ids = tokenizer.encode(text, special=True)
    return ids[1:] if tokenizer.add_bos else ids


class _StopText:
    """Holds back streamed text that might be the start of a stop string; cuts at a full one."""

    def __init__(self, stops):
        self.stops, self.pending, self.stopped = tuple(stops), "", False

    def add(self, piece: str) -> str:
        self.pending += piece
        cuts = [self.pending.find(s) for s in self.stops if s in self.pending]
        if cuts:
            self.stopped = True
            out, self.pending = self.pending[:min(cuts)], ""
            return out
        keep = max((n for s in self.stops for n in range(1, len(s))
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _TrackedSession:
    """The session as generate_ids sees it, recording which ids really entered it.

    Ctrl-C may land inside a feed; the session writes chunks all or nothing, so its position
    says how many of the ids got in.
    """

    def __init__(self, session):
        self.session, self.fed = session, []

    def feed(self, ids, **kw):
        ids, start = [int(i) for i in ids], self.session.position
        try:
            return self.session.feed(ids, **kw)
        finally:
            self.fed += ids[:self.session.position - start]


class Chat:
    """A conversation with a model: `for piece in chat.send("hello"): print(piece, end="")`."""

    def __init__(self, model, system: str | None = None, attention: str = "lminfinite",
                 n_global: int | None = None, n_local: int | None = None, *,
                 top_k_middle: int = 0, top_k_from_layer: int = DEFAULT_FROM_LAYER,
                 top_k_insert_at: int | None = None, top_k_neighbours: int = 0,
                 middle_dir=None, **sampling):
        self.model = model
        self.tokenizer = model.tokenizer
        self.params = SamplingParams(**sampling)
        self.system = system
        self.session = model.session(attention, n_global, n_local, top_k_middle=top_k_middle,
                                     top_k_from_layer=top_k_from_layer,
                                     top_k_insert_at=top_k_insert_at,
                                     top_k_neighbours=top_k_neighbours, middle_dir=middle_dir)
        if model.chat_template:
            self.template, self.stop_text = ChatTemplate(model.chat_template, self.tokenizer), ()
        else:
            warnings.warn("the model has no chat template: using a plain 'User:/Assistant:' format",
                          stacklevel=2)
            self.template = ChatTemplate(FALLBACK_TEMPLATE, self.tokenizer)
            self.stop_text = FALLBACK_STOP_TEXT
        self.stop_ids = frozenset(model.eos_ids) | end_of_turn_ids(self.template, self.tokenizer)
        self.messages: list[dict] = []  # user/assistant turns; the system prompt is kept apart
        self._rng = self.params.rng()
        self._recent = deque(maxlen=max(self.params.repeat_last_n, 1))  # for the repeat penalty
        self._fed_text = ""   # the rendered text whose tokens are in the session
        self._stale = False   # _fed_text is not known: rebuild the session before the next turn
        self._active = None   # the generator of an answer in progress
        self._last = {}       # timings of the last answer

    # -- the conversation ------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        """All messages as the template sees them (system prompt first, when there is one)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.messages]

    def render(self, messages: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        return self.template.render(self.conversation() if messages is None else messages,
                                    add_generation_prompt)

    def close(self) -> None:
        """End the conversation: its session's middle store (top-k) is removed."""
        self._close_active()
        self.session.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self._close_active()
        self.messages.clear()
        self._recent.clear()
        self._rebuild()
        self._last = {}

    def _rebuild(self) -> None:
        self.session.reset()
        self._fed_text, self._stale = "", False

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # its finally records the partial answer
            self._active = None

    # -- one turn --------------------------------------------------------------------------
    def send(self, text: str, progress=None) -> Iterator[str]:
        """Stream the answer to `text` as text pieces; the turn is recorded even if cut short.
        progress(fed, total): called as the prompt is read (Session.feed)."""
        if not isinstance(text, str):  # a number or bytes would be rendered as some other text
            raise TypeError(f"a message is a str (got {type(text).__name__})")
        self._close_active()
        self._active = self._turn(text, progress)
        return self._active

    def _turn(self, text: str, progress=None) -> Iterator[str]:
        messages = self.conversation() + [{"role": "user", "content": text}]
        rendered = self.render(messages)
        if self._stale or not rendered.startswith(self._fed_text):
            self._rebuild()  # the template rewrote history: feed the whole render
        remainder = rendered[len(self._fed_text):]
        prompt_ids = _encode(self.tokenizer, remainder)
        tracked = _TrackedSession(self.session)
        decoder = self.tokenizer.stream_decoder(skip_special=True)
        stop_text = _StopText(self.stop_text)
        pieces, n_sampled = [], 0
        start = first = last = time.perf_counter()
        try:
            for token in generate_ids(tracked, prompt_ids, self.params, self.stop_ids, self._rng,
                                      history=self._recent, progress=progress):
                last = time.perf_counter()
                first = first if n_sampled else last
                n_sampled += 1
                if token in self.stop_ids:
                    break
                piece = stop_text.add(decoder.add(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                if stop_text.stopped:
                    break
            piece = "" if stop_text.stopped else stop_text.add(decoder.flush()) + stop_text.flush()
            if piece:
                pieces.append(piece)
                yield piece
        finally:
            self.messages += [{"role": "user", "content": text},
                              {"role": "assistant", "content": "".join(pieces)}]
            self._account(remainder, prompt_ids, tracked)
            self._last = dict(prompt_tokens=len(prompt_ids), prompt_seconds=first - start,
                              generated_tokens=n_sampled, generation_seconds=last - first)
            self._active = None

    def _account(self, remainder: str, prompt_ids: list[int], tracked: _TrackedSession) -> None:
        """Extend _fed_text by the text of the ids that really entered the session."""
        self._recent.extend(tracked.fed)
        n_prompt = len(prompt_ids)
        if len(tracked.fed) >= n_prompt:
            answer = tracked.fed[n_prompt:]
            self._fed_text += remainder + self._continuation(prompt_ids[-1:], answer)
        else:  # cut short during the prompt: keep what a later render can still extend
            part = self.tokenizer.decode(tracked.fed)
            if remainder.startswith(part):
                self._fed_text += part
            else:
                self._stale = True

    def _continuation(self, context: list[int], ids: list[int]) -> str:
        """The text ids add after context (decoding in context keeps a leading space right)."""
        if not ids:
            return ""
        before = self.tokenizer.decode(context)
        return self.tokenizer.decode(context + ids)[len(before):]

    # -- status ----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Tokens in the conversation, cache fill, and the last answer's speeds (for --verbose)."""
        spec, position = self.session.spec, self.session.position
        capacity = spec.n_global + spec.n_local if spec.bounded else None
        last = self._last
        out = dict(tokens=position, cache_capacity=capacity,
                   cache_fill=min(position, capacity) / capacity if capacity else None,
                   cache_bytes=self.session.nbytes, middle_bytes=self.session.middle_bytes,
                   top_k_middle=self.session.top_k is not None,
                   prompt_tokens=last.get("prompt_tokens", 0),
                   generated_tokens=last.get("generated_tokens", 0),
                   prompt_tps=None, generation_tps=None)
        if last.get("prompt_seconds"):
            out["prompt_tps"] = last["prompt_tokens"] / last["prompt_seconds"]
        if last.get("generated_tokens", 0) > 1 and last["generation_seconds"] > 0:
            # consecutive tokens are one decode step apart; the first one ends the prompt's time
            out["generation_tps"] = (last["generated_tokens"] - 1) / last["generation_seconds"]
        return out
