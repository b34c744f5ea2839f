"""The library chat (minillm.chat): templates as transformers renders them, incremental feeding,
a conversation in constant memory, interruptions, the fallback format."""

from __future__ import annotations

import os
import random
import signal
import warnings

import numpy as np
import pytest
from helpers import BACKEND, TINY_TEMPLATE

import minillm
import minillm.model
from minillm.chat import FALLBACK_TEMPLATE, Chat, ChatTemplate, _encode, _StopText, end_of_turn_ids
from minillm.errors import MiniLLMError
from minillm.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's template (ChatML with a default system prompt), as stored in its file.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Multi-line with indentation: only right with trim_blocks and lstrip_blocks, as transformers sets.
BLOCKY_TEMPLATE = """{% for message in messages %}
    {% if message.role == 'system' %}
<<{{ message.content | tojson }}>>
    {% else %}
[{{ message.role | upper }}] {{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""
# TINY_TEMPLATE (helpers): a ChatML-like template of the tiny models' <s> and </s>.
# Rewrites history on every turn (the header counts the messages): the chat must re-feed all.
REWRITING_TEMPLATE = "{{ 'turns: ' ~ (messages | length) ~ '\n' }}" + TINY_TEMPLATE

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Answer in French.\nAlways."},
     {"role": "user", "content": "  What is 2+2?  "},
     {"role": "assistant", "content": "Quatre. "},
     {"role": "user", "content": "Und auf Deutsch? ünïcödé ✓ {{ not a template }}"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"},
     {"role": "user", "content": "five"}],
]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Tiny matrices on a shared 2-core machine: OpenBLAS threads only add contention."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def tokenizer_json():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what is the capital of france", "hello there"] * 10, trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    return Tokenizer.from_tokenizer_json(tokenizer_json, {"bos_token": "<s>", "eos_token": "</s>"})


def hf_render(tokenizer_json: str, template: str, messages) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer_json),
                                 bos_token="<s>", eos_token="</s>")
    hf.chat_template = template
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture
def fresh_tiny(tiny_dir):
    """A tiny model of our own (tests set its chat_template; the shared fixture stays intact)."""
    folder, _ = tiny_dir("gqa")
    return minillm.load(folder, backend=BACKEND)


def tiny_chat(model, template=TINY_TEMPLATE, **kw) -> Chat:
    model.chat_template = template
    kw = {"temperature": 0, "max_tokens": 6, **kw}
    return model.chat(**kw)


class FeedLog:
    """Wraps session.feed to record the ids of every call."""

    def __init__(self, session):
        self.calls, self._feed = [], session.feed
        session.feed = self

    def __call__(self, ids, **kw):
        self.calls.append([int(i) for i in ids])
        return self._feed(ids, **kw)


# -- templates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, LLAMA2_TEMPLATE,
                                      BLOCKY_TEMPLATE],
                         ids=["smollm2_chatml", "llama3", "llama2_inst", "blocky"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_template_renders_as_transformers(template, conversation, tokenizer, tokenizer_json):
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate(template, tokenizer).render(messages, add_generation_prompt=True)
    assert ours == hf_render(tokenizer_json, template, messages)


@pytest.mark.real_model
def test_real_model_template_renders_as_transformers(real_model, tokenizer_json):
    assert real_model.chat_template is not None
    for messages in CONVERSATIONS:
        ours = ChatTemplate(real_model.chat_template, real_model.tokenizer).render(messages)
        assert ours == hf_render(tokenizer_json, real_model.chat_template, messages)


def test_llama2_system_prompt_layout(tokenizer):
    text = ChatTemplate(LLAMA2_TEMPLATE, tokenizer).render(CONVERSATIONS[2][:3])
    assert text == ("<s>[INST] <<SYS>>\nAnswer in French.\nAlways.\n<</SYS>>\n\n  What is 2+2? "
                    "[/INST] Quatre. </s>")


def test_template_errors_are_one_line_errors(tokenizer):
    with pytest.raises(MiniLLMError, match="alternate"):
        ChatTemplate(LLAMA2_TEMPLATE, tokenizer).render(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(MiniLLMError, match="not valid Jinja"):
        ChatTemplate("{% for %}", tokenizer)


@pytest.mark.parametrize("evil", ["{{ messages.__class__.__mro__[1].__subclasses__() }}",
                                  "{{ messages.append(1) }}"])
def test_template_is_sandboxed(tokenizer, evil):
    with pytest.raises(MiniLLMError, match="unsafe"):
        ChatTemplate(evil, tokenizer).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template,token", [(SMOLLM2_TEMPLATE, "<|im_end|>"),
                                            (LLAMA3_TEMPLATE, "<|eot_id|>"),
                                            (LLAMA2_TEMPLATE, "</s>")])
def test_end_of_turn_token_found(template, token, tokenizer):
    found = end_of_turn_ids(ChatTemplate(template, tokenizer), tokenizer)
    assert found == {tokenizer.token_to_id(token)}


def test_no_end_of_turn_token_in_plain_format(tokenizer):
    assert end_of_turn_ids(ChatTemplate(FALLBACK_TEMPLATE, tokenizer), tokenizer) == frozenset()


# -- incremental feeding ----------------------------------------------------------------------

def test_only_the_new_turn_is_fed(fresh_tiny):
    chat = tiny_chat(fresh_tiny, system="be brief")
    log = FeedLog(chat.session)
    for turn, question in enumerate(["hello there", "what is the capital", "the lazy dog"]):
        before, fed_before = chat.session.position, chat._fed_text
        rendered = chat.render(chat.conversation() + [{"role": "user", "content": question}])
        assert rendered.startswith(fed_before)
        delta = _encode(chat.tokenizer, rendered[len(fed_before):])
        log.calls.clear()
        answer = "".join(chat.send(question))
        assert log.calls[0] == delta                          # the prompt: the delta only
        assert all(len(c) == 1 for c in log.calls[1:])         # then the answer, token by token
        assert chat.session.position - before == sum(map(len, log.calls))
        if turn:
            assert len(delta) < len(_encode(chat.tokenizer, rendered)) / 2
        assert chat.messages[-1] == {"role": "assistant", "content": answer}
        assert chat.messages[-2] == {"role": "user", "content": question}


def test_the_stop_token_starts_the_next_remainder(fresh_tiny):
    chat = tiny_chat(fresh_tiny)
    # make the model answer "hello" then </s> (its EOS) by steering greedy sampling
    hello = _encode(chat.tokenizer, "hello")
    script = iter(hello + [chat.tokenizer.eos_id])
    import minillm.generate as gen
    original = gen.sample
    gen.sample = lambda *a, **k: next(script)
    try:
        assert "".join(chat.send("hi")) == "hello"
    finally:
        gen.sample = original
    assert chat._fed_text.endswith("assistant\nhello")        # the stop token was not fed
    nxt = chat.render(chat.conversation() + [{"role": "user", "content": "again"}])
    assert nxt[len(chat._fed_text):].startswith("</s>\n<s>user\nagain")


def test_a_template_that_rewrites_history_refeeds_everything(fresh_tiny):
    chat = tiny_chat(fresh_tiny, template=REWRITING_TEMPLATE)
    log = FeedLog(chat.session)
    "".join(chat.send("hello there"))
    log.calls.clear()
    rendered = chat.render(chat.conversation() + [{"role": "user", "content": "and again"}])
    "".join(chat.send("and again"))
    assert log.calls[0] == _encode(chat.tokenizer, rendered)  # reset, then the whole render
    assert chat.session.position == sum(map(len, log.calls))
    assert chat._fed_text.startswith(rendered)


def test_incremental_answer_equals_a_fresh_session(fresh_tiny):
    """The cache after a turn holds exactly the fed ids: a fresh session fed the same ids at once
    gives the same greedy answer to the second question."""
    chat = tiny_chat(fresh_tiny, max_tokens=5)
    log = FeedLog(chat.session)
    "".join(chat.send("hello there"))
    n_calls = len(log.calls)
    second = "".join(chat.send("the lazy dog"))
    context = [i for call in log.calls[:n_calls + 1] for i in call]  # up to the second prompt
    replay = fresh_tiny.session()
    logits = replay.feed(context, logits="last")
    decoder = fresh_tiny.tokenizer.stream_decoder(skip_special=True)
    text = ""
    for _ in range(5):
        token = int(np.argmax(logits))
        if token in chat.stop_ids:
            break
        text += decoder.add(token)
        logits = replay.feed([token], logits="last")
    assert text + decoder.flush() == second


# -- constant memory, long inputs -------------------------------------------------------------

def test_long_conversation_in_constant_memory(fresh_tiny):
    n_local = 32
    chat = tiny_chat(fresh_tiny, n_local=n_local, n_global=4, max_tokens=8)
    resets = []
    reset = chat.session.reset
    chat.session.reset = lambda: (resets.append(1), reset())[1]
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "hello",
             "world"]
    sizes, answers = [], []
    while chat.session.position <= 4 * n_local:
        question = " ".join(rng.choice(words) for _ in range(12))
        answers.append("".join(chat.send(question)))
        sizes.append(chat.session.nbytes)
        assert chat.stats["generated_tokens"] > 0
    assert chat.session.position > 3 * n_local
    assert len(set(sizes)) == 1                       # the cache never grew
    assert not resets                                 # and was never rebuilt
    assert sum(bool(a) for a in answers) >= len(answers) // 2
    assert len(chat.messages) == 2 * len(answers)
    stats = chat.stats
    assert stats["tokens"] == chat.session.position
    assert stats["cache_fill"] == 1.0 and stats["cache_capacity"] == 36


def test_a_100kb_message_streams_through_the_ring(fresh_tiny):
    chat = tiny_chat(fresh_tiny, n_local=64, max_tokens=4)
    rng = random.Random(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "1234",
             "ünïcödé", "hello"]
    text = " ".join(rng.choice(words) for _ in range(20000))[:100_000]
    "".join(chat.send("hi"))
    nbytes = chat.session.nbytes
    answer = "".join(chat.send(text))
    assert chat.session.position > 10 * 64
    assert chat.session.nbytes == nbytes
    assert chat.messages[2:] == [{"role": "user", "content": text},
                                 {"role": "assistant", "content": answer}]
    assert chat.stats["generated_tokens"] == 4
    "".join(chat.send("and now?"))  # the conversation goes on
    assert len(chat.messages) == 6


# -- interruptions ----------------------------------------------------------------------------

def test_closing_the_stream_keeps_the_partial_answer(fresh_tiny):
    chat = tiny_chat(fresh_tiny, max_tokens=40)
    stream = chat.send("tell me a story")
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    position = chat.session.position
    log = FeedLog(chat.session)
    "".join(chat.send("go on"))
    assert chat.session.position > position and log.calls  # no rebuild: continued in place
    rendered = chat.render(chat.conversation()[:-1])
    assert chat._fed_text.startswith(rendered)


def test_a_new_send_closes_an_unfinished_one(fresh_tiny):
    chat = tiny_chat(fresh_tiny, max_tokens=40)
    stream = chat.send("tell me a story")
    first = next(stream)
    "".join(chat.send("stop"))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first


def test_keyboard_interrupt_during_generation_keeps_the_partial_answer(fresh_tiny):
    chat = tiny_chat(fresh_tiny, max_tokens=40)
    feed = chat.session.feed
    calls = []

    def interrupting(ids, **kw):
        calls.append(len(ids))
        if len(calls) == 5:  # the prompt, then three answer tokens, then Ctrl-C
            raise KeyboardInterrupt
        return feed(ids, **kw)

    chat.session.feed = interrupting
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in chat.send("tell me a story"):
            pieces.append(piece)
    chat.session.feed = feed
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    position = chat.session.position
    "".join(chat.send("go on"))
    assert chat.session.position > position  # continued in place


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt (Python's default) during the test, even in a pytest
    started with SIGINT ignored (a background job of a non-interactive shell), where Python
    installs no handler and the session's deferral would re-deliver the signal to SIG_IGN."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_chunk_abandons_the_chunk(fresh_tiny, monkeypatch, sigint_raises):
    """A real SIGINT landing inside a chunk of a long prompt stops it before its next layer and
    none of it reaches the cache: the session stays at the chunk boundary before it, whole, and
    the conversation goes on from the ids that got in (they equal a fresh session fed the same
    ids)."""
    chat = tiny_chat(fresh_tiny, n_local=32, max_tokens=3)
    block = minillm.model.block
    chunks = []  # the length of every chunk begun

    def interrupted(x, lw, layer, chunk):
        if layer == 0:
            chunks.append(len(x))
        out = block(x, lw, layer, chunk)
        if len(chunks) == 2 and layer == 0:  # Ctrl-C in the first layer of the second chunk
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(minillm.model, "block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        "".join(chat.send("hello world " * 400))
    monkeypatch.setattr(minillm.model, "block", block)
    assert len(chunks) == 2 and chat.session.position == chunks[0]
    assert chat.messages[-1] == {"role": "assistant", "content": ""}
    fed = chat._recent  # every id that entered the session (repeat-penalty history)
    assert len(fed) == min(chat.session.position, fed.maxlen)
    replay = fresh_tiny.session(n_local=32)
    prompt = _encode(chat.tokenizer, chat.render(chat.conversation()[:-2] + [
        {"role": "user", "content": "hello world " * 400}]))
    np.testing.assert_allclose(chat.session.feed([7], logits="last"),
                               replay.feed(prompt[:chunks[0]] + [7], logits="last"), atol=1e-5)


# -- sampling, reset, fallback ----------------------------------------------------------------

def test_same_seed_same_answer(fresh_tiny):
    def answers(seed):
        chat = tiny_chat(fresh_tiny, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                         max_tokens=12)
        return ["".join(chat.send(q)) for q in ("hello", "the lazy dog")]

    assert answers(7) == answers(7)
    assert answers(7) != answers(8)


def test_sampling_options_reach_the_chat(fresh_tiny):
    chat = tiny_chat(fresh_tiny, top_k=3, repeat_penalty=1.3, max_tokens=2)
    assert chat.params.top_k == 3 and chat.params.repeat_penalty == 1.3
    with pytest.raises(ValueError):
        tiny_chat(fresh_tiny, temperature=-1)


def test_reset_clears_messages_and_cache(fresh_tiny):
    chat = tiny_chat(fresh_tiny, system="sys")
    "".join(chat.send("hello"))
    chat.reset()
    assert chat.messages == [] and chat.session.position == 0 and chat._fed_text == ""
    assert chat.conversation() == [{"role": "system", "content": "sys"}]
    log = FeedLog(chat.session)
    "".join(chat.send("hello"))
    assert log.calls[0] == _encode(chat.tokenizer, chat.render(
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]))


def test_max_tokens_zero_records_an_empty_answer(fresh_tiny):
    chat = tiny_chat(fresh_tiny, max_tokens=0)
    assert list(chat.send("hello")) == []
    assert chat.messages[-1] == {"role": "assistant", "content": ""}
    assert chat.session.position == 0


def test_fallback_format_warns(fresh_tiny):
    fresh_tiny.chat_template = None
    with pytest.warns(UserWarning, match="no chat template") as record:
        chat = fresh_tiny.chat(system="Be nice.", temperature=0, max_tokens=4)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert chat.render(chat.conversation() + [{"role": "user", "content": "hi"}]) == \
        "Be nice.\n\nUser: hi\nAssistant: "
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer = "".join(chat.send("hi"))
    assert chat.messages[-1]["content"] == answer
    assert chat.render() == f"Be nice.\n\nUser: hi\nAssistant: {answer}\nAssistant: "


def test_stop_text_cuts_the_answer_and_holds_back_prefixes():
    s = _StopText(["\nUser:"])
    assert s.add("Hello") == "Hello"
    assert s.add(" there\nUs") == " there"     # "\nUs" might start the stop text
    assert s.add("er: more") == "" and s.stopped
    s = _StopText(["\nUser:"])
    assert s.add("a\n") == "a" and s.add("b") == "\nb" and not s.stopped
    assert s.add("\nU") == "" and s.flush() == "\nU"
    assert _StopText([]).add("anything\nUser:") == "anything\nUser:"
