"""The OpenAI API as `minillm serve` speaks it: requests checked field by field, responses built.

No HTTP here: the app hands in the parsed JSON body and sends what comes back. Every refusal is
an ApiError carrying OpenAI's error fields ({"error": {"message", "type", "param", "code"}}).
Like OpenAI, an unknown field is refused rather than ignored, and so is a value minillm cannot
honour (n > 1, logprobs, tools, a penalty it does not have): a client never gets an answer
computed with settings other than those it sent. null stands for "not given" everywhere.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..config import is_int
from ..sampling import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI


class ApiError(Exception):
    """A request refused (4xx) or failed (5xx), as OpenAI reports it."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object; NaN and Infinity are not JSON and are refused."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, deep nesting
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, not {_json_type(value)}",
                       code="invalid_json")
    return value


def _json_type(value) -> str:
    names = {bool: "a boolean", str: "a string", list: "an array", dict: "an object",
             type(None): "null"}
    if isinstance(value, bool) or type(value) in names:
        return names[type(value)]
    return "an integer" if is_int(value) else "a number"


# -- field checkers: (value, param) -> value, or ApiError ------------------------------------------

def _type_error(param: str, expected: str, value) -> ApiError:
    return _invalid(param, f"invalid type for '{param}': expected {expected}, got "
                    f"{_json_type(value)}", "invalid_type")


def _string(value, param):
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    return value


def _boolean(value, param):
    if not isinstance(value, bool):
        raise _type_error(param, "a boolean", value)
    return value


def _integer(lo: int | None = None, hi: int | None = None):
    def check(value, param):
        if not is_int(value):
            raise _type_error(param, "an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _invalid(param, f"'{param}' must be {_range(lo, hi)} (got {value})")
        return int(value)
    return check


def _number(lo: float, hi: float | None, lo_open: bool = False):
    def check(value, param):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(param, "a number", value)
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (
                hi is not None and value > hi):
            low = f"greater than {lo}" if lo_open else None
            raise _invalid(param, f"'{param}' must be {low or _range(lo, hi)} (got {value})")
        return float(value)
    return check


def _range(lo, hi) -> str:
    if hi is None:
        return f"at least {lo}"
    return f"between {lo} and {hi}" if lo is not None else f"at most {hi}"


def _object(value, param):
    if not isinstance(value, dict):
        raise _type_error(param, "an object", value)
    return value


def _only(allowed, why: str):
    """A field minillm accepts only at its neutral values (null included). Types count:
    true is not 1, as JSON sees it."""
    def check(value, param):
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise _invalid(param, f"'{param}' = {json.dumps(value)} is not supported: {why}",
                           "unsupported_value")
        return value
    return check


def _empty(why: str):
    def check(value, param):
        if not isinstance(value, (list, dict)):
            raise _type_error(param, "an array or an object", value)
        if value:
            raise _invalid(param, f"'{param}' is not supported: {why}", "unsupported_value")
        return value
    return check


def _stop(value, param):
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error(param, "a string or an array of strings", value)
    if len(stops) > MAX_STOP_STRINGS:
        raise _invalid(param, f"'{param}' takes at most {MAX_STOP_STRINGS} strings "
                       f"(got {len(stops)})")
    if any(not s for s in stops):
        raise _invalid(param, f"'{param}' strings must not be empty")
    return tuple(stops)


def _stream_options(value, param):
    for key, item in _object(value, param).items():
        if key != "include_usage":
            raise _invalid(f"{param}.{key}", f"unknown field '{param}.{key}'", "unknown_parameter")
        if item is not None:
            _boolean(item, f"{param}.{key}")
    return value


def _response_format(value, param):
    if _object(value, param).get("type") != "text" or len(value) != 1:
        raise _invalid(param, f"'{param}' supports only {{\"type\": \"text\"}}",
                       "unsupported_value")
    return value


def _tool_choice(value, param):
    if value not in ("none", "auto"):
        raise _invalid(param, f"'{param}' = {json.dumps(value)} is not supported: minillm "
                       "serves no tools", "unsupported_value")
    return value


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = {"role", "content", "name", "refusal"}


def _content(value, param, role: str) -> str:
    """A message's text: a string, or text parts joined."""
    if value is None and role == "assistant":
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _type_error(param, "a string or an array of content parts", value)
    texts = []
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(part, dict):
            raise _type_error(where, "an object", part)
        if part.get("type") != "text":
            raise _invalid(f"{where}.type", f"content parts of type {json.dumps(part.get('type'))}"
                           " are not supported: minillm reads text only", "unsupported_value")
        texts.append(_string(part.get("text"), f"{where}.text"))
    return "".join(texts)


def _messages(value, param):
    if not isinstance(value, list):
        raise _type_error(param, "an array of messages", value)
    if not value:
        raise _invalid(param, f"'{param}' must hold at least one message")
    messages = []
    for i, m in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object", m)
        for key in m:
            if key not in MESSAGE_FIELDS:
                raise _invalid(f"{where}.{key}", f"unknown field '{where}.{key}'",
                               "unknown_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise _invalid(f"{where}.role", f"unknown role {json.dumps(role)} (minillm takes "
                           f"{', '.join(ROLES)})")
        if m.get("refusal") is not None:
            raise _invalid(f"{where}.refusal", "refusals are not supported", "unsupported_value")
        if m.get("name") is not None:
            _string(m["name"], f"{where}.name")
        messages.append({"role": ROLES[role], "content": _content(m.get("content"),
                                                                  f"{where}.content", role)})
    return messages


def _prompt(value, param):
    """A completion prompt: a string, or an array of exactly one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > 1:
            raise _invalid(param, "only one prompt per request is supported (n = 1)",
                           "unsupported_value")
        return value[0]
    raise _type_error(param, "a string (token id arrays are not supported)", value)


NO_PENALTY = "minillm has no frequency or presence penalty (its repeat_penalty is an extension)"
COMMON_FIELDS: dict[str, Callable] = {
    "model": _string,
    "max_tokens": _integer(1),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "seed": _integer(),
    "stop": _stop,
    "n": _only((1,), "minillm returns one choice per request"),
    "stream": _boolean,
    "stream_options": _stream_options,
    "frequency_penalty": _only((0, 0.0), NO_PENALTY),
    "presence_penalty": _only((0, 0.0), NO_PENALTY),
    "logit_bias": _empty("minillm has no logit bias"),
    "user": _string,
    # minillm's extensions, named as llama.cpp's server names them
    "top_k": _integer(0),
    "min_p": _number(0, 1),
    "repeat_penalty": _number(0, None, lo_open=True),
    "ignore_eos": _boolean,  # generate max_tokens whatever the model says (benchmarks)
}
CHAT_FIELDS = dict(COMMON_FIELDS, **{
    "messages": _messages,
    "max_completion_tokens": _integer(1),
    "logprobs": _only((False,), "minillm returns no log-probabilities"),
    "top_logprobs": _only((0,), "minillm returns no log-probabilities"),
    "response_format": _response_format,
    "tools": _empty("minillm serves no tools"),
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "store": _boolean,
    "metadata": _object,
})
COMPLETION_FIELDS = dict(COMMON_FIELDS, **{
    "prompt": _prompt,
    "echo": _only((False,), "the prompt is not repeated"),
    "suffix": _only((), "minillm does not insert text"),
    "best_of": _only((1,), "minillm returns one choice per request"),
    "logprobs": _only((0,), "minillm returns no log-probabilities"),
})


def _fields(body: dict, allowed: dict[str, Callable], required: str) -> dict:
    """The body's non-null fields, each checked; unknown fields refused."""
    for key in body:
        if key not in allowed:
            raise _invalid(key, f"unrecognized request argument supplied: {key}",
                           "unknown_parameter")
    if body.get(required) is None:
        raise _invalid(required, f"'{required}' is required", "missing_required_parameter")
    return {key: allowed[key](value, key) for key, value in body.items() if value is not None}


@dataclass(frozen=True)
class Generate:
    """A checked request: what to continue and how."""
    kind: str                     # "chat" or "completion"
    messages: list[dict] | None   # chat
    prompt: str | None            # completion
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_chat(body: dict, default_max_tokens: int) -> Generate:
    f = _fields(body, CHAT_FIELDS, "messages")
    max_tokens = f.get("max_completion_tokens", f.get("max_tokens", default_max_tokens))
    return _generate("chat", f, max_tokens, messages=f["messages"])


def parse_completion(body: dict) -> Generate:
    f = _fields(body, COMPLETION_FIELDS, "prompt")
    return _generate("completion", f, f.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS),
                     prompt=f["prompt"])


def _generate(kind: str, f: dict, max_tokens: int, messages=None, prompt=None) -> Generate:
    stream = f.get("stream", False)
    if "stream_options" in f and not stream:
        raise _invalid("stream_options", "'stream_options' is only allowed with 'stream': true")
    temperature, top_p = f.get("temperature", 1.0), f.get("top_p", 1.0)
    if top_p == 0:  # keep only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    seed = f.get("seed")
    params = SamplingParams(temperature=temperature, top_k=f.get("top_k", 0), top_p=top_p,
                            min_p=f.get("min_p", 0.0),
                            repeat_penalty=f.get("repeat_penalty", 1.0),
                            seed=None if seed is None else seed % 2**64, max_tokens=max_tokens)
    return Generate(kind, messages, prompt, params, f.get("stop", ()), stream,
                    bool(f.get("stream_options", {}).get("include_usage")),
                    f.get("ignore_eos", False))


# -- responses ---------------------------------------------------------------------------------

OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk", "chatcmpl-"),
           "completion": ("text_completion", "text_completion", "cmpl-")}


@dataclass(frozen=True)
class Reply:
    """The fields every response and chunk of one request share."""
    kind: str
    id: str
    created: int
    model: str
    fingerprint: str

    @classmethod
    def new(cls, kind: str, model: str, fingerprint: str) -> Reply:
        return cls(kind, OBJECTS[kind][2] + uuid.uuid4().hex[:24], int(time.time()), model,
                   fingerprint)

    def _head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": OBJECTS[self.kind][1 if chunk else 0],
                "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _choice(self, text: str | None, finish_reason: str | None, chunk: bool,
                role: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None,
                    "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish_reason}

    def response(self, text: str, finish_reason: str, prompt_tokens: int,
                 completion_tokens: int) -> dict:
        return dict(self._head(False), choices=[self._choice(text, finish_reason, False)],
                    usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict:
        return dict(self._head(True), choices=[self._choice(text, finish_reason, True, role)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return dict(self._head(True), choices=[], usage=usage(prompt_tokens, completion_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
