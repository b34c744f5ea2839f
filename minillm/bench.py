"""`minillm bench`: the minillm half of the performance comparison (the keys it reports are in
docs/DESIGN.md, "Interfaces others rely on").

Prompt processing at 512 and 2048 tokens (last-token logits, as llama.cpp measures it), decode
of 128 tokens after a 512-token prompt, scoring (all logits, 512-token chunks); each one
warm-up then the median of 3. Peak RSS in MB (10^6 bytes) and the BLAS kernel that ran.

Beside them, the machine's own floors at the model's shapes (`floors`), so that every figure
comes with its ceiling: the weight products alone, as a decode step runs them (one GEMV per
matrix) and as a prompt chunk does (512 rows per GEMM), on this CPU with this BLAS.
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import time

import numpy as np

from . import parallel

PROMPT_LENGTHS = (512, 2048)
DECODE_TOKENS = 128
SCORE_TOKENS = 2048
REPEATS = 3
GEMV_STEPS = 16      # decode steps per timed GEMV run
GEMM_ROWS = 512      # a prompt chunk's rows
FLOOR_REPEATS = 3    # the floors report the best (min) run: a floor is what the machine can do


def _median_rate(fn, n_tokens: int, repeats: int = REPEATS) -> float:
    fn()  # warm-up: page in the weights, start the BLAS threads
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_tokens / statistics.median(times)


def blas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                     f"threads={i.get('num_threads')}" for i in blas) or "none"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def weight_matrices(model, lm_head: bool = True) -> list:
    """Every layer's weight matrices ([out, in] as stored), and the lm_head."""
    w = model.weights
    mats = [m for lw in w.layers for m in (lw.w_qkv, lw.wo, lw.w_gate_up, lw.w_down)]
    return mats + [w.lm_head] if lm_head else mats


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page in the weights, start the BLAS threads
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemv_floor_ms(model, steps: int = GEMV_STEPS, repeats: int = FLOOR_REPEATS) -> float:
    """ms per decode token of the weight reads alone: W @ x into a reused buffer for every
    matrix and the lm_head, the form the decode step uses for one row (decode.weight_product)."""
    rng = np.random.default_rng(0)
    mats = weight_matrices(model)
    xs = {k: rng.standard_normal(k).astype(np.float32) for k in {m.shape[1] for m in mats}}
    outs = [np.empty(m.shape[0], np.float32) for m in mats]

    def run():
        for _ in range(steps):
            for m, o in zip(mats, outs):
                np.matmul(m, xs[m.shape[1]], out=o)

    return _best_seconds(run, repeats) / steps * 1e3


def gemm_floor(model, rows: int = GEMM_ROWS, repeats: int = FLOOR_REPEATS) -> tuple[float, float]:
    """(tokens/s, GFLOP/s) of a prompt chunk's weight products alone: rows x every layer
    matrix (x @ W.T into reused buffers, BLAS threaded as it is). The lm_head is left out: a
    prompt computes its logits for the last row only."""
    rng = np.random.default_rng(0)
    mats = weight_matrices(model, lm_head=False)
    xs = {k: rng.standard_normal((rows, k)).astype(np.float32) for k in {m.shape[1] for m in mats}}
    outs = {k: np.empty((rows, k), np.float32) for k in {m.shape[0] for m in mats}}

    def run():
        for m in mats:
            np.matmul(xs[m.shape[1]], m.T, out=outs[m.shape[0]])

    seconds = _best_seconds(run, repeats)
    flops = sum(2 * rows * m.shape[0] * m.shape[1] for m in mats)
    return rows / seconds, flops / seconds / 1e9


def floors(model) -> dict:
    """The CPU, its usable cores and the weight-product floors at the model's shapes (NumPy
    only: for a CuPy model the floor values are None)."""
    out = {"cpu": cpu_model(), "cores": parallel.usable_cores(), "gemv_floor_ms": None,
           "gemv_floor_tps": None, "gemm_floor_tps": None, "gemm_floor_gflops": None}
    if model.xp is not np:
        return out
    ms = gemv_floor_ms(model)
    tps, gflops = gemm_floor(model)
    out.update(gemv_floor_ms=ms, gemv_floor_tps=1e3 / ms, gemm_floor_tps=tps,
               gemm_floor_gflops=gflops)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # ru_maxrss is KiB


def bench_ids(model, n: int) -> np.ndarray:
    """n token ids of varied text (the tokenizer's own vocabulary, deterministic)."""
    rng = np.random.default_rng(0)
    return rng.integers(low=100, high=model.config.vocab_size, size=n)


def run_bench(model, repeats: int = REPEATS, progress=lambda msg: None) -> dict:
    from .generate import generate_ids
    from .sampling import SamplingParams

    out = {}
    for n in PROMPT_LENGTHS:
        progress(f"prompt {n}")
        ids = bench_ids(model, n)
        out[f"prompt_{n}_tps"] = _median_rate(
            lambda ids=ids: model.session().feed(ids, logits="last"), n, repeats)

    progress("decode")
    prompt = bench_ids(model, 512)
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS)

    def decode():
        s = model.session()
        s.feed(prompt, logits="last")
        t = time.perf_counter()
        n = sum(1 for _ in generate_ids(s, [int(prompt[-1])], params))
        decode.rate = n / (time.perf_counter() - t)

    rates = []
    decode()
    for _ in range(repeats):
        decode()
        rates.append(decode.rate)
    out["decode_tps"] = statistics.median(rates)

    progress("score")
    ids = bench_ids(model, SCORE_TOKENS)
    out["score_tps"] = _median_rate(lambda: model.session().nll(ids, chunk_size=512),
                                    SCORE_TOKENS, repeats)
    out["peak_rss_mb"] = peak_rss_mb()
    out["blas_kernel"] = blas_kernel()
    progress("floors")
    out.update(floors(model))
    return out
