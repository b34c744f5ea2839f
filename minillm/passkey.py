"""The passkey retrieval test as LM-Infinite's evaluation runs it.

A prompt is the task's prefix, then filler sentences with the needle (a random pass key,
1 to 9,999,999) at a sentence boundary, then the question; the words are LM-Infinite's own
(data/passkey_retrieval in the official code), joined by single spaces:

    PREFIX filler ... NEEDLE filler ... QUESTION

The official code repeats the filler as a whole (five sentences) and inserts the needle
between two repetitions; here the filler's sentences are cycled one at a time, so that a
prompt's length comes within a sentence (a few tokens) of the target and the needle can sit
at any sentence boundary. With a multiple of five sentences on each side the text is the
official one. Answers are greedy, at most ANSWER_TOKENS tokens; an answer is correct when
its first integer is the key (as the official metric reads it).

Settings: `truncate` (only the prompt's last n_local tokens, with a window of n_local),
`lminfinite`, `lminfinite+topk` (top-k middle attention), `lminfinite+neighbours` (top-k
with each chosen token's neighbours: not LM-Infinite's method, see minillm.middle) and `full`
(ordinary attention). The lminfinite settings share one session: the prompt but its last
token is fed once (the store records it; no top-k: it acts only on a feed call's last token),
the state that the rest overwrites is marked, one setting answers, the session is rewound to
the mark (bit-exact), and the next answers.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import MiniLLMError

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
             "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is "
ANSWER_TOKENS = 7
KEY_RANGE = (1, 9_999_999)
SETTINGS = ("truncate", "lminfinite", "lminfinite+topk", "lminfinite+neighbours", "full")
SHARED = ("lminfinite", "lminfinite+topk", "lminfinite+neighbours")
TOP_K = ("lminfinite+topk", "lminfinite+neighbours")
DEFAULT_SETTINGS = ("truncate", "lminfinite", "lminfinite+topk", "full")


def prompt_text(key: int, n_sentences: int, boundary: int) -> str:
    """The prompt with n_sentences filler sentences and the needle after the first `boundary`."""
    filler = [SENTENCES[i % len(SENTENCES)] for i in range(n_sentences)]
    return " ".join([PREFIX, *filler[:boundary], NEEDLE.format(key=key), *filler[boundary:]]) \
        + QUESTION


@dataclass(frozen=True)
class Prompt:
    ids: np.ndarray       # token ids (with BOS where the tokenizer adds one)
    key: int
    n_sentences: int      # filler sentences
    boundary: int         # filler sentences before the needle

    @property
    def depth(self) -> float:
        """Where the needle sits in the filler: 0 right after the prefix, 1 before the question."""
        return self.boundary / self.n_sentences if self.n_sentences else 0.0


def build_prompt(tokenizer, length: int, key: int, place: Callable[[int], int]) -> Prompt:
    """The prompt whose token count is nearest `length`; place(n) gives the needle's boundary
    (0..n) for n filler sentences."""
    def tokens(n: int) -> np.ndarray:
        return np.asarray(tokenizer.encode(prompt_text(key, n, place(n))), dtype=np.int64)

    base = len(tokens(0))
    if length < base:
        raise MiniLLMError(f"a passkey prompt takes at least {base} tokens (length {length} "
                           "asked for)")
    per_sentence = (len(tokens(50)) - base) / 50
    n = max(0, round((length - base) / per_sentence))
    ids = tokens(n)
    step = 1 if len(ids) < length else -1
    while n + step >= 0:  # token counts grow with n: walk towards the target
        nearer = tokens(n + step)
        if abs(len(nearer) - length) >= abs(len(ids) - length):
            break
        n, ids = n + step, nearer
    return Prompt(ids, key, n, place(n))


def trial_prompt(tokenizer, length: int, seed: int, trial: int,
                 depth: float | None = None, depth_index: int = 0) -> Prompt:
    """Trial `trial`'s prompt: its key (and, without a given depth, its boundary, uniform
    over all of them) drawn from a generator seeded by (seed, length, trial, depth)."""
    rng = np.random.default_rng([seed, length, trial, depth_index])
    key = int(rng.integers(KEY_RANGE[0], KEY_RANGE[1] + 1))
    u = rng.random()
    if depth is None:
        def place(n):
            return min(n, int(u * (n + 1)))
    else:
        def place(n):
            return int(round(depth * n))
    return build_prompt(tokenizer, length, key, place)


def first_integer(text: str) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


# --- memory figures of the process ------------------------------------------------------------

def reset_peak_rss() -> None:
    """Start the peak RSS (VmHWM) afresh (Linux; elsewhere the process's peak stays)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def process_memory() -> dict[str, int]:
    """peak_rss and rss_anon in bytes (from /proc/self/status; ru_maxrss elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "RssAnon"):
                    out["peak_rss" if name == "VmHWM" else "rss_anon"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    out.setdefault("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


# --- running the settings ---------------------------------------------------------------------

@dataclass(frozen=True)
class PasskeySettings:
    """Attention and top-k settings every trial uses."""
    n_global: int | None = None
    n_local: int | None = None
    top_k_middle: int = 5
    top_k_from_layer: int = 4
    top_k_insert_at: int | None = None
    top_k_neighbours: int = 0     # the lminfinite+neighbours setting's
    middle_dir: str | None = None
    chunk_size: int = 512


def greedy_answer(model, session, ids, chunk_size: int, top_k: bool) -> list[int]:
    """Feed ids, then decode greedily up to ANSWER_TOKENS tokens (an end-of-sequence id ends
    it); the last answer token is not fed."""
    logits = session.feed(ids, chunk_size=chunk_size, logits="last", top_k_middle=top_k)
    answer = []
    while True:
        token = int(np.argmax(logits))
        if token in model.eos_ids:
            break
        answer.append(token)
        if len(answer) == ANSWER_TOKENS:
            break
        logits = session.feed([token], logits="last", top_k_middle=top_k)
    return answer


def _record(model, prompt: Prompt, length: int, trial: int, setting: str, answer: list[int],
            seconds: float, shared_seconds: float = 0.0, disk_bytes: int = 0,
            pruned_share: float | None = None) -> dict:
    text = model.tokenizer.decode(answer, skip_special=True)
    predicted = first_integer(text)
    memory = process_memory()
    return {"length": length, "tokens": len(prompt.ids), "depth": round(prompt.depth, 4),
            "setting": setting, "trial": trial, "key": prompt.key, "answer": text,
            "answer_ids": [int(t) for t in answer],
            "predicted": predicted, "correct": predicted == prompt.key,
            "seconds": round(seconds, 3), "shared_seconds": round(shared_seconds, 3),
            "peak_rss_mb": round(memory["peak_rss"] / 2**20, 1),
            "rss_anon_mb": round(memory["rss_anon"] / 2**20, 1) if "rss_anon" in memory else None,
            "disk_bytes": disk_bytes, "pruned_share": pruned_share}


def _run_alone(model, prompt: Prompt, setting: str, opts: PasskeySettings) -> tuple[list, float]:
    from .session import AttentionWarning

    start = time.perf_counter()
    if setting == "truncate":
        session = model.session("window", n_local=opts.n_local)
        ids = prompt.ids[-session.spec.n_local:]
    else:
        with warnings.catch_warnings():  # the growing cache is what the baseline is about
            warnings.simplefilter("ignore", AttentionWarning)
            session = model.session("full")
        ids = prompt.ids
    answer = greedy_answer(model, session, ids, opts.chunk_size, top_k=False)
    return answer, time.perf_counter() - start


def _run_shared(model, prompt: Prompt, settings: list[str], opts: PasskeySettings):
    """The lminfinite settings over one fed prefix; yields (setting, answer, seconds, shared
    seconds, disk bytes, pruned share)."""
    k = opts.top_k_middle if set(TOP_K) & set(settings) else 0
    neighbours = opts.top_k_neighbours if "lminfinite+neighbours" in settings else 0
    start = time.perf_counter()
    with model.session("lminfinite", opts.n_global, opts.n_local, top_k_middle=k,
                       top_k_from_layer=opts.top_k_from_layer,
                       top_k_insert_at=opts.top_k_insert_at, top_k_neighbours=neighbours,
                       middle_dir=opts.middle_dir) as session:
        session.feed(prompt.ids[:-1], chunk_size=opts.chunk_size, logits="none",
                     top_k_middle=False)
        shared = time.perf_counter() - start
        mark = session.mark(ANSWER_TOKENS + 1) if len(settings) > 1 else None
        for i, setting in enumerate(settings):
            if i:
                session.rewind(mark)
            top_k = setting in TOP_K
            if session.middle is not None:  # the same store, with or without neighbours
                session.middle.configure(dataclasses.replace(
                    session.top_k, neighbours=neighbours * (setting == "lminfinite+neighbours")))
            stats = session.middle.store.stats if session.middle is not None else None
            before = (stats.blocks, stats.visited) if stats is not None else None
            start = time.perf_counter()
            answer = greedy_answer(model, session, prompt.ids[-1:], opts.chunk_size, top_k)
            seconds = time.perf_counter() - start
            pruned = None
            if top_k and stats.blocks > before[0]:
                pruned = round(1 - (stats.visited - before[1]) / (stats.blocks - before[0]), 4)
            disk = session.middle_bytes if top_k else 0
            yield setting, answer, seconds + shared, shared, disk, pruned


def run_trial(model, prompt: Prompt, length: int, trial: int, settings: list[str],
              opts: PasskeySettings) -> Iterator[dict]:
    """One record per setting, in the order of `settings` (the shared ones together)."""
    reset_peak_rss()
    shared = [s for s in settings if s in SHARED]
    for setting in settings:
        if setting in SHARED:
            if setting == shared[0]:
                for name, answer, seconds, prefix, disk, pruned in _run_shared(
                        model, prompt, shared, opts):
                    yield _record(model, prompt, length, trial, name, answer, seconds, prefix,
                                  disk, pruned)
            continue
        answer, seconds = _run_alone(model, prompt, setting, opts)
        yield _record(model, prompt, length, trial, setting, answer, seconds)


def check_settings(settings: list[str], opts: PasskeySettings) -> None:
    """ValueError for settings that the options cannot run, or options no setting uses."""
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r} (one of {', '.join(SETTINGS)})")
        if setting in TOP_K and not opts.top_k_middle:
            raise ValueError(f"the {setting} setting needs top_k_middle (--top-k-middle) 1 or "
                             "more")
    neighbours = "lminfinite+neighbours" in settings
    if neighbours and not opts.top_k_neighbours:
        raise ValueError("the lminfinite+neighbours setting needs top_k_neighbours "
                         "(--top-k-neighbours) 1 or more")
    if opts.top_k_neighbours and not neighbours:
        raise ValueError("top_k_neighbours (--top-k-neighbours) is for the "
                         "lminfinite+neighbours setting, which is not among the settings")


def run_passkey(model, lengths: list[int], trials: int, settings: list[str],
                depths: list[float] | None = None, seed: int = 0,
                opts: PasskeySettings = PasskeySettings()) -> Iterator[dict]:
    """Every record of the grid: lengths x (depths or random depths) x trials x settings."""
    check_settings(settings, opts)
    for length in lengths:
        for d, depth in enumerate(depths if depths is not None else [None]):
            for trial in range(trials):
                prompt = trial_prompt(model.tokenizer, length, seed, trial, depth, d)
                yield from run_trial(model, prompt, length, trial, settings, opts)


def summary(records: list[dict], settings: list[str]) -> str:
    """Accuracy per length and setting, as a table (correct/trials and percent)."""
    lengths = sorted({r["length"] for r in records})
    width = max(len(s) for s in settings) + 2
    lines = ["passkey accuracy (correct/trials)",
             "length".rjust(8) + "".join(s.rjust(max(width, 14)) for s in settings)]
    for length in lengths:
        cells = []
        for setting in settings:
            rs = [r for r in records if r["length"] == length and r["setting"] == setting]
            ok = sum(r["correct"] for r in rs)
            cell = f"{ok}/{len(rs)} ({100 * ok / len(rs):.0f}%)" if rs else "-"
            cells.append(cell.rjust(max(width, 14)))
        lines.append(str(length).rjust(8) + "".join(cells))
    return "\n".join(lines)
