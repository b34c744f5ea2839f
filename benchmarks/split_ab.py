"""What splitting a chunk over threads gains: minillm with one worker (BLAS threaded, no split)
against the default split (minillm.parallel), alternating fresh processes, medians.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/split_ab.py --rounds 4

Each process measures like compare.py does (a warm-up, then one timed run of each): prompts of
512 and 2048 tokens (last logits), 64 decoded tokens after 512, scoring 2048 tokens in
512-token chunks, on compare.py's token ids (build/compare/ids.npy, written by compare.py;
random ids when it is absent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import json, sys, time
from pathlib import Path
import numpy as np
import minillm
from minillm import parallel
from minillm.bench import bench_ids

model_path, ids_path, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
m = minillm.load(model_path, backend="numpy")
parallel.set_workers(workers)
ids = np.load(ids_path)[:2048] if ids_path.exists() else bench_ids(m, 2048)
m.session().feed(ids[:64], logits="last")
m.session().feed(ids[:512], logits="last")

def rate(fn, n):
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)

out = {f"prompt_{n}_tps": rate(lambda: m.session().feed(ids[:n], logits="last"), n)
       for n in (512, 2048)}
s = m.session()
token = int(np.argmax(s.feed(ids[:512], logits="last")))
t = time.perf_counter()
for _ in range(64):
    token = int(np.argmax(s.feed([token], logits="last")))
out["decode_tps"] = 64 / (time.perf_counter() - t)
out["score_tps"] = rate(lambda: m.session().nll(ids, chunk_size=512), 2048)
out["workers"] = parallel.workers()
print(json.dumps(out))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--ids", default=str(ROOT / "build" / "compare" / "ids.npy"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="the split side's worker count")
    args = p.parse_args()
    sides = {"one worker": 1, f"{args.workers} workers": args.workers}
    runs = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            proc = subprocess.run([sys.executable, "-c", WORKER, args.model, args.ids,
                                   str(sides[name])], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"split_ab: worker failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout))
            print(f"split_ab: round {r + 1}/{args.rounds}: {name}: {proc.stdout.strip()}",
                  file=sys.stderr)
    keys = ("prompt_512_tps", "prompt_2048_tps", "decode_tps", "score_tps")
    med = {name: {k: statistics.median(x[k] for x in rs) for k in keys}
           for name, rs in runs.items()}
    names = list(sides)
    print("| | " + " | ".join(names) + " | ratio |")
    print("|---" * (len(names) + 2) + "|")
    for k in keys:
        a, b = med[names[0]][k], med[names[1]][k]
        print(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
