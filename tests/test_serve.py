"""`minillm serve` driven by the official `openai` client: chat and completions, streaming,
stop sequences, seeds, usage, a conversation many times the window, batching that changes no
answer, and every kind of trouble (bad requests, disconnects, a full queue, keys, signals)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from helpers import (
    assert_one_line_error,
    assert_usage_error,
    cli_env,
    default_sigint,
    invoke_cli,
    minillm_command,
)

import minillm
from minillm.chat import ChatTemplate

KEY = "test-key"
START_TIMEOUT = 60  # seconds for a server to load its model and listen
TIMEOUT = 30        # seconds for any one request


class Server:
    """`minillm serve MODEL --port 0 ARGS` in a subprocess; its address read from stderr."""

    def __init__(self, model, *args):
        self.proc = subprocess.Popen(
            minillm_command() + ["serve", str(model), "--port", "0", *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cli_env(), preexec_fn=default_sigint)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or self.url is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _read_stderr(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if found and self.url is None:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # ended: whoever waits stops waiting

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                             timeout=TIMEOUT)

    def get(self, path, key=KEY):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + path, headers=headers, timeout=TIMEOUT)

    def post(self, path, content: bytes, key=KEY):
        return httpx.post(self.url + path, content=content, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {key}",
                                   "Content-Type": "application/json"})

    def slots(self) -> list[dict]:
        return self.get("/slots").json()["slots"]

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(TIMEOUT)


@pytest.fixture(scope="module")
def tiny(tiny_chat_file):
    """The tiny chat model behind a key, with a window of 4 + 32 tokens and a 1 MB body limit."""
    server = Server(tiny_chat_file, "--parallel", 4, "--queue", 8, "--n-global", 4,
                    "--n-local", 32, "--api-key", KEY, "--max-body-mb", 1)
    yield server
    assert server.stop() == 143
    assert "Traceback" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def tiny_local(tiny_chat_file):
    """The tokenizer and template the tiny server uses, to count tokens independently."""
    model = minillm.load(tiny_chat_file, backend="numpy")
    return model.tokenizer, ChatTemplate(model.chat_template, model.tokenizer)


def chat_ids(tiny_local, messages) -> list[int]:
    tok, template = tiny_local
    ids = tok.encode(template.render(messages), special=True)
    return ids[1:] if tok.add_bos else ids


def user(text):
    return [{"role": "user", "content": text}]


def stream_text(stream, kind="chat"):
    """(the text, the finish reason, the usage) of a streamed answer."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append((choice.delta.content if kind == "chat" else choice.text) or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


# -- answers -----------------------------------------------------------------------------------

def test_models_and_health(tiny):
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == ["tiny_chat"]
    assert tiny.client().models.retrieve("tiny_chat").id == "tiny_chat"
    with pytest.raises(openai.NotFoundError):
        tiny.client().models.retrieve("gpt-5")
    health = tiny.get("/health", key=None)  # public, as load balancers ask it
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_streamed_and_not_agree_with_usage(tiny, tiny_local):
    messages = user("the lazy dog, once")
    client = tiny.client()
    whole = client.chat.completions.create(model="tiny_chat", messages=messages,
                                           temperature=0, max_tokens=12)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    n_prompt = len(chat_ids(tiny_local, messages))
    assert whole.usage.prompt_tokens == n_prompt  # a new conversation: all of it is read
    assert 0 < whole.usage.completion_tokens <= 12
    assert (choice.finish_reason == "length") == (whole.usage.completion_tokens == 12)
    assert whole.usage.total_tokens == n_prompt + whole.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny_chat", messages=messages, temperature=0,
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage = stream_text(stream)
    assert (text, finish) == (choice.message.content, choice.finish_reason)
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens <= n_prompt  # its slot may already hold the prompt's start


def test_completions_streamed_and_not(tiny, tiny_local):
    tok, _ = tiny_local
    prompt = "hello world, the quick brown"
    client = tiny.client()
    whole = client.completions.create(model="tiny_chat", prompt=prompt, temperature=0,
                                      max_tokens=10)
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(tok.encode(prompt, special=True))
    stream = client.completions.create(model="tiny_chat", prompt=[prompt], temperature=0,
                                       max_tokens=10, stream=True)
    text, finish, usage = stream_text(stream, "completion")
    assert usage is None  # not asked for
    assert (text, finish) == (whole.choices[0].text, whole.choices[0].finish_reason)
    default = client.completions.create(model="tiny_chat", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens


def test_stop_sequences_cut_the_answer(tiny):
    client = tiny.client()
    messages = user("quick brown fox")
    full = client.chat.completions.create(model="tiny_chat", messages=messages, temperature=0,
                                          max_tokens=24).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:6]
    expected = full[:full.index(stop)]
    cut = client.chat.completions.create(model="tiny_chat", messages=messages, temperature=0,
                                         max_tokens=24, stop=[stop, "never there"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    text, finish, _ = stream_text(client.chat.completions.create(
        model="tiny_chat", messages=messages, temperature=0, max_tokens=24, stop=stop,
        stream=True))
    assert (text, finish) == (expected, "stop")


def test_seeds_reproduce(tiny):
    client = tiny.client()

    def answer(seed):
        return client.chat.completions.create(
            model="tiny_chat", messages=user("jumps over"), temperature=1.5, max_tokens=16,
            seed=seed).choices[0].message.content

    first = answer(42)
    assert answer(42) == first
    assert any(answer(seed) != first for seed in (43, 44, 45))


def test_forty_turns_many_windows_long_each_feeding_only_its_new_tokens(tiny, tiny_local):
    """The cache stays the same size, the slot is never started again, and each turn reads
    only what is new (usage.prompt_tokens is what the slot's position grew by)."""
    tok, template = tiny_local
    client = tiny.client()
    window = 4 + 32
    messages = [{"role": "system", "content": "forty turns"}]
    before = {s["slot"]: s for s in tiny.slots()}
    cache_bytes = {s["cache_bytes"] for s in before.values()}
    slot_id, seen, cut = None, None, False  # the slot; the text it holds; answer cut short
    for turn in range(40):
        messages.append({"role": "user", "content": f"turn {turn}: the quick brown fox"})
        r = client.chat.completions.create(model="tiny_chat", messages=messages, temperature=0,
                                           max_tokens=6)
        answer, finish = r.choices[0].message.content, r.choices[0].finish_reason
        after = {s["slot"]: s for s in tiny.slots()}
        changed = [i for i in after if after[i]["position"] != before[i]["position"]
                   or after[i]["fresh_starts"] != before[i]["fresh_starts"]]
        assert len(changed) == 1, (before, after)
        if slot_id is None:
            slot_id = changed[0]
        else:  # the same slot, continued: not started again
            assert changed == [slot_id]
            assert after[slot_id]["fresh_starts"] == before[slot_id]["fresh_starts"]
            rendered = template.render(messages)
            assert rendered.startswith(seen)
            new = tok.encode(rendered[len(seen):], special=True)
            new = new[1:] if tok.add_bos else new
            # what is new, and the last answer's final token when max_tokens cut it (sampled
            # and sent, fed only now)
            assert r.usage.prompt_tokens == len(new) + cut, turn
        cut = finish == "length"
        fed_answer = r.usage.completion_tokens - cut
        grew = after[slot_id]["position"] - (before[slot_id]["position"] if turn else 0)
        assert grew == r.usage.prompt_tokens + fed_answer
        assert {s["cache_bytes"] for s in after.values()} == cache_bytes
        seen = template.render(messages) + answer
        messages.append({"role": "assistant", "content": answer})
        before = after
    assert after[slot_id]["position"] > 5 * window


def test_concurrent_greedy_answers_equal_one_at_a_time(tiny):
    client = tiny.client()
    requests = [user(f"request {i}: hello minillm " * (1 + i % 3)) for i in range(7)]

    def ask(messages):
        r = client.chat.completions.create(model="tiny_chat", messages=messages, temperature=0,
                                           max_tokens=10)
        return r.choices[0].message.content, r.choices[0].finish_reason

    one_at_a_time = [ask(m) for m in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # more than the 4 slots: some wait
        together = list(pool.map(ask, requests))
    assert together == one_at_a_time


# -- trouble -----------------------------------------------------------------------------------

def error_of(response) -> dict:
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_requests_get_openai_errors(tiny):
    post = tiny.post
    err = error_of(r := post("/v1/chat/completions", b'{"messages": [}'))
    assert r.status_code == 400 and err["code"] == "invalid_json"
    assert post("/v1/chat/completions", b"[1, 2]").status_code == 400
    assert post("/v1/completions", b'{"prompt": "a", "temperature": NaN}').status_code == 400
    assert post("/v1/completions", "{\"prompt\": \"\xff\"}".encode("latin-1")).status_code == 400
    cases = [  # (body, the param named)
        ({"messages": user("hi"), "temperature": "hot"}, "temperature"),
        ({"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
        ({"messages": user("hi"), "max_tokens": True}, "max_tokens"),
        ({"messages": user("hi"), "n": 2}, "n"),
        ({"messages": user("hi"), "top_p": 1.5}, "top_p"),
        ({"messages": user("hi"), "stop": ["a", 3]}, "stop"),
        ({"messages": user("hi"), "logprobs": True}, "logprobs"),
        ({"messages": user("hi"), "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": user("hi"), "frobnicate": 1}, "frobnicate"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
        ({}, "messages"),
    ]
    for body, param in cases:
        r = post("/v1/chat/completions", json.dumps(body).encode())
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["param"] == param, (body, r.text)
    for body, param in [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"),
                        ({"prompt": "a", "echo": True}, "echo"), ({"prompt": ""}, "prompt")]:
        r = post("/v1/completions", json.dumps(body).encode())
        assert r.status_code == 400 and error_of(r)["param"] == param, (body, r.text)
    with pytest.raises(openai.BadRequestError) as caught:  # as the client reports it
        tiny.client().chat.completions.create(model="x", messages=user("hi"), temperature=3)
    assert caught.value.body["param"] == "temperature"


def test_unknown_paths_and_methods(tiny):
    r = tiny.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = tiny.get("/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_a_body_over_the_limit_is_refused(tiny):
    big = "x" * (1 << 20)
    with pytest.raises(openai.APIStatusError) as caught:
        tiny.client().chat.completions.create(model="x", messages=user(big))
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    r = tiny.post("/v1/completions", b"{" + b" " * (5 << 20) + b"}")  # past the read-on too
    assert r.status_code == 413


def test_api_key(tiny):
    with pytest.raises(openai.AuthenticationError):
        tiny.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        tiny.client(key="wrong").chat.completions.create(model="x", messages=user("hi"))
    r = tiny.get("/v1/models", key=None)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"


def test_bad_requests_do_not_disturb_an_answer_in_progress(tiny):
    client = tiny.client()
    messages = user("an answer beside trouble")
    expected = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                              max_tokens=40).choices[0].message.content
    stream = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                            max_tokens=40, stream=True)
    pieces = [next(iter(stream)).choices[0].delta.content or ""]
    for bad in (b"{", b'{"messages": 1}', b"{" + b" " * (2 << 20) + b"}"):
        assert tiny.post("/v1/chat/completions", bad).status_code in (400, 413)
    text, _, _ = stream_text(stream)
    assert "".join(pieces) + text == expected


@pytest.fixture
def one_slot(tiny_chat_file):
    """One slot and a queue of one: the second waits, the third gets 503."""
    server = Server(tiny_chat_file, "--parallel", 1, "--queue", 1)
    yield server
    server.stop()


def test_disconnect_frees_the_slot_and_a_full_queue_gets_503(one_slot):
    client = one_slot.client()
    endless = client.chat.completions.create(model="x", messages=user("hello"), temperature=0,
                                             max_tokens=1_000_000, stream=True,
                                             extra_body={"ignore_eos": True})
    chunks = iter(endless)
    next(chunks), next(chunks)  # it is in the slot and generating
    waiting = client.chat.completions.create(model="x", messages=user("second"),
                                             temperature=0, max_tokens=3, stream=True)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="x", messages=user("third"), max_tokens=3)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "server_busy"
    endless.close()  # the client goes away: its slot is free for the one waiting
    text, finish, _ = stream_text(waiting)  # a million tokens would take far past the timeout
    assert finish in ("stop", "length")
    assert one_slot.get("/health").json() == {"status": "ok", "slots_idle": 1, "slots_busy": 0,
                                              "queued": 0}


def test_sigterm_drains_the_answers_in_progress(tiny_chat_file):
    server = Server(tiny_chat_file)
    client = server.client()
    messages, endless = user("drain me"), {"ignore_eos": True}
    expected = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                              max_tokens=300, extra_body=endless)
    stream = client.chat.completions.create(model="x", messages=messages, temperature=0,
                                            max_tokens=300, stream=True, extra_body=endless)
    chunks = iter(stream)
    first = next(chunks).choices[0].delta.content
    server.proc.send_signal(signal.SIGTERM)
    text, finish, _ = stream_text(chunks)
    assert first + text == expected.choices[0].message.content
    assert finish == "length"
    assert server.proc.wait(TIMEOUT) == 143
    assert "Traceback" not in server.stderr and "SIGTERM" in server.stderr, server.stderr


def test_sigint_ends_what_outlasts_the_drain(tiny_chat_file):
    server = Server(tiny_chat_file, "--drain-timeout", 0.2)
    stream = server.client().chat.completions.create(model="x", messages=user("hello"),
                                                     temperature=0, max_tokens=1_000_000,
                                                     stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    server.proc.send_signal(signal.SIGINT)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in chunks:
            pass
    assert server.proc.wait(TIMEOUT) == 130
    assert "Traceback" not in server.stderr, server.stderr


def test_options_out_of_range_are_usage_errors(tiny_chat_file):
    assert_usage_error(invoke_cli("serve", tiny_chat_file, "--port", 70000), "--port")
    assert_usage_error(invoke_cli("serve", tiny_chat_file, "--parallel", 0), "--parallel")
    assert_usage_error(invoke_cli("serve", tiny_chat_file, "--drain-timeout", "nan"))
    assert_usage_error(invoke_cli("serve", tiny_chat_file, "--port", 0, "--n-global", 50,
                                  "--n-local", 8), "n_global")


def test_without_the_http_stack_one_line_says_what_to_install(monkeypatch, tiny_chat_file):
    import minillm.server
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "minillm.server.runner", raising=False)
    monkeypatch.delattr(minillm.server, "runner", raising=False)
    assert_one_line_error(invoke_cli("serve", tiny_chat_file), "uvicorn",
                          "pip install 'minillm[serve]'")


def test_a_taken_port_is_one_line(tiny, tiny_chat_file):
    port = tiny.url.rsplit(":", 1)[1]
    r = subprocess.run(minillm_command() + ["serve", str(tiny_chat_file), "--port", port],
                       capture_output=True, env=cli_env(), timeout=TIMEOUT)
    assert r.returncode == 1 and "cannot listen" in r.stderr.decode()
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr


def run_job(engine, ids, params):
    """Submit ids to an in-process engine; (its events, an Event set at its last)."""
    from minillm.server.engine import Done, Failed, Prompt

    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, (Done, Failed)):
            done.set()
    job = engine.submit(Prompt("", np.asarray(ids), lambda text: []), params, frozenset(), (),
                        emit)
    return job, events, done


def test_slot_choice_keeps_conversations(tiny_model):
    """In-process: a new conversation takes an empty slot even when it shares a prefix (a
    system prompt) with one in use; a conversation's next turn feeds only its new ids; the
    same prompt asked again starts its own slot afresh and leaves the other alone."""
    from minillm.sampling import SamplingParams
    from minillm.server.engine import Engine

    engine = Engine(tiny_model, 2, 0, dict(n_global=4, n_local=64))
    engine.start()
    params = SamplingParams(temperature=0, max_tokens=5)  # no stop ids: always 5 tokens

    def ask(ids):
        _, events, done = run_job(engine, ids, params)
        assert done.wait(TIMEOUT)
        return events[-1].prompt_tokens

    def slots():
        return [(s["position"], s["fresh_starts"]) for s in engine.status()["slots"]]

    system = [3, 4, 5, 6]
    a = system + list(range(20, 36))
    assert ask(a) == len(a)
    (a_slot,) = [i for i, s in enumerate(engine.slots) if len(s.log)]
    b_slot = 1 - a_slot
    b = system + list(range(40, 50))
    assert ask(b) == len(b)
    assert len(engine.slots[b_slot].log)  # b took the empty slot, a's stays
    log = engine.slots[a_slot].log  # a, its answer, the answer's last token held
    held, a_next = log.held, [int(i) for i in log.ids] + [60, 61]
    before = slots()
    assert ask(a_next) == held + 2
    after = slots()
    assert after[a_slot][1] == before[a_slot][1] and after[b_slot] == before[b_slot]
    assert ask(a) == len(a)  # asked again: a's slot starts afresh, b's is left alone
    again = slots()
    assert again[a_slot][1] == after[a_slot][1] + 1 and again[b_slot] == after[b_slot]
    engine.close()
    engine.join(TIMEOUT)


def test_one_failing_job_does_not_disturb_the_others(tiny_model):
    """In-process: a job whose sampling breaks fails alone; its neighbour in the batch answers
    as it does alone, and the broken job's slot serves again."""
    from minillm.sampling import SamplingParams
    from minillm.server.engine import Done, Engine, Failed

    engine = Engine(tiny_model, 2, 0, dict(n_global=4, n_local=16))
    engine.start()
    greedy = SamplingParams(temperature=0, max_tokens=30)
    _, alone, done = run_job(engine, [5, 6, 7, 8], greedy)
    assert done.wait(TIMEOUT)

    class NoRandomness(SamplingParams):
        def rng(self):
            return None  # sampling at a temperature raises AttributeError

    _, ok, ok_done = run_job(engine, [5, 6, 7, 8], greedy)
    _, bad, bad_done = run_job(engine, [9, 10], NoRandomness(max_tokens=30))
    assert ok_done.wait(TIMEOUT) and bad_done.wait(TIMEOUT)
    assert isinstance(bad[-1], Failed) and "AttributeError" in bad[-1].message
    assert ok == alone
    _, again, done = run_job(engine, [9, 10, 11], greedy)
    assert done.wait(TIMEOUT) and isinstance(again[-1], Done)
    engine.close()
    engine.join(TIMEOUT)


# -- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(real_model_path):
    server = Server(real_model_path, "--parallel", 3, "--api-key", KEY)
    yield server
    assert server.stop() == 143


@pytest.mark.real_model
def test_real_model_chat_end_to_end(smollm2):
    client = smollm2.client()
    messages = user("What is the capital of France?")
    r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                       max_tokens=24)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    text, finish, usage = stream_text(client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    assert (text, finish) == (answer, r.choices[0].finish_reason)
    assert usage.completion_tokens == r.usage.completion_tokens
    # the conversation goes on in its slot: the next turn reads only its own tokens
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "And of Italy?"}]
    follow = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                            max_tokens=16)
    assert follow.usage.prompt_tokens < 20 < r.usage.prompt_tokens
    assert "Rome" in follow.choices[0].message.content


@pytest.mark.real_model
def test_real_model_batched_greedy_equals_one_at_a_time(smollm2):
    client = smollm2.client()
    questions = ["Name a colour.", "Count to three.", "What is 2 + 2?"]

    def ask(q):
        return client.chat.completions.create(model="smollm2", messages=user(q),
                                              temperature=0,
                                              max_tokens=12).choices[0].message.content

    one_at_a_time = [ask(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(ask, questions)) == one_at_a_time
    assert np.all([len(a) > 0 for a in one_at_a_time])
