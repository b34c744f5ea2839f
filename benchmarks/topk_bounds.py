"""Why the top-k search prunes nothing on real keys: what box bounds could prune (issue 11).

A session with top-k middle attention (k = --k) reads --length tokens of the Python standard
library's source, then generates --queries tokens with top-k on; every search those tokens
make (one per stored layer) is recorded. For each search, the exact scores of every middle
key give each query head's k-th best score, and for blocks of B consecutive tokens the box
bound (sum_i max(q_i lo_i, q_i hi_i)) that the store keeps for B = 64 is computed, in the
keys' own coordinates ("raw") and after rotating keys and queries into the principal axes of
the first 2,048 middle keys of their key/value head ("pca": same scores, other boxes). A
block can be skipped only when its bound is below the k-th best score for every head that
reads it; the share of such blocks is what any search with these bounds could prune.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/topk_bounds.py \\
        --length 16384 --out benchmarks/results/topk_bounds.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from topk_speed import stdlib_ids

import minillm
from minillm.bench import blas_kernel, cpu_model

ROOT = Path(__file__).resolve().parent.parent
FIT_KEYS = 2048


def skippable(keys: np.ndarray, q: np.ndarray, kth: np.ndarray, block: int) -> float:
    """Share of whole blocks whose box bound is below kth for every head.
    keys [n, kv, d], q [kv, group, d], kth [kv * group] (float64)."""
    n, kv, d = keys.shape
    n_blocks = n // block
    boxes = keys[:n_blocks * block].reshape(n_blocks, block, kv, d)
    lo, hi = boxes.min(axis=1), boxes.max(axis=1)                        # [blocks, kv, d]
    bound = np.maximum(np.einsum("bkd,kgd->bkgd", lo, q),
                       np.einsum("bkd,kgd->bkgd", hi, q)).sum(-1).reshape(n_blocks, -1)
    return float((bound < kth[None]).all(axis=1).mean())


def clustered(keys: np.ndarray, q: np.ndarray, kth: np.ndarray, n_clusters: int,
              seed: int = 0) -> float:
    """Share of keys in clusters whose box bound is below kth for every head of their
    key/value head, with each key/value head's keys grouped by k-means (Lloyd, 10 rounds)."""
    n, kv, d = keys.shape
    group = q.shape[1]
    rng = np.random.default_rng(seed)
    skipped = 0
    for h in range(kv):
        x = keys[:, h]
        centres = x[rng.choice(n, n_clusters, replace=False)]
        for i in range(11):  # 10 rounds of moving the centres, then the final grouping
            near = ((centres ** 2).sum(1)[None] - 2 * x @ centres.T).argmin(1)
            count = np.bincount(near, minlength=n_clusters)
            order = np.argsort(near, kind="stable")
            used = count > 0
            starts = np.searchsorted(near[order], np.arange(n_clusters))[used]
            if i < 10:
                centres[used] = np.add.reduceat(x[order], starts) / count[used][:, None]
        lo = np.minimum.reduceat(x[order], starts)                     # [used, d]
        hi = np.maximum.reduceat(x[order], starts)
        bound = np.maximum(lo[:, None] * q[h][None], hi[:, None] * q[h][None]).sum(-1)
        below = (bound < kth[h * group:(h + 1) * group][None]).all(1)  # [used clusters]
        skipped += int(count[used][below].sum())
    return skipped / (n * kv)


def principal_axes(keys: np.ndarray) -> np.ndarray:
    """[kv, d, d]: per key/value head, the eigenvectors of the keys' second moment."""
    return np.stack([np.linalg.eigh(keys[:, h].T @ keys[:, h])[1] for h in range(keys.shape[1])])


def analyse(store, layer: int, q: np.ndarray, first: int, last: int, k: int,
            blocks: list[int], clusters: list[int]) -> dict:
    keys = store.keys(layer, first, last + 1).astype(np.float64)          # [n, kv, d]
    q = q.astype(np.float64)                                             # [kv, group, d]
    scores = np.einsum("nkd,kgd->kgn", keys, q).reshape(-1, len(keys))
    kth = np.sort(scores, axis=1)[:, -k]
    axes = principal_axes(keys[:FIT_KEYS])
    rotated_keys = np.einsum("nkd,kde->nke", keys, axes)
    rotated_q = np.einsum("kgd,kde->kge", q, axes)
    row = {"layer": layer, "middle_keys": len(keys)}
    for b in blocks:
        row[f"raw_{b}"] = skippable(keys, q, kth, b)
        row[f"pca_{b}"] = skippable(rotated_keys, rotated_q, kth, b)
    for c in clusters:
        row[f"kmeans_{c}"] = clustered(keys, q, kth, min(c, len(keys)))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--n-local", type=int, help="the window (default: the model's own)")
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 16, 4])
    p.add_argument("--clusters", type=int, nargs="*", default=[128, 512])
    p.add_argument("--out")
    args = p.parse_args()
    model = minillm.load(args.model)
    ids = stdlib_ids(model, args.length + args.queries)
    searches = []
    with tempfile.TemporaryDirectory() as folder, \
            model.session(top_k_middle=args.k, middle_dir=folder, n_local=args.n_local) as s:
        start = time.perf_counter()
        s.feed(ids[:args.length], logits="none", top_k_middle=False)
        prompt_s = time.perf_counter() - start
        store = s.middle.store
        search = store.search

        def recorded(layer, q, first, last, k):
            if last - first + 1 >= k:  # else no search: the middle is too short
                searches.append((layer, np.array(q, np.float32), first, last, k))
            return search(layer, q, first, last, k)
        store.search = recorded
        for i in range(args.queries):
            s.feed([int(ids[args.length + i])], logits="last", top_k_middle=True)
        pruned_in_search = store.stats.pruned_share
        rows = [analyse(store, *found, args.blocks, args.clusters) for found in searches]
    first_layer = model.config.num_hidden_layers - store.n_layers
    kinds = [f"{basis}_{b}" for b in args.blocks for basis in ("raw", "pca")] + \
        [f"kmeans_{c}" for c in args.clusters]
    print(f"CPU: {cpu_model()}; BLAS: {blas_kernel()}; {args.length} tokens read in "
          f"{prompt_s:.0f} s; the searches themselves pruned {100 * pruned_in_search:.2f}%")
    print("| layer | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    by_layer = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    summary = {}
    for layer, mine in sorted(by_layer.items()):
        means = {kind: float(np.mean([r[kind] for r in mine])) for kind in kinds}
        summary[layer + first_layer] = means
        print(f"| {layer + first_layer} | " + " | ".join(f"{100 * means[kind]:.1f}%"
                                                         for kind in kinds) + " |")
    overall = {kind: float(np.mean([r[kind] for r in rows])) for kind in kinds}
    print("| all | " + " | ".join(f"{100 * overall[kind]:.1f}%" for kind in kinds) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(cpu=cpu_model(), blas=blas_kernel(), length=args.length, k=args.k,
                           prompt_s=prompt_s, pruned_in_search=pruned_in_search,
                           per_layer=summary, overall=overall, searches=rows), f, indent=1)


if __name__ == "__main__":
    main()
