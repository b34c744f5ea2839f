"""Passkey accuracy of top-k middle attention against the distance its keys are scored at.

`minillm passkey` scores the top-k middle keys at one distance (`--top-k-insert-at`, default
half the training length, as the paper). This feeds each prompt once (the `minillm passkey`
protocol, its prompts for the same seed and depths), then answers it at each of several
insert distances, and with and without each chosen token's neighbours
(`--top-k-neighbours`), rewinding the session between answers: the prompt's long prefix is
computed once for all of them. It also answers with plain lminfinite (no top-k) from the same
prefix.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python \\
        benchmarks/passkey_insert_at.py --lengths 12288 --depths 0.1,0.3,0.5,0.7,0.9 \\
        --insert-at 512,1024,2048,4096 --neighbours 0,16 \\
        --out benchmarks/results/passkey/insert_at_12k.jsonl

One JSON object per answer (as `minillm passkey --json` writes, plus insert_at, neighbours
and k); the accuracy table on stderr at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import minillm
from minillm.passkey import ANSWER_TOKENS, _record, greedy_answer, reset_peak_rss, trial_prompt

ROOT = Path(__file__).resolve().parent.parent


def answers(model, prompt, length: int, k: int, insert_ats: list[int],
            neighbours: list[int], n_local: int | None):
    """Records for plain lminfinite, then top-k at every (insert_at, neighbours)."""
    reset_peak_rss()
    start = time.perf_counter()
    with model.session("lminfinite", n_local=n_local, top_k_middle=k,
                       top_k_neighbours=max(neighbours)) as s:
        s.feed(prompt.ids[:-1], logits="none", top_k_middle=False)
        shared = time.perf_counter() - start
        mark = s.mark(ANSWER_TOKENS + 1)
        runs = [(None, 0)] + [(at, n) for at in insert_ats for n in neighbours]
        for i, (insert_at, n) in enumerate(runs):
            if i:
                s.rewind(mark)
            if insert_at is not None:
                s.middle.configure(dataclasses.replace(s.top_k, insert_at=insert_at,
                                                       neighbours=n))
            stats = s.middle.store.stats
            blocks, visited = stats.blocks, stats.visited
            t = time.perf_counter()
            answer = greedy_answer(model, s, prompt.ids[-1:], 512, top_k=insert_at is not None)
            seconds = time.perf_counter() - t + shared
            pruned = None
            if stats.blocks > blocks:
                pruned = round(1 - (stats.visited - visited) / (stats.blocks - blocks), 4)
            setting = "lminfinite" if insert_at is None else \
                "lminfinite+topk" if n == 0 else "lminfinite+neighbours"
            record = _record(model, prompt, length, 0, setting, answer, seconds, shared,
                             s.middle_bytes if insert_at is not None else 0, pruned)
            yield {**record, "insert_at": insert_at, "neighbours": n, "k": k}


def table(records: list[dict]) -> str:
    keys = sorted({(r["length"], r["setting"], r["insert_at"] or 0, r["neighbours"])
                   for r in records})
    lines = ["length  setting                insert_at  neighbours  correct"]
    for length, setting, at, n in keys:
        rs = [r for r in records if (r["length"], r["setting"], r["insert_at"] or 0,
                                     r["neighbours"]) == (length, setting, at, n)]
        ok = sum(r["correct"] for r in rs)
        lines.append(f"{length:6d}  {setting:<21}  {at or '-':>9}  {n:10d}  {ok}/{len(rs)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--lengths", default="12288")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--insert-at", default="512,1024,2048,4096")
    p.add_argument("--neighbours", default="0")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-local", type=int, default=None, help="default: the training length")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    insert_ats = [int(x) for x in args.insert_at.split(",")]
    neighbours = [int(x) for x in args.neighbours.split(",")]
    model = minillm.load(args.model, backend="numpy")
    out = open(args.out, "w") if args.out else None
    records = []
    try:
        for length in map(int, args.lengths.split(",")):
            for d_index, depth in enumerate(map(float, args.depths.split(","))):
                prompt = trial_prompt(model.tokenizer, length, args.seed, 0, depth, d_index)
                for record in answers(model, prompt, length, args.k, insert_ats,
                                      neighbours, args.n_local):
                    records.append(record)
                    print(f"{length} depth {record['depth']:.2f} {record['setting']:<21} "
                          f"insert_at {record['insert_at']} neighbours {record['neighbours']}"
                          f" answer {record['answer']!r} "
                          f"{'correct' if record['correct'] else 'wrong'}",
                          file=sys.stderr, flush=True)
                    if out:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
    finally:
        print(table(records), file=sys.stderr)


if __name__ == "__main__":
    main()
