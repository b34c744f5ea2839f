"""The slot scheduler of `minillm serve`: conversations kept in slots and decoded together.

Threads: the HTTP event loop only submits jobs, cancels them and reads their events; one worker
thread owns the model and every slot, so no slot is ever touched by two threads. The worker
loops over steps: each step is one forward pass (minillm.batch) over the newest token of every
slot that is generating, plus up to PROMPT_PIECE ids of the prompts being read, so a long
prompt advances piece by piece between decode steps instead of freezing the other streams.

Slots: each holds one LM-Infinite session (its cache never overflows) and the ids in it. A job
whose prompt extends the ids in an idle slot (the usual chat: earlier messages, the last answer,
a new message) feeds only the new ids; when the ids differ but the rendered text extends the
text the slot holds (an answer whose re-tokenization differs from the ids generated), the new
text is encoded and fed after it, as minillm.chat does. Anything else starts a slot afresh.

Jobs beyond the slots wait in a bounded queue (FIFO); beyond it `submit` raises Busy. A job's
events go to the callback it was submitted with, called on the worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..backend import to_host
from ..batch import Batch
from ..chat import _StopText
from ..model import lm_head
from ..sampling import SamplingParams, sample

PROMPT_PIECE = 256  # prompt ids read per step, over all slots: a bound on a step's time
log = logging.getLogger("minillm.server")


class Busy(Exception):
    """Every slot is busy and the queue is full."""


class Closed(Exception):
    """The engine is shutting down and takes no new jobs."""


@dataclass(frozen=True)
class Prompt:
    """What a job asks the model to continue: the rendered text, its ids as a fresh slot reads
    them, and how to encode text that follows other text (no BOS)."""
    text: str
    ids: np.ndarray
    encode_more: Callable[[str], list[int]]


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (an end-of-turn id or a stop string) or "length"
    prompt_tokens: int  # prompt ids the model read for this job (not those already in the slot)
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500  # as an HTTP status: 503 for a job cancelled by the shutdown


Event = Piece | Done | Failed


class Job:
    """One request's generation: its settings, progress and where its events go."""

    def __init__(self, engine: Engine, prompt: Prompt, params: SamplingParams,
                 stop_ids: frozenset[int], stop_texts: Sequence[str],
                 emit: Callable[[Event], None]):
        self._engine, self.prompt, self.params = engine, prompt, params
        self.stop_ids, self.emit = stop_ids, emit
        self.cancelled, self.cancel_message = False, None
        self.seq = 0  # its place in the order of admission
        self.rng = params.rng()
        self.decoder = engine.model.tokenizer.stream_decoder(skip_special=True)
        self.stop_text = _StopText(stop_texts)
        self.to_feed = np.zeros(0, dtype=np.int64)  # the prompt ids this job feeds
        self.fed = 0                 # of them, fed so far
        self.context: list[int] = []  # the last prompt id: decoding context of the answer
        self.next_token: int | None = None  # sampled, to be fed by the next step
        self.answer_fed: list[int] = []
        self.completion_tokens = 0

    @property
    def reading_prompt(self) -> bool:
        return self.fed < len(self.to_feed)

    def cancel(self, message: str | None = None) -> None:
        """Stop the job at the next step and free its slot (any thread; idempotent). With a
        message, the job's last event is Failed(message); without, it sends nothing more."""
        self._engine._cancel(self, message)


class TokenLog:
    """The ids a slot stands for, in a growable int64 array: those in its session, then those
    held back (an answer's last token, cut by max_tokens: sampled, shown, not fed yet)."""

    def __init__(self):
        self._ids, self._n, self.held = np.zeros(256, dtype=np.int64), 0, 0

    def __len__(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        return self._ids[:self._n]

    def extend(self, ids) -> None:
        need = self._n + len(ids)
        if need > len(self._ids):
            grown = np.zeros(max(need, 2 * len(self._ids)), dtype=np.int64)
            grown[:self._n] = self.ids
            self._ids = grown
        self._ids[self._n:need] = ids
        self._n = need

    def hold(self, token: int) -> None:
        self.extend([token])
        self.held += 1

    def unhold(self) -> list[int]:
        """The held ids, taken out: the next job feeds them first."""
        ids = [int(i) for i in self._ids[self._n - self.held:self._n]]
        self._n -= self.held
        self.held = 0
        return ids

    def clear(self) -> None:
        self._n = self.held = 0

    def common_prefix(self, ids: np.ndarray) -> int:
        n = min(self._n, len(ids))
        differ = np.flatnonzero(self._ids[:n] != ids[:n])
        return int(differ[0]) if len(differ) else n


class Slot:
    def __init__(self, index: int, session):
        self.index, self.session = index, session
        self.log = TokenLog()
        self.text: str | None = ""  # the text the ids stand for; None: not known
        self.job: Job | None = None
        self.last_used = 0.0
        self.fresh_starts = 0  # how often the slot was started afresh (for /slots)
        # the session's bytes as the worker last saw them: its workspace may grow mid-step,
        # so other threads never walk it
        self.session_bytes = session.nbytes

    def reset(self) -> None:
        self.session.reset()
        self.log.clear()
        self.text = ""
        self.fresh_starts += 1

    def reuse(self, prompt: Prompt) -> tuple[str, int] | None:
        """("ids" | "text", ids in the slot) when the prompt continues the slot, else None."""
        n = len(self.log)
        if not n:
            return None
        if n <= len(prompt.ids) and self.log.common_prefix(prompt.ids) == n:
            return "ids", n
        if self.text and prompt.text.startswith(self.text):
            return "text", n
        return None

    def state(self) -> str:
        if self.job is None:
            return "idle"
        return "reading" if self.job.reading_prompt else "generating"


class Engine:
    """Slots over one model, advanced by one worker thread (`start`, `submit`, `close`)."""

    def __init__(self, model, n_slots: int, queue_size: int, session_settings: dict):
        self.model = model
        self.batch = Batch(model)
        self.slots = [Slot(i, model.session(**session_settings)) for i in range(n_slots)]
        self.queue_size = queue_size
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._admitted = 0  # jobs admitted so far: prompts are read in this order
        self._thread = threading.Thread(target=self._run, name="minillm-model", daemon=True)

    # -- the other threads' side ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: Prompt, params: SamplingParams, stop_ids: frozenset[int],
               stop_texts: Sequence[str], emit: Callable[[Event], None]) -> Job:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            busy = sum(s.job is not None for s in self.slots) + len(self._waiting)
            if busy >= len(self.slots) + self.queue_size:
                raise Busy(f"all {len(self.slots)} slots are busy and {len(self._waiting)} "
                           "requests are waiting: try again later")
            job = Job(self, prompt, params, stop_ids, stop_texts, emit)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _cancel(self, job: Job, message: str | None) -> None:
        with self._cond:
            if not job.cancelled:
                job.cancelled, job.cancel_message = True, message
                self._cond.notify()

    def close(self) -> None:
        """Take no new jobs; the worker ends once those submitted are done."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def cancel_all(self, message: str) -> None:
        with self._cond:
            jobs = list(self._waiting) + [s.job for s in self.slots if s.job is not None]
        for job in jobs:
            job.cancel(message)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def status(self) -> dict:
        """A snapshot for /health and /slots."""
        with self._cond:
            slots = [dict(slot=s.index, state=s.state(), position=s.session.position,
                          tokens=len(s.log), cache_bytes=s.session.cache.nbytes,
                          session_bytes=s.session_bytes, fresh_starts=s.fresh_starts)
                     for s in self.slots]
            return dict(slots=slots, queued=len(self._waiting), closing=self._closing,
                        batch_bytes=self.batch.nbytes)

    # -- the worker thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    self._drop_cancelled()
                    admitted = self._admit()
                    if all(s.job is None for s in self.slots):
                        if self._closing and not self._waiting:
                            return
                        self._cond.wait()
                        continue
                for job, slot, reuse in admitted:
                    self._isolated(slot, self._prepare, job, slot, reuse)
                self._step(sorted((s for s in self.slots if s.job is not None),
                                  key=lambda s: s.job.seq))
            except Exception as err:  # a bug or no memory: these jobs fail, the server goes on
                log.exception("the model step failed")
                self._fail_all(f"internal error: {type(err).__name__}: {err}")

    def _isolated(self, slot: Slot, fn, *args) -> None:
        """fn(*args); if it fails, only the slot's job fails (the slot starts afresh)."""
        try:
            fn(*args)
        except Exception as err:
            log.error("a request failed: %s: %s", type(err).__name__, err)
            if slot.job is not None:
                slot.text = None
                job = self._release(slot)
                slot.reset()
                job.emit(Failed(f"internal error: {type(err).__name__}: {err}"))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            if job.cancel_message:
                job.emit(Failed(job.cancel_message, 503))
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                job = self._release(slot)
                if job.cancel_message:
                    job.emit(Failed(job.cancel_message, 503))

    def _admit(self) -> list[tuple[Job, Slot, tuple[str, int] | None]]:
        """Waiting jobs into idle slots, first come first served; the preparation that may take
        time (encoding, resetting) runs after, outside the lock."""
        idle = [s for s in self.slots if s.job is None]
        admitted = []
        while self._waiting and idle:
            job = self._waiting.popleft()
            job.seq = self._admitted = self._admitted + 1
            slot, reuse = self._choose(idle, job.prompt)
            idle.remove(slot)
            slot.job = job
            admitted.append((job, slot, reuse))
        return admitted

    @staticmethod
    def _choose(idle: list[Slot], prompt: Prompt) -> tuple[Slot, tuple[str, int] | None]:
        """The idle slot that holds most of the prompt. Else a slot to start afresh: the one
        whose conversation the prompt mostly repeats (edited or asked again: its old state is
        of no more use), an empty one, or the least recently used. A prefix shared with every
        conversation (a default system prompt) does not make a slot the one to give up."""
        reusable = [(r[1], s, r) for s in idle if (r := s.reuse(prompt)) is not None]
        if reusable:
            _, slot, reuse = max(reusable, key=lambda t: t[0])
            return slot, reuse
        shared = {s: s.log.common_prefix(prompt.ids) for s in idle}
        edited = max(idle, key=shared.get)
        if 2 * shared[edited] > len(edited.log):
            return edited, None
        return min(idle, key=lambda s: (len(s.log) > 0, s.last_used)), None

    def _prepare(self, job: Job, slot: Slot, reuse: tuple[str, int] | None) -> None:
        prompt = job.prompt
        if reuse is None:
            slot.reset()
            job.to_feed = prompt.ids
        elif reuse[0] == "ids":  # the held ids are the first of those that follow
            slot.log.unhold()
            job.to_feed = prompt.ids[len(slot.log):]
        else:
            more = prompt.encode_more(prompt.text[len(slot.text):])
            job.to_feed = np.asarray(slot.log.unhold() + more, dtype=np.int64)
        slot.text = None  # known again once the whole prompt is in
        if not len(job.to_feed):  # all of it is in the slot: its last state predicts
            hidden = slot.session.last_hidden[None]
            self._prompt_read(slot, to_host(lm_head(hidden, self.model.weights))[0])

    def _step(self, busy: list[Slot]) -> None:
        """One forward pass: every generating slot's newest token, then pieces of the prompts
        being read, first admitted first (busy is in that order)."""
        rows = [(s, [s.job.next_token]) for s in busy if s.job.next_token is not None]
        budget = PROMPT_PIECE
        for s in busy:
            job = s.job
            if not job.reading_prompt or budget == 0:
                continue
            rest = len(job.to_feed) - job.fed
            n = s.session.chunk_length(rest, min(rest, budget))
            rows.append((s, job.to_feed[job.fed:job.fed + n]))
            budget -= n
        if not rows:
            return
        logits = self.batch.feed([s.session for s, _ in rows], [ids for _, ids in rows])
        for (slot, ids), row in zip(rows, logits):
            slot.log.extend(ids)
            self._isolated(slot, self._advanced, slot, len(ids), row)

    def _advanced(self, slot: Slot, n: int, logits: np.ndarray) -> None:
        """The slot's job after its n ids went in: more prompt to read, or a token to sample."""
        job = slot.job
        if job.reading_prompt:
            job.fed += n
            if not job.reading_prompt:
                self._prompt_read(slot, logits)
        else:
            job.answer_fed.append(job.next_token)
            job.next_token = None
            self._sampled(slot, logits)

    def _prompt_read(self, slot: Slot, logits: np.ndarray) -> None:
        slot.text = slot.job.prompt.text
        slot.job.context = [int(slot.log.ids[-1])]
        self._sampled(slot, logits)

    def _sampled(self, slot: Slot, logits: np.ndarray) -> None:
        """Sample the job's next token; stream its text, or finish."""
        job = slot.job
        token = sample(logits, job.params, job.rng)
        if token in job.stop_ids:
            return self._finish(slot, "stop")
        job.completion_tokens += 1
        piece = job.stop_text.add(job.decoder.add(token))
        if piece:
            job.emit(Piece(piece))
        if job.stop_text.stopped:
            return self._finish(slot, "stop")
        if job.completion_tokens >= job.params.max_tokens:
            return self._finish(slot, "length", held=token)
        job.next_token = token

    def _finish(self, slot: Slot, reason: str, held: int | None = None) -> None:
        job = slot.job
        if not job.stop_text.stopped:
            rest = job.stop_text.add(job.decoder.flush()) + job.stop_text.flush()
            if rest:
                job.emit(Piece(rest))
        self._release(slot, held)
        job.emit(Done(reason, len(job.to_feed), job.completion_tokens))

    def _release(self, slot: Slot, held: int | None = None) -> Job:
        """Free the slot, recording the text its ids now stand for (None: not known). The
        answer's last token, when max_tokens cut it, is held for the conversation's next turn
        to feed (and count): the slot then stands for the whole answer the client got."""
        job = slot.job
        answer = job.answer_fed + ([held] if held is not None else [])
        if held is not None:
            slot.log.hold(held)
        if slot.text is not None and answer:
            slot.text += self._continuation(job.context, answer)
        with self._cond:
            slot.job = None
            slot.last_used = time.monotonic()
            slot.session_bytes = slot.session.nbytes
        return job

    def _continuation(self, context: list[int], ids: list[int]) -> str:
        """The text ids add after context, as the answer's text streamed it (special tokens
        skipped; decoding in context keeps a leading space right)."""
        decode = self.model.tokenizer.decode
        return decode(context + ids, skip_special=True)[len(decode(context, skip_special=True)):]

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(Failed(message))
        for slot in self.slots:
            if slot.job is not None:
                slot.text = None  # what reached the cache is not known: match by ids only
                self._release(slot).emit(Failed(message))
