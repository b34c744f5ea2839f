"""Top-k middle attention (issue 11): the exact search over the disk store, the logits against
a dense reference written from the definition, the store's life (close, garbage collection,
Ctrl-C, SIGTERM), and top-k off or unused leaving every result as it was."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import (
    cli_env,
    default_sigint,
    invoke_cli,
    minillm_command,
    rng_ids,
    stderr_lines,
)

from minillm.errors import MiniLLMError
from minillm.middle import MiddleStore

N_GLOBAL, N_LOCAL, K = 4, 16, 3


# --- the search against a brute-force scan --------------------------------------------------

def filled_store(tmp_path, keys: np.ndarray, dtype="float16", block=4, superblock=3,
                 pieces=(1, 5, 13, 2, 40)) -> MiddleStore:
    """A store of one layer holding keys [n, kv, d], appended in uneven pieces (so that
    blocks and superblocks are begun in one append and finished in another)."""
    n, kv, d = keys.shape
    store = MiddleStore(1, kv, d, tmp_path, dtype, block=block, superblock=superblock)
    at, i = 0, 0
    while at < n:
        step = min(pieces[i % len(pieces)], n - at)
        chunk = keys[at:at + step].transpose(1, 0, 2)[None]             # [1, kv, C, d]
        store.append(chunk, np.zeros_like(chunk))
        at, i = at + step, i + 1
    return store


def brute_force(keys: np.ndarray, q: np.ndarray, first: int, last: int, k: int):
    """Every key of [first, last] scored as the definition says (float64 products of the
    stored keys, summed), ranked by score, then lower position. q [kv, group, d]: head
    h = kv * group + g."""
    out = []
    for kv in range(q.shape[0]):
        stored = keys[first:last + 1, kv].astype(np.float64)
        for g in range(q.shape[1]):
            scores = (stored * q[kv, g].astype(np.float64)).sum(axis=-1)
            ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
            out.append([first + j for j in ranked])
    return np.array(out)


def search(store, q, first, last, k):
    found = store.search(0, q, first, last, k)
    return None if found is None else found[1]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_search_equals_brute_force_on_random_keys(tmp_path, dtype):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(302, 2, 8)).astype(np.float32)  # the last block is not full
    keys += rng.normal(size=(1, 2, 8)).astype(np.float32) * 4   # an offset, as real keys have
    store = filled_store(tmp_path, keys, dtype)
    stored = keys.astype(dtype)
    for trial in range(40):
        q = rng.normal(size=(2, 3, 8)).astype(np.float32)
        first, last = sorted(rng.integers(0, 302, 2))
        if trial % 4 == 0:
            last = 301                   # up to the newest key: the block without codes
        k = int(rng.integers(1, 12))
        want = None if last - first + 1 < k else brute_force(stored, q, first, last, k)
        got = search(store, q, first, last, k)
        if want is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_search_with_ties_and_without_any_pruning(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(200, 1, 6)).astype(np.float16).astype(np.float32)
    keys[150:160] = keys[20]            # duplicated keys: equal scores, lower position first
    keys[100:] = keys[100:] * 0.1       # a weak region the bounds can skip
    store = filled_store(tmp_path, keys)
    q = rng.normal(size=(1, 2, 6)).astype(np.float32)
    q[0, 1] = keys[20, 0]               # head 1 points at the duplicated key
    for first, last, k in [(0, 199, 5), (10, 170, 12), (21, 199, 3)]:
        np.testing.assert_array_equal(search(store, q, first, last, k),
                                      brute_force(keys, q, first, last, k))

    # every key the same: every block must be read, the lowest positions win
    same = np.repeat(keys[:1], 200, axis=0)
    flat = filled_store(tmp_path, same)
    got = search(flat, q, 7, 190, 4)
    np.testing.assert_array_equal(got, [[7, 8, 9, 10]] * 2)
    assert flat.stats.pruned_share == 0


def test_search_ranks_scores_closer_than_float32_can_tell(tmp_path):
    """Keys that differ from one key by a few float32 ulps: the fast float32 filter cannot
    order them, the ranking by definition (float64) still must."""
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(300, 1, 16)).astype(np.float32)
    near = keys[40, 0] * (1 + rng.integers(-3, 4, size=(30, 16)) * np.float32(2 ** -23))
    keys[200:230, 0] = near.astype(np.float32)
    q = keys[40:41, None, 0].copy() + np.float32(1e-3)  # [1, 1, 16]: near all of them
    store = filled_store(tmp_path, keys, "float32")
    for first, last, k in [(0, 299, 5), (41, 299, 8), (0, 299, 31)]:
        np.testing.assert_array_equal(search(store, q, first, last, k),
                                      brute_force(keys, q, first, last, k))
    # the near keys in the newest block, which has no codes yet: scored by a float32 product
    tail = np.concatenate([keys[:280], keys[200:230]])
    store = filled_store(tmp_path, tail, "float32", block=32, superblock=2)
    assert store.full_blocks * 32 == 288     # positions 288-309 have no codes
    for first, last, k in [(0, 309, 5), (100, 309, 12)]:
        np.testing.assert_array_equal(search(store, q, first, last, k),
                                      brute_force(tail, q, first, last, k))


def test_codes_decode_within_their_recorded_error(tmp_path):
    """Every full block's codes, appended in uneven pieces, decode to within the error its
    record states, and that error is the codes' own (about half a step), not a loose one."""
    from minillm.middle import decode_codes, quantize
    rng = np.random.default_rng(5)
    keys = (rng.normal(size=(150, 2, 8)) * rng.uniform(0.1, 9, size=(1, 2, 8))).astype(np.float32)
    store = filled_store(tmp_path, keys, block=8, superblock=2)
    assert store.full_blocks == 18
    codes, params = store.codes(0, 0, 18)                     # [18, kv, 8, d], [18, 2, kv, d]
    boxes = store.boxes("b", 0, 0, 18)
    stored = keys[:144].astype(np.float16).reshape(18, 8, 2, 8).transpose(0, 2, 1, 3)
    step, error = params[:, 0, :, None], params[:, 1, :, None]
    decoded = decode_codes(codes, boxes[:, 0, :, None].astype(np.float32), step)
    off = np.abs(stored.astype(np.float64) - decoded)
    assert (off <= error).all()
    assert (error <= step * 0.5001 + 1e-6).all() and error.max() > 0
    # the same codes as one append of the whole blocks would give
    one_go, one_params = quantize(keys[None, :144].astype(np.float16), boxes[None])
    np.testing.assert_array_equal(codes, one_go[0])
    np.testing.assert_array_equal(params, one_params[0])


def test_search_exact_where_the_codes_blur_the_order(tmp_path):
    """Blocks whose one far key makes the codes' step coarse (~0.8), the others near the
    query with differences below a step: the codes misorder them, the search still must not."""
    rng = np.random.default_rng(8)
    q = rng.normal(size=(1, 1, 8)).astype(np.float32)
    keys = q[0, 0] + rng.normal(size=(400, 1, 8)).astype(np.float32) * 0.3
    keys[::8] = -100 * np.sign(q[0])            # far away, and far below in score
    store = filled_store(tmp_path, keys, block=8, superblock=4)
    for first, last, k in [(0, 399, 3), (5, 390, 10), (100, 399, 1)]:
        np.testing.assert_array_equal(search(store, q, first, last, k),
                                      brute_force(keys.astype(np.float16), q, first, last, k))


def test_codes_leave_few_keys_to_score_exactly(tmp_path):
    """The codes' approximate scores, not the exact ones, must do the scanning: on random
    keys only a small share is read and scored by definition (a search that scored every
    key would pass the exactness tests)."""
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(8192, 2, 16)).astype(np.float32)
    store = filled_store(tmp_path, keys, block=64, superblock=8, pieces=(300, 1, 77))
    q = rng.normal(size=(2, 2, 16)).astype(np.float32)
    np.testing.assert_array_equal(search(store, q, 10, 8000, 5),
                                  brute_force(keys.astype(np.float16), q, 10, 8000, 5))
    assert store.stats.pruned_share == 0       # random keys: no box bound prunes
    assert store.stats.scored < 0.03 * 8000


def test_search_opens_each_superblock_once(tmp_path):
    """Fewer than k keys in the first superblocks opened: the next batch must take only
    superblocks not yet scanned (a rescan would rank a position twice)."""
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(24, 1, 4)).astype(np.float32)
    keys[6:8] += 5                   # the range's first superblock: highest bound, two keys
    keys[8:16] += 2
    store = filled_store(tmp_path, keys, block=4, superblock=2)
    q = np.ones((1, 1, 4), np.float32)
    np.testing.assert_array_equal(search(store, q, 6, 23, 11),
                                  brute_force(keys.astype(np.float16), q, 6, 23, 11))


def test_search_exact_for_keys_near_float32_underflow(tmp_path):
    rng = np.random.default_rng(88)
    keys = (rng.normal(size=(8, 1, 2)) * 1.7e-43).astype(np.float32)   # subnormal floats
    q = rng.normal(size=(1, 1, 2)).astype(np.float32)
    store = filled_store(tmp_path, keys, "float32", block=4, superblock=2)
    for k in (1, 3):
        np.testing.assert_array_equal(search(store, q, 0, 7, k), brute_force(keys, q, 0, 7, k))


def test_keys_too_large_for_float16_are_refused(tmp_path):
    keys = np.ones((1, 1, 4, 4), np.float32)
    keys[0, 0, 2, 3] = -1e6                                   # -inf in float16
    store = MiddleStore(1, 1, 4, tmp_path, "float16")
    with pytest.raises(MiniLLMError, match="not finite in the middle store's float16"):
        store.append(keys, np.zeros_like(keys))
    assert store.length == 0
    wide = MiddleStore(1, 1, 4, tmp_path, "float32")
    wide.append(keys, np.zeros_like(keys))
    assert wide.length == 4


def test_search_after_rewinding_over_a_full_block(tmp_path):
    """A rewind to inside a block, then other keys: the block's codes are written again."""
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(60, 1, 4)).astype(np.float32)
    store = filled_store(tmp_path, keys[:30])
    mark = store.mark()
    store.append(rng.normal(size=(1, 1, 30, 4)).astype(np.float32) * 50, np.zeros((1, 1, 30, 4)))
    store.rewind(mark)
    store.append(keys[30:].transpose(1, 0, 2)[None], np.zeros((1, 1, 30, 4)))
    q = rng.normal(size=(1, 2, 4)).astype(np.float32)
    for first, last, k in [(0, 59, 5), (7, 40, 3)]:
        np.testing.assert_array_equal(search(store, q, first, last, k),
                                      brute_force(keys.astype(np.float16), q, first, last, k))


def test_search_prunes_blocks_far_below_the_best(tmp_path):
    """A few keys aligned with the query, the rest small: the bounds leave most blocks unread
    (a search that read everything would pass the other tests)."""
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(2000, 1, 8)).astype(np.float32) * 0.01
    q = rng.normal(size=(1, 1, 8)).astype(np.float32)
    for j in (123, 777, 1500):
        keys[j, 0] = q[0, 0]
    store = filled_store(tmp_path, keys, block=16, superblock=4)
    got = search(store, q, 0, 1999, 3)
    np.testing.assert_array_equal(np.sort(got[0]), [123, 777, 1500])
    assert store.stats.pruned_share > 0.8


def test_search_refuses_nothing_and_small_middles(tmp_path):
    keys = np.random.default_rng(3).normal(size=(40, 1, 4)).astype(np.float32)
    store = filled_store(tmp_path, keys)
    q = np.ones((1, 1, 4), np.float32)
    assert search(store, q, 10, 9, 1) is None     # an empty middle
    assert search(store, q, 10, 12, 4) is None    # fewer than k keys
    assert search(store, q, 10, 13, 4) is not None
    with pytest.raises(MiniLLMError, match="holds 40 positions"):
        search(store, q, 10, 40, 1)


# --- logits against a dense reference ---------------------------------------------------------

def _rotate_half(x):
    import torch
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def dense_topk_attention(spec, inv_freq, k, from_layer, insert_at, top_rows, store_dtype,
                         neighbours=0):
    """transformers attention: LM-Infinite's Λ rule written out densely (float64), and for
    each query in top_rows, in layers >= from_layer, every stored middle key scored at
    <R(insert_at) q, k_j> / sqrt(d), the k best per head joining that query's softmax; with
    neighbours, each with the middle keys up to `neighbours` positions either side, a run of
    consecutive ones scored with its last at insert_at and each earlier one a step further."""
    import torch

    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    rounding = {"float16": torch.float16, "float32": torch.float32}[store_dtype]

    def table(pos):
        ang = pos[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, kk, v = query.double()[0], key.double()[0], value.double()[0]   # [H|KV, T, d]
        group = q.shape[0] // kk.shape[0]
        kk, v = kk.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        T = q.shape[1]
        pos = torch.arange(T, dtype=torch.float64)
        cos, sin = table(pos)
        q_raw = q * cos - _rotate_half(q) * sin
        k_raw = kk * cos - _rotate_half(kk) * sin
        dist = pos[:, None] - pos[None, :]
        scores = torch.full((q.shape[0], T, T), -torch.inf, dtype=torch.float64)
        local = (dist >= 0) & (dist < spec.n_local)
        scores = torch.where(local, (q @ kk.transpose(-1, -2)) * scaling, scores)
        if spec.ceiling is not None:
            c_cos, c_sin = table(torch.tensor([float(spec.ceiling)], dtype=torch.float64))
            q_cap = q_raw * c_cos + _rotate_half(q_raw) * c_sin
            capped = (dist >= spec.n_local) & (pos[None, :] < spec.n_global)
            scores = torch.where(capped, (q_cap @ k_raw.transpose(-1, -2)) * scaling, scores)
        out = scores.softmax(dim=-1) @ v                                       # [H, T, d]
        if module.layer_idx >= from_layer:
            i_cos, i_sin = table(torch.tensor([float(insert_at)], dtype=torch.float64))
            stored_k = k_raw.to(rounding).double()
            stored_v = v.to(rounding).double()
            for i in top_rows:
                first, last = spec.n_global, i - spec.n_local
                if last - first + 1 < k:
                    continue
                q_ins = q_raw[:, i] * i_cos[0] + _rotate_half(q_raw[:, i]) * i_sin[0]  # [H, d]
                middle = (stored_k[:, first:last + 1] @ q_ins[:, :, None])[..., 0] * scaling
                for h in range(q.shape[0]):
                    best = sorted(range(middle.shape[1]),
                                  key=lambda j: (-middle[h, j].item(), j))[:k]
                    chosen, chosen_scores = best, middle[h, best]
                    if neighbours:
                        chosen = sorted({j + o for j in best
                                         for o in range(-neighbours, neighbours + 1)
                                         if 0 <= j + o < middle.shape[1]})
                        run_end = {}
                        for j in reversed(chosen):
                            run_end[j] = run_end.get(j + 1, j)
                        d_cos, d_sin = table(torch.tensor(
                            [float(insert_at + run_end[j] - j) for j in chosen],
                            dtype=torch.float64))
                        q_at = q_raw[h, i] * d_cos + _rotate_half(q_raw[h, i]) * d_sin
                        keys = stored_k[h, first:last + 1][chosen]
                        chosen_scores = (keys * q_at).sum(dim=-1) * scaling
                    row = torch.cat([scores[h, i], chosen_scores])
                    vals = torch.cat([v[h], stored_v[h, first:last + 1][chosen]])
                    out[h, i] = row.softmax(dim=-1) @ vals
        return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None

    return attn


def reference_logits(torch_model, ids, spec, top_k, top_rows, store_dtype="float32",
                     neighbours=0):
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register("dense_topk", dense_topk_attention(
        spec, torch_model.model.rotary_emb.inv_freq, top_k.k, top_k.from_layer,
        top_k.insert_at, top_rows, store_dtype, neighbours))
    torch_model.set_attn_implementation("dense_topk")
    try:
        with torch.no_grad():
            return torch_model(torch.tensor(ids)[None]).logits[0].numpy()
    finally:
        torch_model.set_attn_implementation("eager")


def session(model, preset="lminfinite", **kw):
    kw.setdefault("top_k_middle", K)
    kw.setdefault("top_k_from_layer", 1)
    if preset == "window":
        return model.session("window", n_local=N_LOCAL, **kw)
    return model.session("lminfinite", n_global=N_GLOBAL, n_local=N_LOCAL, **kw)


def stream_logits(s, prompt, continuation, chunk_size=512):
    """The logits after the prompt and after each token of the continuation, each fed by its
    own call (as generation does)."""
    rows = [s.feed(prompt, chunk_size=chunk_size, logits="last")]
    rows += [s.feed([t], logits="last") for t in continuation]
    return np.stack(rows)


@pytest.mark.parametrize("preset,store_dtype,neighbours", [("lminfinite", "float32", 0),
                                                           ("lminfinite", "float16", 0),
                                                           ("window", "float32", 0),
                                                           ("lminfinite", "float32", 4),
                                                           ("lminfinite", "float16", 40)])
def test_logits_equal_a_dense_reference(tiny_dir, tiny_model, tmp_path, preset, store_dtype,
                                        neighbours):
    """150 prompt tokens through a ring of 16 (the middle comes from every wrap of it), then
    two more tokens fed one by one: each feed's last token attends to its top-k (with its
    neighbours: 40 reach past both ends of the middle)."""
    _, torch_model = tiny_dir("gqa")
    prompt, continuation = rng_ids(150, 300, seed=5), [17, 230]
    ids = np.concatenate([prompt, continuation])
    with session(tiny_model, preset, middle_dir=tmp_path, middle_dtype=store_dtype,
                 top_k_neighbours=neighbours) as s:
        got = stream_logits(s, prompt, continuation)
        spec, top_k = s.spec, s.top_k
    rows = [149, 150, 151]
    want = reference_logits(torch_model, ids, spec, top_k, rows, store_dtype,
                            neighbours)[rows]
    plain = reference_logits(torch_model, ids, spec, top_k, [], store_dtype)[rows]
    assert np.abs(want - plain).max() > 1e-2  # the top-k keys change the answer
    if neighbours:
        tokens_only = reference_logits(torch_model, ids, spec, top_k, rows, store_dtype)[rows]
        assert np.abs(want - tokens_only).max() > 1e-2  # and so do their neighbours
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("neighbours", [0, 3])
def test_any_chunk_size_gives_the_same_logits(tiny_model, tmp_path, neighbours):
    prompt, continuation = rng_ids(150, 300, seed=6), [5, 9]
    results = []
    for chunk_size in (1, 7, 40, 512):
        with session(tiny_model, middle_dir=tmp_path, top_k_neighbours=neighbours) as s:
            results.append(stream_logits(s, prompt, continuation, chunk_size))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5, rtol=0)


# --- top-k off or unused: results as before -----------------------------------------------------

def test_top_k_off_writes_nothing_and_matches_the_forward_pass(tiny_model, tmp_path):
    """A session without top-k is today's chunk loop over model.forward, bit for bit, and
    makes no store."""
    from minillm.cache import KVCache
    from minillm.model import forward, lm_head
    from minillm.workspace import Workspace

    ids = rng_ids(120, 300, seed=7)
    s = tiny_model.session("lminfinite", N_GLOBAL, N_LOCAL, middle_dir=tmp_path)
    got = s.feed(ids, chunk_size=16)
    assert s.middle is None and s.middle_dir is None and not os.listdir(tmp_path)

    m, cfg = tiny_model, tiny_model.config
    cache, work = KVCache(cfg, N_GLOBAL, N_LOCAL, np), Workspace(cfg.vocab_size, np)
    want = []
    for a in range(0, len(ids), 16):
        pos = np.arange(a, min(a + 16, len(ids)))
        h = forward(m.weights, cfg, m.freq, ids[a:a + 16], pos, s.spec, cache, work)
        want.append(lm_head(h, m.weights))
    np.testing.assert_array_equal(got, np.concatenate(want))


def test_unused_top_k_and_nll_are_bit_identical_to_plain(tiny_model, tmp_path):
    """With top-k on, every token but a feed call's last is plain Λ: logits of all rows but
    the last, a feed with top_k_middle=False, and nll() equal the plain session's bit for bit;
    so does a last token whose middle holds fewer than k keys."""
    ids = rng_ids(100, 300, seed=8)
    plain = session(tiny_model, top_k_middle=0)
    c = N_LOCAL  # a feed's last chunk is cut to n_local with top-k: the same chunks for both
    with session(tiny_model, middle_dir=tmp_path) as s:
        a, b = s.feed(ids, chunk_size=c), plain.feed(ids, chunk_size=c)
        np.testing.assert_array_equal(a[:-1], b[:-1])
        assert not np.array_equal(a[-1], b[-1])
        np.testing.assert_array_equal(s.feed(ids, chunk_size=c, top_k_middle=False),
                                      plain.feed(ids, chunk_size=c))
        np.testing.assert_array_equal(s.nll(ids), plain.nll(ids))
        assert s.middle.store.length == s.position == 300  # nll's tokens are stored too
    with session(tiny_model, middle_dir=tmp_path, top_k_middle=5) as s:
        plain.reset()
        short = ids[:N_GLOBAL + N_LOCAL + 4]  # a middle of 4 < 5 keys: no top-k
        np.testing.assert_array_equal(s.feed(short, chunk_size=c), plain.feed(short, chunk_size=c))


def test_memory_stays_constant_and_the_store_grows(tiny_model, tmp_path):
    with session(tiny_model, middle_dir=tmp_path) as s:
        s.feed(rng_ids(200, 300, seed=9), logits="last")
        nbytes, disk = s.nbytes, s.middle_bytes
        s.feed(rng_ids(2000, 300, seed=10), logits="last")
        assert s.nbytes == nbytes
        assert s.middle_bytes > 5 * disk


def test_an_abandoned_chunk_writes_nothing(tiny_model, tmp_path):
    from minillm.model import ChunkAbandoned, forward_staged

    m = tiny_model
    with session(m, middle_dir=tmp_path) as s:
        s.feed(rng_ids(70, 300, seed=11))
        sizes = sorted(os.path.getsize(os.path.join(s.middle_dir, f))
                       for f in os.listdir(s.middle_dir))
        calls = iter([False, True])
        with pytest.raises(ChunkAbandoned):
            forward_staged(m.weights, m.config, m.freq, rng_ids(30, 300), np.arange(70, 100),
                           s.spec, s.cache, s.workspace, lambda: next(calls), s.middle, True)
        assert s.middle.store.length == s.position == 70
        assert sorted(os.path.getsize(os.path.join(s.middle_dir, f))
                      for f in os.listdir(s.middle_dir)) == sizes


def test_mark_and_rewind_give_the_continuation_back_exactly(tiny_model, tmp_path):
    prompt = rng_ids(90, 300, seed=12)
    with session(tiny_model, middle_dir=tmp_path) as s:
        s.feed(prompt[:-1], top_k_middle=False)
        mark = s.mark(4)
        first = stream_logits(s, prompt[-1:], [3, 4, 5][:3])
        s.rewind(mark)
        assert s.position == 89 and s.middle.store.length == 89
        np.testing.assert_array_equal(stream_logits(s, prompt[-1:], [3, 4, 5]), first)
    with session(tiny_model, middle_dir=tmp_path) as fresh:
        np.testing.assert_allclose(stream_logits(fresh, prompt, [3, 4, 5]), first, atol=1e-5)


def test_configure_answers_as_a_session_made_with_those_settings(tiny_model, tmp_path):
    """One fed prefix, answered at other insert distances and neighbours (what passkey's
    shared settings and benchmarks/passkey_insert_at.py do), equals fresh sessions."""
    prompt = rng_ids(120, 300, seed=13)
    with session(tiny_model, middle_dir=tmp_path) as s:
        s.feed(prompt[:-1], top_k_middle=False)
        mark = s.mark(3)
        got = {}
        for insert_at, neighbours in [(50, 0), (3, 2), (200, 5)]:
            s.rewind(mark)
            s.middle.configure(dataclasses.replace(s.top_k, insert_at=insert_at,
                                                   neighbours=neighbours))
            assert (s.top_k.insert_at, s.top_k.neighbours) == (insert_at, neighbours)
            got[insert_at, neighbours] = stream_logits(s, prompt[-1:], [7, 8])
    for (insert_at, neighbours), logits in got.items():
        with session(tiny_model, middle_dir=tmp_path, top_k_insert_at=insert_at,
                     top_k_neighbours=neighbours) as fresh:
            np.testing.assert_allclose(stream_logits(fresh, prompt, [7, 8]), logits,
                                       atol=1e-5, rtol=0)
    assert not np.allclose(got[50, 0], got[200, 5], atol=1e-3)


# --- settings refused ---------------------------------------------------------------------------

def test_settings_refused(tiny_model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="bounded attention preset"):
            tiny_model.session("full", top_k_middle=2)
    with pytest.raises(ValueError, match="below the model's 2 layers"):
        tiny_model.session(top_k_middle=2, top_k_from_layer=2)
    with pytest.raises(ValueError, match="top_k_middle"):
        tiny_model.session(top_k_middle=-1)
    with pytest.raises(TypeError, match="top_k_middle"):
        tiny_model.session(top_k_middle=2.0)
    for k, neighbours in ((2, -1), (2, 2048), (0, 3)):
        with pytest.raises(ValueError, match="top_k_neighbours"):
            tiny_model.session(top_k_middle=k, top_k_from_layer=0, top_k_neighbours=neighbours)
    with pytest.raises(TypeError, match="top_k_neighbours"):
        tiny_model.session(top_k_middle=2, top_k_from_layer=0, top_k_neighbours="4")
    with session(tiny_model, middle_dir=tmp_path) as s:
        with pytest.raises(ValueError, match="from_layer cannot change"):
            s.middle.configure(dataclasses.replace(s.top_k, from_layer=0))
        for change, name in (({"k": 0}, "top_k_middle"), ({"insert_at": -1}, "top_k_insert_at"),
                             ({"neighbours": -1}, "top_k_neighbours")):
            with pytest.raises(ValueError, match=name):
                s.middle.configure(dataclasses.replace(s.top_k, **change))
    with pytest.raises(MiniLLMError, match="not a directory"):
        tiny_model.session(top_k_middle=2, top_k_from_layer=0, middle_dir=tmp_path / "nope")
    with session(tiny_model, middle_dir=tmp_path) as s, \
            pytest.raises(MiniLLMError, match="cannot be saved"):
        s.save(str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="closed"):
        s.feed([1, 2])


# --- the store's folder is removed ----------------------------------------------------------------

def test_store_removed_by_close_and_garbage_collection(tiny_model, tmp_path):
    s = session(tiny_model, middle_dir=tmp_path)
    s.feed(rng_ids(80, 300))
    folder = s.middle_dir
    assert os.path.dirname(folder) == str(tmp_path) and os.listdir(folder)
    s.close()
    assert not os.path.exists(folder)
    s = session(tiny_model, middle_dir=tmp_path)
    folder = s.middle_dir
    del s
    gc.collect()
    assert not os.path.exists(folder)


def test_a_killed_run_s_store_is_removed_by_the_next(tiny_model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"minillm-middle-{dead.pid}-abc"
    stale.mkdir()
    (stale / "k0").write_bytes(b"x")
    with session(tiny_model, middle_dir=tmp_path):
        assert not stale.exists()


LONG_PROMPT = " ".join("".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(5))
                       for i in range(20000))  # 120 KB of letters the tiny BPE barely merges


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_store_removed_on_ctrl_c_and_sigterm(tiny_file, tmp_path, signum, code):
    """`minillm generate` with top-k, signalled while it reads a long prompt (its progress
    line says so): the exit code of the signal, and no store left in --middle-dir."""
    proc = subprocess.Popen(
        minillm_command() + ["generate", str(tiny_file), "-p", LONG_PROMPT, "--top-k-middle",
                             "2", "--top-k-from-layer", "1", "--middle-dir", str(tmp_path),
                             "--progress", "--max-tokens", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
        preexec_fn=default_sigint)
    try:
        seen = b""
        while b"prompt" not in seen:  # the first progress line: the prompt is being read
            byte = proc.stderr.read(1)
            assert byte, f"the command ended first: {seen!r}"
            seen += byte
        assert os.listdir(tmp_path)  # the store is there
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_store_removed_at_exit_of_a_program_that_never_closes_it(tiny_file, tmp_path):
    """A library user's session, never closed, stopped by Ctrl-C: removed at the exit."""
    script = (f"import minillm\n"
              f"s = minillm.load({str(tiny_file)!r}).session(top_k_middle=2, "
              f"top_k_from_layer=1, middle_dir={str(tmp_path)!r})\n"
              f"s.feed(list(range(200)))\n"
              f"print(s.middle_dir, flush=True)\n"
              f"while True:\n    s.feed(list(range(100)))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_sigint)
    try:
        folder = proc.stdout.readline().decode().strip()
        assert os.path.isdir(folder)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert b"KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == []


# --- the command line -------------------------------------------------------------------------

def test_generate_and_chat_with_top_k(tiny_file, tiny_chat_file, tmp_path):
    result = invoke_cli("generate", tiny_file, "-p", "hello world " * 40, "--top-k-middle", "2",
                        "--top-k-from-layer", "1", "--middle-dir", tmp_path, "--max-tokens",
                        "3", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == []
    result = invoke_cli("chat", tiny_chat_file, "--top-k-middle", "2", "--top-k-from-layer",
                        "1", "--top-k-neighbours", "3", "--middle-dir", tmp_path, "--verbose",
                        "--max-tokens", "3", "--n-local", "16", stdin=b"hello world " * 20)
    assert result.returncode == 0, result.stderr
    assert "MB on disk" in stderr_lines(result)[-1]
    assert os.listdir(tmp_path) == []


def test_usage_errors(tiny_file, tiny_chat_file):
    from helpers import assert_usage_error

    assert_usage_error(invoke_cli("chat", tiny_chat_file, "--attention", "full",
                                  "--top-k-middle", "2", stdin=b"hi"), "bounded")
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", "--top-k-middle", "2"),
                       "top_k_from_layer")
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", "--top-k-middle", "-1"))
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", "--top-k-middle", "2",
                                  "--top-k-from-layer", "1", "--top-k-neighbours", "5000"),
                       "top_k_neighbours")
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", "--top-k-neighbours", "3"),
                       "top_k_middle")
    assert_usage_error(invoke_cli("generate", tiny_file, "-p", "hi", "--middle-dir",
                                  "/nonexistent/folder"))


def test_info_says_the_store_size(tiny_file):
    import json
    result = invoke_cli("info", tiny_file, "--json")
    report = json.loads(result.stdout)
    assert report["middle_store_bytes_per_token"] == 0  # 2 layers: none from layer 4 up


@pytest.mark.real_model
def test_info_store_size_of_smollm2(real_model_path):
    import json
    report = json.loads(invoke_cli("info", real_model_path, "--json").stdout)
    # 26 layers x 3 kv heads x 64 x (key + value: 2 bytes each, code: 1), plus the records
    assert 24960 < report["middle_store_bytes_per_token"] < 24960 * 1.05
