"""Prompt tok/s of new sessions in a new process: the first session (what one `minillm score`
or `minillm chat` run pays) and the ones after it, on the real model. One JSON line, with how
many query blocks' softmax had to be shifted by the row maximum (attention.exp_sums_in_range).

    taskset -c 1 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/fresh_session.py

To compare two checkouts, run it from each in turn with PYTHONPATH=<checkout> (the checkout's
own minillm is imported, and its folder's name is in the output). --huge-pages allocates the
cache with np.zeros (NumPy's huge pages, as before 1671c1b), the code otherwise the same.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import minillm
from minillm import attention, cache, decode
from minillm.bench import bench_ids

MODEL = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--lengths", default="512,512,512,2048,2048",
                    help="prompt lengths, one new session each, in this order")
    ap.add_argument("--huge-pages", action="store_true",
                    help="the cache from np.zeros instead of minillm.cache.zeros")
    args = ap.parse_args()
    if args.huge_pages:
        cache.zeros = lambda shape, xp: xp.zeros(shape, dtype=xp.float32)
    blocks = {"shifted": 0, "all": 0}
    in_range = getattr(attention, "exp_sums_in_range", None)  # (None in a checkout before it)

    def counted(z) -> bool:
        ok = in_range(z)
        blocks["all"] += 1
        blocks["shifted"] += not ok
        return ok
    if in_range is not None:
        attention.exp_sums_in_range = decode.exp_sums_in_range = counted
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
                      "cache_pages": "huge" if args.huge_pages else "default",
                      "lengths": lengths, "prompt_tps": rates, "softmax_blocks": blocks}))


if __name__ == "__main__":
    main()
