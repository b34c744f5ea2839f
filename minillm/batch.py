"""Several sessions of one model advanced in one forward pass.

Each session brings its own ids (one in a decode step, a piece of a prompt, any mix), at its own
position and with its own attention settings. The rows of all sessions go through every weight
matrix product together, so the weights are read from memory once per step instead of once per
session: eight streams decode in a fraction of the time of eight single steps (BENCHMARKS.md).
Attention stays per session, over that session's own cache (attention.attend, unchanged), and
each session's keys and values are committed to its own cache after the last layer. The
result is the same as feeding each session alone, to float32 rounding: only the order of the
sums inside a matrix product may differ.

A batch is all or nothing like a session's chunk: an exception before the commits leaves every
cache as it was. It takes no signals (the server runs it on a worker thread); a program that
calls it on the main thread gets Ctrl-C as a KeyboardInterrupt, caches untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import attention, parallel
from .attention import ChunkPlan
from .backend import Array, to_host
from .cache import StagedChunk
from .decode import Step, forward_one, weight_product
from .model import (
    Rotations,
    RowBuffers,
    attention_input,
    attention_residual,
    mlp_residual,
    rms_norm,
)
from .rope import apply_rope, cos_sin
from .session import Session, as_token_ids
from .workspace import Workspace

FEW_ROWS = 32  # a batch of 2 to this many rows takes _BlockedProducts (NumPy only)


@dataclass
class _Member:
    """One session's part of the batch: its rows, its attention plan, its staged keys."""
    session: Session
    rows: slice
    plan: ChunkPlan
    capped: tuple[Array, Array] | None  # cos/sin of the ceiling, pre-scaled; None: no ceiling
    staged: StagedChunk


class _BlockedProducts:
    """NumPy, except that a weight product `matmul(x, W.T)` of a few rows x is
    decode.weight_product: W read in row blocks once for all the rows, on the calling thread
    (a step of one id per session takes the decode step instead, which splits the blocks)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def matmul(x, w_t, out=None):
        if out is None or x.ndim != 2 or w_t.ndim != 2:
            return np.matmul(x, w_t, out=out)
        return weight_product(x, w_t.T, out)


class _Rows(RowBuffers):
    """What model.attention_input, attention_residual and mlp_residual read of a chunk, over
    the rows of every session at once (temporaries in the batch's own workspace)."""

    def __init__(self, cfg, work: Workspace, rot: Rotations, n_parts: int, n: int, xp):
        self.cfg, self.rot, self.xp = cfg, rot, xp
        self.rows = parallel.row_ranges(n, n_parts)
        self.make_row_buffers(cfg, work, n)
        d, n_kv, layers = cfg.head_dim, cfg.n_kv_heads, cfg.num_hidden_layers
        self.attn = work.buffer("attn", (n, cfg.n_heads * d), n)  # every session's attention
        self.staged = StagedChunk(work.buffer("staged_k", (layers, n_kv, n, d), n),
                                  work.buffer("staged_v", (layers, n_kv, n, d), n), None)


class Batch:
    """Forward passes over several sessions of `model`, with one set of reused temporaries.

    `batch.feed(sessions, ids)` advances every session by its ids and returns the logits after
    each session's last id. Not thread-safe: one Batch per thread that computes.
    """

    def __init__(self, model):
        self.model = model
        # only its named buffers are used (vocab 1: no logits rows for scoring)
        self.work = Workspace(1, model.xp)
        self._capped: dict[int, tuple[Array, Array]] = {}

    @property
    def nbytes(self) -> int:
        return self.work.nbytes

    def feed(self, sessions: Sequence[Session], ids: Sequence) -> np.ndarray:
        """Advance sessions[i] by ids[i] (at least one id each) in one forward pass; return
        host float32 logits [len(sessions), vocab], row i after session i's last id.

        The sessions must be distinct sessions of this batch's model; each one's ids must fit
        in one of its chunks (`session.chunk_length(n, n) == n`: at most n_local ids when they
        cross n_global), as a session's own feed would cut them.
        """
        members_ids = self._check(sessions, ids)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._forward(sessions, members_ids)

    def _check(self, sessions: Sequence[Session], ids: Sequence) -> list[np.ndarray]:
        if len(sessions) != len(ids):
            raise ValueError(f"{len(sessions)} sessions but {len(ids)} lists of ids")
        if not sessions:
            raise ValueError("no sessions to feed")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in the batch")
        out = []
        for i, (s, piece) in enumerate(zip(sessions, ids)):
            if s.model is not self.model:
                raise ValueError(f"session {i} belongs to another model")
            piece = as_token_ids(piece, self.model.config.vocab_size)
            if not len(piece):
                raise ValueError(f"session {i} has no ids to feed")
            if s.middle is not None:
                raise ValueError(f"session {i} has top-k middle attention, which a batch does "
                                 "not keep (feed it alone)")
            if s.chunk_length(len(piece), len(piece)) != len(piece):
                raise ValueError(f"session {i}: {len(piece)} ids cross its n_global and exceed "
                                 "n_local; feed at most session.chunk_length(n, n) at once")
            out.append(piece)
        return out

    def _forward(self, sessions: Sequence[Session], ids: list[np.ndarray]) -> np.ndarray:
        m, xp = self.model, self.model.xp
        cfg, weights = m.config, m.weights
        n = sum(len(piece) for piece in ids)
        if xp is np and n == len(sessions):  # one token each: the decode step
            return self._decode(sessions, np.concatenate(ids))
        # 2 to FEW_ROWS rows (decode steps): weight products in blocks; one row is a GEMV,
        # which BLAS threads best itself (as a session's decode step); many rows: the chunk's
        # own row split over the threads
        few = xp is np and 2 <= n <= FEW_ROWS
        n_parts = 1 if few else parallel.parts_for(n, xp)
        row_xp = _BlockedProducts() if few else xp
        positions = np.concatenate([np.arange(s.position, s.position + len(piece), dtype=np.int64)
                                    for s, piece in zip(sessions, ids)])
        rows = _Rows(cfg, self.work, Rotations(positions, m.freq, None, cfg.head_dim, xp),
                     n_parts, n, row_xp)
        members = self._members(sessions, ids, positions, rows, n_parts)
        x = xp.asarray(weights.embed[np.concatenate(ids)])                # [N, D], a fresh copy
        with parallel.chunk_threads(n_parts):
            for layer, lw in enumerate(weights.layers):
                rows.by_rows(attention_input, x, lw, layer)
                a = self._attend(layer, rows, members)
                rows.by_rows(attention_residual, x, a, lw)
                rows.by_rows(mlp_residual, x, lw)
            last = [mb.rows.stop - 1 for mb in members]
            h = rms_norm(x[last], weights.norm, cfg.rms_norm_eps, xp)        # [B, D]
            logits = xp.empty((len(last), cfg.vocab_size), dtype=xp.float32)  # the caller's
            logits = to_host(row_xp.matmul(h, weights.lm_head.T, out=logits))
        for mb, hidden in zip(members, h):
            mb.session.cache.commit(mb.plan.write, mb.staged)
            mb.session.last_hidden = hidden.copy()
        return logits

    def _decode(self, sessions: Sequence[Session], tokens: np.ndarray) -> np.ndarray:
        step = Step(self.model, self.work, len(sessions))
        h, commit = forward_one(sessions, tokens, step)
        w = self.model.weights
        with parallel.chunk_threads(step.parts):
            logits = step.product(h, w.lm_head, np.empty((len(h), w.lm_head.shape[0]), np.float32))
        commit()
        for s, hidden in zip(sessions, h):
            s.last_hidden = hidden.copy()
        return logits

    def _members(self, sessions, ids, positions, rows: _Rows, n_parts: int) -> list[_Member]:
        cfg, xp = self.model.config, self.model.xp
        members, start = [], 0
        for s, piece in zip(sessions, ids):
            r = slice(start, start + len(piece))
            start = r.stop
            parts = min(parallel.parts_for(len(piece), xp), n_parts)
            plan = attention.plan_chunk(s.spec, s.cache, positions[r], cfg.n_heads, xp, parts)
            n_g = plan.write.n_global_rows
            k_raw = None
            if n_g:  # as model.Chunk: in the session's own workspace
                shape = (cfg.num_hidden_layers, cfg.n_kv_heads, s.cache.n_global, cfg.head_dim)
                k_raw = s.workspace.buffer("staged_k_raw", shape, None)[:, :, :n_g]
            staged = StagedChunk(rows.staged.k[:, :, r], rows.staged.v[:, :, r], k_raw)
            capped = self._capped_rotation(s.spec.ceiling) if plan.needs_capped else None
            members.append(_Member(s, r, plan, capped, staged))
        return members

    def _capped_rotation(self, ceiling: int) -> tuple[Array, Array]:
        """cos/sin at the ceiling, pre-scaled as model.Rotations' query tables."""
        if ceiling not in self._capped:
            cfg, xp = self.model.config, self.model.xp
            scale = np.float32(1 / np.sqrt(cfg.head_dim))
            cos, sin = cos_sin([ceiling], self.model.freq, xp)
            self._capped[ceiling] = cos * scale, sin * scale
        return self._capped[ceiling]

    def _attend(self, layer: int, rows: _Rows, members: list[_Member]) -> Array:
        """Each session's attention over [its cache | its own rows], into one [N, H d] array."""
        xp = self.model.xp
        for mb in members:
            r, s = mb.rows, mb.session
            q_capped = apply_rope(rows.q[:, r], *mb.capped, xp) if mb.capped else None
            rows.attn[r] = attention.attend(rows.q_rot[:, r], q_capped, rows.k_rot(layer)[:, r],
                                            rows.v[:, r], s.cache, layer, mb.plan, s.workspace)
            if mb.staged.k_raw is not None:
                mb.staged.k_raw[layer] = rows.k[:, r][:, mb.plan.write.global_rows]
        return rows.attn
