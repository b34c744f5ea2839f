"""Top-k middle attention's cost per generated token (issue 11), on the real model.

For each stored length L: one session with top-k middle attention reads L tokens of real text
(the Python standard library's source), then generates tokens one at a time, alternately
with top-k on and off (`feed(..., top_k_middle=False)`: the same step without the search),
STEPS of each. Reported per L: seconds per generated token with and without top-k and their
ratio, the share of blocks the min/max bounds pruned in those searches and the share of the
middle's keys that the 8-bit codes left to score exactly, the store's bytes on disk per 1M
tokens, and RssAnon after the prompt (the store is on disk: memory must not grow
with L).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/topk_speed.py \\
        --lengths 16384,131072 --out benchmarks/results/topk_speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minillm
from minillm.bench import blas_kernel
from minillm.passkey import process_memory

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def stdlib_ids(model, n: int) -> np.ndarray:
    import sysconfig
    text, ids = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text.append(path.read_text(errors="replace"))
        if sum(map(len, text)) > 5 * n:  # ~3.5 characters per token: enough text
            break
    ids = model.tokenizer.encode("".join(text))
    if len(ids) < n:
        sys.exit(f"only {len(ids)} tokens of text for {n}")
    return np.asarray(ids[:n])


def measure(model, length: int, k: int, middle_dir: str) -> dict:
    ids = stdlib_ids(model, length + 2 * STEPS)
    with model.session(top_k_middle=k, middle_dir=middle_dir) as s:
        t = time.perf_counter()
        s.feed(ids[:length], logits="none", top_k_middle=False)
        prompt_s = time.perf_counter() - t
        rss = process_memory().get("rss_anon")
        stats = s.middle.store.stats
        blocks0, visited0, keys0, scored0 = stats.blocks, stats.visited, stats.keys, stats.scored
        on, off = [], []
        for i in range(2 * STEPS):
            top_k = i % 2 == 0
            t = time.perf_counter()
            s.feed([int(ids[length + i])], logits="last", top_k_middle=top_k)
            (on if top_k else off).append(time.perf_counter() - t)
        searched = stats.blocks - blocks0
        pruned = 1 - (stats.visited - visited0) / searched if searched else None
        scored = (stats.scored - scored0) / (stats.keys - keys0) if searched else None
        disk = s.middle_bytes
    return {"stored_tokens": length, "k": k, "prompt_seconds": round(prompt_s, 1),
            "top_k_s_per_token": round(float(np.median(on)), 4),
            "plain_s_per_token": round(float(np.median(off)), 4),
            "ratio": round(float(np.median(on) / np.median(off)), 2),
            "pruned_share": None if pruned is None else round(pruned, 4),
            "scored_share": None if scored is None else round(scored, 5),
            "disk_bytes_per_1m_tokens": int(disk / (length + 2 * STEPS) * 1_000_000),
            "rss_anon_mb": None if rss is None else round(rss / 2**20, 1),
            "blas": blas_kernel()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--lengths", default="16384")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--middle-dir", default=tempfile.gettempdir())
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = minillm.load(args.model, backend="numpy")
    out = open(args.out, "a") if args.out else None
    for length in (int(n) for n in args.lengths.split(",")):
        record = measure(model, length, args.k, args.middle_dir)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()


if __name__ == "__main__":
    main()
