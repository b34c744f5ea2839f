"""`minillm passkey` (issue 11): the prompt is LM-Infinite's protocol, the records and the
summary, and the settings that share a prefix compute it once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_usage_error, invoke_cli

from minillm import passkey
from minillm.passkey import (
    FILLER,
    NEEDLE,
    PREFIX,
    QUESTION,
    SENTENCES,
    PasskeySettings,
    first_integer,
    prompt_text,
    run_passkey,
    run_trial,
    trial_prompt,
)

# the protocol's words, written out here as the issue states them
OFFICIAL_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                   "and memorize it. I will quiz you about the important information there.")
OFFICIAL_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There "
                   "and back again.")
OFFICIAL_SUFFIX = " What is the pass key? The pass key is "


def test_the_words_are_the_protocol_s():
    assert (PREFIX, FILLER, QUESTION) == (OFFICIAL_PREFIX, OFFICIAL_FILLER, OFFICIAL_SUFFIX)
    assert NEEDLE.format(key=42) == "The pass key is 42. Remember it. 42 is the pass key."
    assert " ".join(SENTENCES) == FILLER


def test_whole_fillers_give_the_official_text():
    """With whole fillers on both sides the prompt is the official code's: the task, the
    fillers and the needle joined by spaces, then the question."""
    text = prompt_text(1234567, 5 * 7, 5 * 3)
    needle = "The pass key is 1234567. Remember it. 1234567 is the pass key."
    assert text == " ".join([OFFICIAL_PREFIX] + [OFFICIAL_FILLER] * 3 + [needle]
                            + [OFFICIAL_FILLER] * 4) + OFFICIAL_SUFFIX


def test_the_needle_sits_at_a_sentence_boundary():
    text = prompt_text(77, 13, 8)
    body = text[len(OFFICIAL_PREFIX) + 1:-len(OFFICIAL_SUFFIX)]
    before, after = body.split(" The pass key is 77. Remember it. 77 is the pass key. ")
    cycle = SENTENCES * 3
    assert before == " ".join(cycle[:8]) and after == " ".join(cycle[8:13])


@pytest.mark.parametrize("length", [300, 450, 1000])
def test_prompt_length_and_depth(tiny_model, length):
    tok = tiny_model.tokenizer
    # the nearest length is within half a sentence (the tiny tokenizer knows few words: a
    # sentence is ~15 tokens, with SmolLM2's ~5: see the real-model test)
    longest = max(len(tok.encode(" " + s)) - tok.add_bos for s in SENTENCES)
    for depth in (0.0, 0.37, 1.0):
        p = trial_prompt(tok, length, seed=3, trial=1, depth=depth)
        assert abs(len(p.ids) - length) <= longest / 2 + 1
        assert p.boundary == round(depth * p.n_sentences)
        assert abs(p.depth - depth) <= 1 / p.n_sentences
        text = tok.decode(list(p.ids), skip_special=True)
        assert text.startswith(OFFICIAL_PREFIX + " ") and text.endswith(OFFICIAL_SUFFIX)
        assert text == prompt_text(p.key, p.n_sentences, p.boundary)
        assert 1 <= p.key <= 9_999_999


def test_keys_and_random_depths_are_seeded(tiny_model):
    tok = tiny_model.tokenizer
    a = [trial_prompt(tok, 400, seed=1, trial=t) for t in range(6)]
    b = [trial_prompt(tok, 400, seed=1, trial=t) for t in range(6)]
    c = [trial_prompt(tok, 400, seed=2, trial=t) for t in range(6)]
    assert [(p.key, p.boundary) for p in a] == [(p.key, p.boundary) for p in b]
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.boundary for p in a}) > 1


def test_answers_are_read_as_the_official_metric_does():
    assert first_integer("1234567. Remember") == 1234567
    assert first_integer(" 12 and 34") == 12
    assert first_integer("no digits") is None


def test_shared_settings_feed_the_prefix_once_and_answer_as_alone(tiny_model, monkeypatch,
                                                                  tmp_path):
    """The lminfinite settings together feed the prompt's first tokens once, and every logit
    of their answers is the one each setting computes alone (the rewind is exact)."""
    from minillm.session import Session

    calls = []
    original = Session.feed

    def recording_feed(self, ids, *args, **kw):
        logits = original(self, ids, *args, **kw)
        calls.append((len(ids), logits))
        return logits

    monkeypatch.setattr(Session, "feed", recording_feed)
    opts = PasskeySettings(n_local=32, top_k_middle=2, top_k_from_layer=1,
                           top_k_neighbours=3, middle_dir=str(tmp_path))
    prompt = trial_prompt(tiny_model.tokenizer, 400, seed=0, trial=0)
    settings = ["lminfinite", "lminfinite+topk", "lminfinite+neighbours"]
    together = list(run_trial(tiny_model, prompt, 400, 0, settings, opts))
    shared, calls[:] = list(calls), []
    n = len(prompt.ids)
    assert [f for f, _ in shared if f > 1] == [n - 1]  # the prefix, once
    alone, alone_logits, first_logits = [], [], []
    for setting in settings:
        alone += list(run_trial(tiny_model, prompt, 400, 0, [setting], opts))
        assert [f for f, _ in calls if f > 1] == [n - 1]
        answer_logits = [x for f, x in calls if f == 1]
        alone_logits += answer_logits
        first_logits.append(answer_logits[0])
        calls[:] = []
    assert [r["answer_ids"] for r in together] == [r["answer_ids"] for r in alone]
    shared_logits = [x for f, x in shared if f == 1]
    assert len(shared_logits) == len(alone_logits)
    for got, want in zip(shared_logits, alone_logits):
        np.testing.assert_array_equal(got, want)
    # top-k changed the first answer token's logits, and the neighbours changed them again
    assert not np.array_equal(first_logits[0], first_logits[1])
    assert not np.array_equal(first_logits[1], first_logits[2])
    assert [r["disk_bytes"] > 0 for r in together] == [False, True, True]
    assert together[0]["shared_seconds"] > 0


def test_json_records_and_summary(tiny_file, tmp_path):
    result = invoke_cli("passkey", tiny_file, "--lengths", "300,400", "--trials", "2",
                        "--n-local", "32", "--top-k-from-layer", "1", "--json",
                        "--middle-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 2 * 2 * len(passkey.DEFAULT_SETTINGS)
    for r in records:
        assert {"length", "depth", "setting", "key", "answer", "correct", "seconds",
                "peak_rss_mb", "disk_bytes"} <= set(r)
        assert isinstance(r["correct"], bool)
    assert {r["setting"] for r in records} == set(passkey.DEFAULT_SETTINGS)
    err = result.stderr.decode()
    assert "passkey accuracy" in err and "lminfinite+topk" in err
    assert len([line for line in err.splitlines() if line.strip().startswith(("300", "400"))]) \
        == 2


def test_depth_grid(tiny_file):
    result = invoke_cli("passkey", tiny_file, "--lengths", "300", "--depths", "0,0.5,1",
                        "--settings", "truncate", "--n-local", "32", "--json")
    assert result.returncode == 0, result.stderr
    depths = [json.loads(line)["depth"] for line in result.stdout.decode().splitlines()]
    assert depths[0] == 0 and depths[-1] == 1 and len(depths) == 3
    assert np.all(np.diff(depths) > 0)


def test_usage_errors(tiny_file):
    assert_usage_error(invoke_cli("passkey", tiny_file, "--settings", "lminfinite,best"),
                       "best")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--depths", "0.5,2"), "2")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--lengths", "4096,x"), "x")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--top-k-middle", "0"),
                       "lminfinite+topk")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--settings", "lminfinite+topk"),
                       "top_k_from_layer")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--settings", "lminfinite+neighbours"),
                       "--top-k-neighbours")
    assert_usage_error(invoke_cli("passkey", tiny_file, "--top-k-neighbours", "4"),
                       "lminfinite+neighbours")


def test_the_library_refuses_settings_its_options_cannot_run(tiny_model):
    for settings, opts in ((["lminfinite+neighbours"], PasskeySettings(top_k_neighbours=0)),
                           (["lminfinite+topk"], PasskeySettings(top_k_middle=0)),
                           (["lminfinite"], PasskeySettings(top_k_neighbours=3)),
                           (["best"], PasskeySettings())):
        with pytest.raises(ValueError):
            list(run_passkey(tiny_model, [300], 1, settings, opts=opts))


@pytest.mark.real_model
def test_smollm2_prompt_lengths(real_model):
    for length in (4096, 8192):
        p = trial_prompt(real_model.tokenizer, length, seed=0, trial=0)
        assert abs(len(p.ids) - length) <= 4
