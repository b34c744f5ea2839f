"""The weight products of a decode step of B sessions, and the cost of a thread hand-off.

A decode step of B sessions multiplies B rows by every weight matrix. With SmolLM2-135M's
layer shapes (30 layers of qkv 960x576, o 576x576, gate/up 3072x576, down 576x1536; random
float32 weights, no model file needed), per B: milliseconds for all of them, as

    gemv      one GEMV per row, BLAS threaded (what one session's step does)
    loop      W in row blocks, one 2-D matmul call per block, one thread (the decode step's
              products before issue 13's second round)
    stacked   decode.weight_product on 1 thread: the blocks as one stacked matmul call
    split     decode.weight_product over parallel.workers() threads (at least 2)

and, for a hand-off of one part to another thread and back: parallel.run with a trivial
function, against concurrent.futures (submit, then result). Fastest of --repeats rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/products.py \\
        --out benchmarks/results/issue13/products.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minillm import decode, parallel
from minillm.bench import blas_kernel, cpu_model

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def loop_of_blocks(x, w, out):
    size = max(16, decode.BLOCK_ELEMENTS // (len(x) * w.shape[1]) // 16 * 16)
    for a in range(0, w.shape[0], size):
        np.matmul(x, w[a:a + size].T, out=out[:, a:a + size])


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def products(rows: int, weights, repeats: int, parts: int) -> dict:
    rng = np.random.default_rng(rows)
    xs = [rng.standard_normal((rows, w.shape[1]), dtype=np.float32) for w in weights]
    outs = [np.empty((rows, w.shape[0]), np.float32) for w in weights]
    scratch = np.empty(rows * max(w.shape[0] for w in weights), np.float32)
    pairs = list(zip(xs, weights, outs))

    def gemv():
        for x, w, out in pairs:
            for b in range(rows):
                np.matmul(w, x[b], out=out[b])

    def loop():
        with parallel.chunk_threads(2):  # BLAS on one thread: the small kernel is anyway
            for x, w, out in pairs:
                loop_of_blocks(x, w, out)

    def stacked(n):
        def run():
            with parallel.chunk_threads(2):
                for x, w, out in pairs:
                    decode.weight_product(x, w, out, scratch, n)
        return run

    result = {"rows": rows, "gemv_ms": 1e3 * fastest(gemv, repeats)}
    if rows > 1:
        result.update(loop_ms=1e3 * fastest(loop, repeats),
                      stacked_ms=1e3 * fastest(stacked(1), repeats),
                      split_ms=1e3 * fastest(stacked(parts), repeats), parts=parts)
    return result


def hand_offs(n: int = 5000) -> dict:
    def nothing(i, part):
        return None

    parts = [0, 1]
    parallel.run(nothing, parts)
    start = time.perf_counter()
    for _ in range(n):
        parallel.run(nothing, parts)
    ours = (time.perf_counter() - start) / n
    with ThreadPoolExecutor(1) as pool:
        pool.submit(nothing, 1, 1).result()
        start = time.perf_counter()
        for _ in range(n):
            future = pool.submit(nothing, 1, 1)
            nothing(0, 0)
            future.result()
        futures = (time.perf_counter() - start) / n
    return {"parallel_run_us": 1e6 * ours, "thread_pool_us": 1e6 * futures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the results as JSON here too")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) for s in SHAPES]
    parts = max(2, parallel.workers())
    machine = {"cpu": cpu_model(), "blas": blas_kernel(), "workers": parallel.workers()}
    print(f"CPU: {machine['cpu']}; BLAS: {machine['blas']}")
    print("| rows | gemv ms | loop of blocks ms | stacked, 1 thread ms | "
          f"stacked, {parts} threads ms |")
    print("|---|---|---|---|---|")
    rows = []
    for n in args.rows:
        r = products(n, weights, args.repeats, parts)
        rows.append(r)
        cells = [f"{r[k]:.1f}" if k in r else "" for k in
                 ("gemv_ms", "loop_ms", "stacked_ms", "split_ms")]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    handoff = hand_offs()
    print(f"hand-off: parallel.run {handoff['parallel_run_us']:.1f} us, "
          f"ThreadPoolExecutor {handoff['thread_pool_us']:.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine, products=rows, hand_off=handoff), f, indent=1)


if __name__ == "__main__":
    main()
