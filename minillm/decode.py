"""The decode step: one new token for each of one or more sessions, in as few array calls as
the math allows (NumPy only).

A decode step is bound by reading the weights: one matrix-vector product per weight matrix.
The chunk path (model.forward_staged) is built for many rows; for one row its per-chunk plan,
row split and query-block bookkeeping, and the 2-D products that BLAS runs as small GEMMs,
made a step about 15% slower than this one (`make compare`, BENCHMARKS.md, issue 14). Here,
for a step of B sessions, one new token each:

- a weight product of one row is a GEMV (`W @ x` into a reused buffer); of a few rows, W is
  read in row blocks once for all of them (`weight_product`), the blocks shared out over
  parallel.workers() threads, as are the sessions' attention calls;
- RoPE is one small product with the position's rotation matrix, made once per step and
  shared by all layers; the capped branch's rotation (at the ceiling) is made once per session;
- a query's Λ mask is the slots it may not see (at most the ring slot its token overwrites,
  and the global slots n_local back unless the capped branch takes them, as a prefix): found
  once per step;
- per layer, each session's attention is two products over its own cache (scores, values);
  the sessions a thread takes have their scores side by side in one row (`Part`, within the
  query-block score budget), whose mask, exp and sum are one call each (the exp unshifted
  where the sums allow: attention.exp_sums_in_range).

The math is the chunk path's, in the same order where it matters (scores over [cache | own
key], one softmax, values): the logits agree to float32 rounding (tests hold them to 1e-5).
Like the chunk path, the step only reads the caches: the new keys and values are staged and
reach every cache in `commit`, so an exception or stop() before it leaves them as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import parallel
from .attention import exp_sums_in_range
from .cache import KVCache, StagedChunk, WritePlan
from .errors import MiniLLMError
from .middle import MiddleAttention
from .model import ChunkAbandoned
from .workspace import Workspace, score_budget

# a block of W for a few rows: rows x block rows x K elements within OpenBLAS's small-matrix
# kernel, which computes a block from cache at several times a GEMV's speed
BLOCK_ELEMENTS = 640 * 1024
BLOCK_ROWS_MIN = 16


def weight_product(x: np.ndarray, w: np.ndarray, out: np.ndarray,
                   scratch: np.ndarray | None = None, parts: int = 1) -> np.ndarray:
    """x @ w.T into out, for x of one row or a few ([B, K]; w [O, K] as stored).

    One row is a GEMV. For a few rows BLAS's GEMM would first copy all of w into its packed
    layout (eight rows cost about four GEMVs), so w is taken as a stack of row blocks small
    enough for OpenBLAS's small-matrix kernel, each read from memory once for all the rows, in
    one batched matmul call: NumPy drops the GIL for the whole stack, so `parts` threads
    (parallel.run; the caller holds parallel.chunk_threads) each take a share of the blocks.
    A loop of one call per block held the GIL between blocks, and two threads gained nothing
    (BENCHMARKS.md, issue 13). scratch: a float32 buffer of at least B x O elements.
    """
    if len(x) == 1:
        np.matmul(w, x[0], out=out[0])
        return out
    rows, (n_out, n_in) = len(x), w.shape
    size = block_rows(n_out, n_in, rows, parts)
    n_blocks = n_out // size
    if not n_blocks or out.strides[-1] != out.itemsize:  # (the view of out below needs
        return np.matmul(x, w.T, out=out)                # unit stride)
    whole = n_blocks * size
    blocks = w[:whole].reshape(n_blocks, size, n_in).transpose(0, 2, 1)
    if scratch is None:
        scratch = np.empty(rows * whole, np.float32)
    by_block = scratch[:rows * whole].reshape(n_blocks, rows, size)

    def part(i: int, r: slice) -> None:
        np.matmul(x, blocks[r], out=by_block[r])
        if i == 0 and whole < n_out:  # the rows after the last whole block: this thread's
            np.matmul(x, w[whole:].T, out=out[:, whole:])
    parallel.run(part, parallel.row_ranges(n_blocks, parts))
    np.copyto(out[:, :whole].reshape(rows, n_blocks, size), by_block.transpose(1, 0, 2))
    return out


def block_rows(n_out: int, n_in: int, rows: int, parts: int) -> int:
    """Rows of w per block for `rows` rows of x: within BLOCK_ELEMENTS, a multiple of
    BLOCK_ROWS_MIN, and at least one block per part where w has the rows."""
    most = max(BLOCK_ROWS_MIN, BLOCK_ELEMENTS // (rows * n_in))
    n_blocks = max(-(-n_out // most), parts)
    return max(BLOCK_ROWS_MIN, n_out // n_blocks // BLOCK_ROWS_MIN * BLOCK_ROWS_MIN)


def rotation(position: int, freq: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[d, d] float32 R with x @ R = RoPE(x) * scale at `position` (rotate-half layout).

    The angles are float64 and cos/sin are cast to float32 before use, as rope.cos_sin does.
    """
    half = len(freq)
    angles = position * freq
    cos = np.cos(angles).astype(np.float32) * np.float32(scale)
    sin = np.sin(angles).astype(np.float32) * np.float32(scale)
    r = np.zeros((2 * half, 2 * half), np.float32)
    i = np.arange(half)
    r[i, i] = cos                # out1 = x1 cos - x2 sin
    r[i + half, i] = -sin
    r[i + half, i + half] = cos  # out2 = x2 cos + x1 sin
    r[i, i + half] = sin
    return r


@dataclass
class Query:
    """One session's token in the step: what its query may see, and where its key goes."""
    cache: KVCache
    position: int
    n: int                          # cache slots [0, n) are scored, then the token's own key
    masked: np.ndarray | None       # slots it may not see (None: none)
    n_capped: int                   # global slots [0, n_capped) scored at the ceiling
    capped_rotation: np.ndarray | None
    write: WritePlan
    staged: StagedChunk
    middle: MiddleAttention | None  # top-k middle attention's store, or None (off)
    middle_k: np.ndarray | None     # the stored layers' un-rotated keys, for the store
    top_k: bool                     # the query attends to its top-k middle keys too


def plan_query(session, position: int, top_k: bool, staged: StagedChunk) -> Query:
    """The Λ mask of a session's query at `position` over its cache's slots (the rule of
    attention.lambda_mask: local when closer than n_local, else capped when a global slot and
    a ceiling is set, else masked), as masked slots and a capped prefix. staged: where the
    token's keys and values wait for the commit (Step.staged)."""
    spec, cache, middle = session.spec, session.cache, session.middle
    n = cache.n_used
    n_capped, masked = 0, None
    if spec.n_local is not None:  # (found without a pass over the cache's positions)
        # the global slots hold positions 0, 1, ...: those n_local or more back are a prefix
        far = list(range(min(cache.n_global, n, max(0, position - spec.n_local + 1))))
        if spec.ceiling is not None:
            n_capped, far = len(far), []
        # the ring holds the last n_local positions: only the oldest, in the slot this token
        # overwrites, can be n_local back
        slot = int(cache.slot_of(np.int64(position)))
        if slot < n and position - int(cache.pos[slot]) >= spec.n_local:
            far.append(slot)
        masked = np.array(far, dtype=np.intp) if far else None
    middle_k = None
    if middle is not None:
        if middle.store.length != position:
            raise MiniLLMError(f"the middle store holds {middle.store.length} positions but "
                               f"the token is at {position}")
        cfg = session.model.config
        middle_k = session.workspace.buffer(
            "staged_middle_k", (middle.n_layers, cfg.n_kv_heads, 1, cfg.head_dim), 1)
    write = cache.write_plan(np.array([position], dtype=np.int64))
    return Query(cache, position, n, masked, n_capped,
                 session.capped_rotation if n_capped else None, write, staged,
                 middle, middle_k, top_k and middle is not None)


@dataclass
class Part:
    """A run of the step's sessions whose scores lie side by side in one row of `total`
    columns: session j's cache slots from offsets[j], then its own key in column own[j]."""
    rows: slice
    queries: list[Query]
    offsets: np.ndarray             # [m] each session's first column
    own: np.ndarray                 # [m] each session's own key's column
    masked: np.ndarray | None       # the columns no query may see (None: none)
    total: int


def plan_parts(queries: list[Query], n_threads: int, n_heads: int) -> list[list[Part]]:
    """Each thread's share of the queries (contiguous, of about equal total width), cut into
    runs whose scores fit the query-block score budget (workspace.score_budget: the row stays
    in cache and its buffer never grows past the budget; a query wider than that alone)."""
    widths = [q.n + 1 for q in queries]
    columns = max(1, score_budget() // (4 * n_heads))
    shares = []
    for share in parallel.split(widths, n_threads):
        runs, start, width = [], share.start, 0
        for i in share:
            if i > start and width + widths[i] > columns:
                runs.append(_part(queries, slice(start, i)))
                start, width = i, 0
            width += widths[i]
        runs.append(_part(queries, slice(start, share.stop)))
        shares.append(runs)
    return shares


def _part(queries: list[Query], rows: slice) -> Part:
    qs = queries[rows]
    widths = np.array([q.n + 1 for q in qs], dtype=np.intp)
    own = np.cumsum(widths) - 1
    offsets = own - widths + 1
    masked = [off + q.masked for q, off in zip(qs, offsets) if q.masked is not None]
    return Part(rows, qs, offsets, own, np.concatenate(masked) if masked else None,
                int(widths.sum()))


class Step:
    """The buffers of decode steps of up to `rows` sessions of one model, reused by every
    step (views into `work`)."""

    def __init__(self, model, work: Workspace, rows: int):
        cfg = model.config
        d, n_h, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.model, self.work, self.cfg = model, work, cfg
        buf = work.buffer
        self.x = buf("decode_x", (rows, cfg.hidden_size), None)
        self.normed = buf("decode_normed", (rows, cfg.hidden_size), None)
        self.proj = buf("decode_proj", (rows, cfg.hidden_size), None)
        self.qkv = buf("decode_qkv", (rows, (n_h + 2 * n_kv) * d), None)
        self.q_rot = buf("decode_q_rot", (rows, n_h, d), None)
        self.attn = buf("decode_attn", (rows, n_h * d), None)
        self.gate_up = buf("decode_gate_up", (rows, 2 * cfg.intermediate_size), None)
        self.silu = buf("decode_silu", (rows, cfg.intermediate_size), None)
        self.mlp_out = buf("decode_mlp_out", (rows, cfg.hidden_size), None)
        self.sum_sq = buf("decode_sum_sq", (rows, 1), None)
        # the new keys (rotated) and values wait here for the commit, session by session
        self.staged_k = buf("decode_staged_k", (cfg.num_hidden_layers, rows, n_kv, d), None)
        self.staged_v = buf("decode_staged_v", (cfg.num_hidden_layers, rows, n_kv, d), None)
        widest = max(cfg.vocab_size, 2 * cfg.intermediate_size, (n_h + 2 * n_kv) * d)
        self.blocks = buf("decode_blocks", (rows * widest,), None) if rows > 1 else None
        # a step of several sessions spreads each weight product's blocks over the threads
        self.parts = parallel.workers() if rows > 1 else 1

    def product(self, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
        return weight_product(x, w, out, self.blocks, self.parts)

    def staged(self, b: int, session) -> StagedChunk:
        """Where the token of the step's session b waits for the commit, as a chunk of one
        token ([layers, kv, 1, d]); its un-rotated keys too when it is at a global position."""
        return StagedChunk(self.staged_k[:, b, :, None], self.staged_v[:, b, :, None],
                           session.staged_k_raw())


def forward_one(sessions: Sequence, tokens: Sequence[int], step: Step,
                stop: Callable[[], bool] | None = None,
                top_k: bool = False) -> tuple[np.ndarray, Callable[[], None]]:
    """(final-normed hidden states [B, D], the call that commits) for one token per session,
    each at its session's position: model.forward_staged for B chunks of one token, computed
    together. The commit stores each token's keys and values in its session's cache (and
    middle store). Until then nothing is written: stop() is asked before every layer and
    raises ChunkAbandoned. top_k: each query with top-k middle attention on attends to its
    top-k middle keys too (a feed call's last token, as in the chunk path).
    """
    model = step.model
    cfg, w = model.config, model.weights
    positions = [s.position for s in sessions]
    queries = [plan_query(s, p, top_k, step.staged(b, s))
               for b, (s, p) in enumerate(zip(sessions, positions))]
    shares = plan_parts(queries, step.parts, cfg.n_heads)
    scale = 1 / np.sqrt(cfg.head_dim)
    r_q = np.stack([rotation(p, model.freq, scale) for p in positions])  # [B, d, d]
    r_k = np.stack([rotation(p, model.freq) for p in positions])
    x = step.x[:len(sessions)]
    np.take(w.embed, np.asarray(tokens), axis=0, out=x)
    with parallel.chunk_threads(step.parts):
        for layer, lw in enumerate(w.layers):
            if stop is not None and stop():
                raise ChunkAbandoned(f"abandoned before layer {layer}")
            _layer(x, lw, layer, queries, shares, r_q, r_k, step)
    h = _rms_norm(x, w.norm, cfg.rms_norm_eps, step, out=step.normed[:len(x)]).copy()

    def commit() -> None:
        for q in queries:  # the store first: if it cannot be written, the cache stays as it was
            if q.middle is not None:
                q.middle.store.append(q.middle_k, q.staged.v[q.middle.first_layer:])
            q.cache.commit(q.write, q.staged)
    return h, commit


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, step: Step,
               out: np.ndarray) -> np.ndarray:
    """x / rms(x) * weight, rows of x (one row: its sum of squares is a dot product)."""
    if len(x) == 1:
        mean_sq = np.float32(np.dot(x[0], x[0])) / np.float32(x.shape[1])
        np.multiply(x, weight, out=out)
        out /= np.sqrt(mean_sq + np.float32(eps))
        return out
    sum_sq = step.sum_sq[:len(x)]
    np.einsum("bd,bd->b", x, x, out=sum_sq[:, 0])
    sum_sq /= np.float32(x.shape[1])
    sum_sq += np.float32(eps)
    np.sqrt(sum_sq, out=sum_sq)
    np.divide(x, sum_sq, out=out)
    out *= weight
    return out


def _layer(x: np.ndarray, lw, layer: int, queries: list[Query], shares: list[list[Part]],
           r_q: np.ndarray, r_k: np.ndarray, step: Step) -> None:
    cfg, b_rows = step.cfg, len(x)
    d, n_h, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    h = _rms_norm(x, lw.attn_norm, cfg.rms_norm_eps, step, out=step.normed[:b_rows])
    qkv = step.product(h, lw.w_qkv, step.qkv[:b_rows])
    q = qkv[:, :n_h * d].reshape(b_rows, n_h, d)
    k = qkv[:, n_h * d:(n_h + n_kv) * d].reshape(b_rows, n_kv, d)
    v = qkv[:, (n_h + n_kv) * d:].reshape(b_rows, n_kv, d)
    q_rot = np.matmul(q, r_q, out=step.q_rot[:b_rows])
    k_rot = np.matmul(k, r_k, out=step.staged_k[layer, :b_rows])
    step.staged_v[layer, :b_rows] = v
    for query, k_b in zip(queries, k):
        if query.staged.k_raw is not None:  # a global position: its un-rotated key too
            query.staged.k_raw[layer][:, 0] = k_b
        if query.middle is not None and query.middle.stores(layer):
            query.middle_k[layer - query.middle.first_layer][:, 0] = k_b
    attn = step.attn[:b_rows]

    def attend(worker: int, parts: list[Part]) -> None:
        for part in parts:
            _attend(part, layer, q, q_rot, k_rot, v, attn, step, worker)
    parallel.run(attend, shares)
    x += step.product(attn, lw.wo, step.proj[:b_rows])
    h = _rms_norm(x, lw.mlp_norm, cfg.rms_norm_eps, step, out=step.normed[:b_rows])
    gate_up = step.product(h, lw.w_gate_up, step.gate_up[:b_rows])
    f = cfg.intermediate_size
    g, u = gate_up[:, :f], gate_up[:, f:]
    e = np.negative(g, out=step.silu[:b_rows])  # silu(g) * u = g * u / (1 + exp(-g))
    np.exp(e, out=e)
    e += 1
    g *= u
    g /= e
    x += step.product(g, lw.w_down, step.mlp_out[:b_rows])


def _fill_scores(part: Part, layer: int, q: np.ndarray, q_rot: np.ndarray, k_rot: np.ndarray,
                 s: np.ndarray, group: int) -> None:
    """The part's masked scores into s [K, group, part.total] (see _attend)."""
    rows, m, d = part.rows, len(part.queries), q.shape[-1]
    n_kv = s.shape[0]
    qg = q_rot[rows].reshape(m, n_kv, group, d)
    for j, (query, first) in enumerate(zip(part.queries, part.offsets)):
        n, cache = query.n, query.cache
        np.matmul(qg[j], cache.k[layer][..., :n], out=s[..., first:first + n])
        if query.n_capped:
            c = query.n_capped
            qc = np.matmul(q[rows.start + j], query.capped_rotation).reshape(n_kv, group, d)
            np.matmul(qc, cache.k_raw[layer][:, :c].transpose(0, 2, 1),
                      out=s[..., first:first + c])
    own_scores = np.matmul(qg, k_rot[rows][..., None])        # [m, K, group, 1]
    s[..., part.own] = own_scores[..., 0].transpose(1, 2, 0)
    if part.masked is not None:
        s[..., part.masked] = -np.inf


def _attend(part: Part, layer: int, q: np.ndarray, q_rot: np.ndarray, k_rot: np.ndarray,
            v: np.ndarray, out: np.ndarray, step: Step, worker: int) -> None:
    """The attention of a part's queries, each over [its cache's slots | its own key], into
    their rows of out [B, H d]: the scores of all of them in one row, so that the mask, the
    exp and the sum are one call each for the part. The exp is taken unshifted where every
    query's sum allows (attention.exp_sums_in_range), else the scores are made again and
    shifted by each query's maximum (one call per query).

    q: [B, H, d] un-rotated (the capped branch, top-k); q_rot: [B, H, d] rotated and
    pre-scaled; k_rot, v: [B, K, d] the new keys (rotated) and values.
    """
    cfg, rows, m = step.cfg, part.rows, len(part.queries)
    n_kv, d = cfg.n_kv_heads, cfg.head_dim
    group = cfg.n_heads // n_kv
    s = step.work.scores(n_kv * group * part.total, worker).reshape(n_kv, group, part.total)
    _fill_scores(part, layer, q, q_rot, k_rot, s, group)
    np.exp(s, out=s)
    z = np.add.reduceat(s, part.offsets, axis=-1)                # [K, group, m]
    top = None
    if not exp_sums_in_range(z):  # (rare) a query beyond exp's reach unshifted: shift each
        _fill_scores(part, layer, q, q_rot, k_rot, s, group)   # by its own maximum
        top = np.maximum.reduceat(s, part.offsets, axis=-1)
        for j, (first, own) in enumerate(zip(part.offsets, part.own)):
            s[..., first:own + 1] -= top[..., j:j + 1]
        np.exp(s, out=s)
        z = np.add.reduceat(s, part.offsets, axis=-1)
    o = out[rows].reshape(m, n_kv, group, d)
    for j, (query, first) in enumerate(zip(part.queries, part.offsets)):
        n = query.n
        np.matmul(s[..., first:first + n], query.cache.v[layer][:, :n], out=o[j])
    o += s[..., part.own].transpose(2, 0, 1)[..., None] * v[rows][:, :, None]
    o /= z.transpose(2, 0, 1)[..., None]
    for j, query in enumerate(part.queries):
        if query.top_k and query.middle.stores(layer):
            lse = np.log(z[..., j]) if top is None else top[..., j] + np.log(z[..., j])
            query.middle.attend_last_row(layer, query.position,
                                         q[rows.start + j].reshape(n_kv, group, d),
                                         out[rows.start + j], lse, np)
