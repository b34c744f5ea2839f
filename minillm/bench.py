"""`minillm bench`: the minillm half of the performance comparison (the keys it reports are in
docs/DESIGN.md, "Interfaces others rely on").

Prompt processing at 512 and 2048 tokens (last-token logits, as llama.cpp measures it), decode
of 128 tokens after a 512-token prompt, scoring (all logits, 512-token chunks); each one
warm-up then the median of 3. Peak RSS in MB (10^6 bytes) and the BLAS kernel that ran.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

PROMPT_LENGTHS = (512, 2048)
DECODE_TOKENS = 128
SCORE_TOKENS = 2048
REPEATS = 3


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
    return out
