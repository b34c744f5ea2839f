"""Prompt tok/s of new sessions in a new process: the first session (what one `minillm score`
or `minillm chat` run pays) and the ones after it, on the real model. One JSON line.

    taskset -c 1 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/fresh_session.py

To compare two checkouts, run it from each in turn with PYTHONPATH=<checkout> (the checkout's
own minillm is imported, and its folder's name is in the output).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import minillm
from minillm.bench import bench_ids

MODEL = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--lengths", default="512,512,512,2048,2048",
                    help="prompt lengths, one new session each, in this order")
    args = ap.parse_args()
    model = minillm.load(args.model, backend="numpy")
    lengths = [int(n) for n in args.lengths.split(",")]
    ids = bench_ids(model, max(lengths))
    rates = []
    for n in lengths:
        t = time.perf_counter()
        session = model.session()
        session.feed(ids[:n], logits="last")
        rates.append(round(n / (time.perf_counter() - t), 1))
        session.close()
    print(json.dumps({"checkout": Path(minillm.__file__).parent.parent.name,
                      "lengths": lengths, "prompt_tps": rates}))


if __name__ == "__main__":
    main()
