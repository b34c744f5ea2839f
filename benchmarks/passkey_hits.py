"""Does the top-k search find the needle? (issue 11: where top-k fails, and why)

For passkey prompts (the `minillm passkey` protocol, fixed depths) this feeds the prompt to
an lminfinite session with top-k middle attention, then the last token, and records for every
top-k layer and query head the k middle positions the search chose, how many of them lie in
the needle's tokens, and the rank of the needle's best-scoring token among all the middle's
keys (by a brute-force scan of the store: 1 means the search took it first). Then it answers
greedily as `minillm passkey`'s lminfinite+topk setting does; again (rewound) for each
distance of `--insert-at`.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/passkey_hits.py \\
        --lengths 12288 --depths 0.1,0.3 --insert-at 1024,4096 \\
        --out benchmarks/results/passkey/hits_12k.jsonl

One JSON object per prompt and distance; a table for each on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

import minillm
from minillm.passkey import (
    ANSWER_TOKENS,
    NEEDLE,
    first_integer,
    greedy_answer,
    prompt_text,
    trial_prompt,
)

ROOT = Path(__file__).resolve().parent.parent


def needle_span(tokenizer, prompt) -> tuple[int, int]:
    """Token positions [first, last] that hold the needle (one token of slack each side:
    the tokenizer may merge across the boundary)."""
    text = prompt_text(prompt.key, prompt.n_sentences, prompt.boundary)
    needle = NEEDLE.format(key=prompt.key)
    start = text.index(needle)
    first = len(tokenizer.encode(text[:start])) - 1
    last = len(tokenizer.encode(text[:start + len(needle)]))
    return first, last


def ranks_of_needle(store, layer: int, q: np.ndarray, first: int, last: int,
                    span: tuple[int, int]) -> np.ndarray:
    """Per query head, the rank (1 = best) of the needle's best token among the middle
    [first, last], scored by every key (float64)."""
    keys = store.keys(layer, first, last + 1).astype(np.float64)        # [n, kv, d]
    scores = np.einsum("nkd,kgd->kgn", keys, q.astype(np.float64)).reshape(-1, len(keys))
    lo, hi = max(span[0], first) - first, min(span[1], last) - first
    if hi < lo:
        return np.full(scores.shape[0], -1)
    best_needle = scores[:, lo:hi + 1].max(axis=1)
    return 1 + (scores > best_needle[:, None]).sum(axis=1)


def run(model, length: int, depth: float, d_index: int, k: int, seed: int,
        n_local: int | None, insert_ats: list[int]):
    """One record per insert distance, all from one fed prefix."""
    prompt = trial_prompt(model.tokenizer, length, seed, 0, depth, d_index)
    span = needle_span(model.tokenizer, prompt)
    with model.session("lminfinite", n_local=n_local, top_k_middle=k) as s:
        s.feed(prompt.ids[:-1], logits="none", top_k_middle=False)
        mark = s.mark(ANSWER_TOKENS + 1)
        middle, store = s.middle, s.middle.store
        n_layers = model.config.num_hidden_layers - middle.first_layer
        search, attend = store.search, middle.attend_last_row
        for i, insert_at in enumerate(insert_ats):
            if i:
                s.rewind(mark)
            middle.configure(dataclasses.replace(s.top_k, insert_at=insert_at))
            calls = []

            def recording_search(layer, q, first, last, kk, calls=calls):
                found = search(layer, q, first, last, kk)
                # the prompt's last token searches each top-k layer once, before any answer
                if found is not None and len(calls) < n_layers:
                    calls.append({"layer": layer + middle.first_layer,
                                  "positions": found[1].tolist(), "scores": found[0],
                                  "needle_rank": ranks_of_needle(store, layer, q, first, last,
                                                                 span).tolist()})
                return found

            def recording_attend(layer, position, q, out, lse, xp, calls=calls):
                n = len(calls)
                attend(layer, position, q, out, lse, xp)
                if len(calls) > n:  # the share of the softmax the top-k keys took, per head
                    scores = calls[-1].pop("scores")
                    lse_h = np.asarray(lse, dtype=np.float64).reshape(-1)
                    top = np.maximum(lse_h, scores.max(axis=1))
                    middle_w = np.exp(scores - top[:, None]).sum(axis=1)
                    calls[-1]["mass"] = (middle_w / (np.exp(lse_h - top) + middle_w)).tolist()

            store.search, middle.attend_last_row = recording_search, recording_attend
            answer = greedy_answer(model, s, prompt.ids[-1:], 512, top_k=True)
            store.search, middle.attend_last_row = search, attend
            text = model.tokenizer.decode(answer, skip_special=True)
            in_needle = [[sum(span[0] <= p <= span[1] for p in head) for head in c["positions"]]
                         for c in calls]
            yield {"length": length, "tokens": len(prompt.ids), "depth": round(prompt.depth, 4),
                   "key": prompt.key, "needle": list(span), "insert_at": insert_at,
                   "answer": text, "correct": first_integer(text) == prompt.key, "k": k,
                   "layers": [c["layer"] for c in calls], "in_needle": in_needle,
                   "needle_rank": [c["needle_rank"] for c in calls],
                   "mass": [c.get("mass") for c in calls],
                   "positions": [c["positions"] for c in calls]}


def table(record: dict) -> str:
    lines = [f"length {record['length']} depth {record['depth']} needle {record['needle']} "
             f"insert_at {record['insert_at']} key {record['key']} answer {record['answer']!r} "
             f"({'correct' if record['correct'] else 'wrong'})",
             "layer  heads with a  needle tokens  top-k share of the  needle rank per head",
             "       needle token  chosen         softmax, mean / max"]
    for layer, hits, ranks, mass in zip(record["layers"], record["in_needle"],
                                        record["needle_rank"], record["mass"]):
        lines.append(f"{layer:5d}  {sum(h > 0 for h in hits):5d}/{len(hits):<6d}"
                     f"{sum(hits):5d}/{len(hits) * record['k']:<8d}"
                     f"{np.mean(mass):8.3f} / {np.max(mass):.3f}       "
                     f"{' '.join(map(str, ranks))}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--lengths", default="12288")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--insert-at", default="4096", help="comma-separated distances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-local", type=int, default=None, help="default: the training length")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = minillm.load(args.model, backend="numpy")
    out = open(args.out, "w") if args.out else None
    for length in map(int, args.lengths.split(",")):
        for d_index, depth in enumerate(map(float, args.depths.split(","))):
            for record in run(model, length, depth, d_index, args.k, args.seed, args.n_local,
                              [int(x) for x in args.insert_at.split(",")]):
                print(table(record), file=sys.stderr, flush=True)
                if out:
                    out.write(json.dumps(record) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
