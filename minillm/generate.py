"""Generation as a ladder of small steps over a session: prefill, then one token at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .sampling import SamplingParams, sample


def generate_ids(session, prompt_ids, params: SamplingParams, stop_ids=frozenset(),
                 rng=None, history=(), progress=None) -> Iterator[int]:
    """Yield new token ids; a stop id is yielded (so callers may keep it) but not fed.

    history: earlier ids the repeat penalty should also see (the conversation so far);
    progress(fed, total): called as the prompt is read, chunk by chunk (Session.feed).
    """
    rng = rng if rng is not None else params.rng()
    n_recent = params.repeat_last_n
    recent = deque((list(history) + list(prompt_ids))[-n_recent:] if n_recent else [],
                   maxlen=max(n_recent, 1))
    if params.max_tokens == 0:
        return
    logits = session.feed(prompt_ids, logits="last", progress=progress)
    for n in range(params.max_tokens):
        token = sample(logits, params, rng, recent if n_recent else ())
        yield token
        if token in stop_ids or n + 1 == params.max_tokens:
            return
        recent.append(token)
        logits = session.feed([token], logits="last")


def generate_text(model, session, prompt_ids, params: SamplingParams,
                  progress=None) -> Iterator[str]:
    """Stream decoded text pieces (UTF-8 safe), stopping at the model's end-of-sequence ids."""
    decoder = model.tokenizer.stream_decoder(skip_special=True)
    for token in generate_ids(session, prompt_ids, params, model.eos_ids, progress=progress):
        if token in model.eos_ids:
            break
        piece = decoder.add(token)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest
