"""Device host CPU: the decode step by BLAS thread count, and where its time goes."""
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_smol import FOLDER, save_random_model  # noqa: E402

import minillm  # noqa: E402
from minillm import bench, decode  # noqa: E402

save_random_model(FOLDER)
m = minillm.load(FOLDER, backend="numpy")
ids = np.random.default_rng(0).integers(100, m.config.vocab_size, 2048)
s = m.session()
s.feed(ids[:512], logits="none")
orig = decode.weight_product
acc = [0.0]


def timed_product(x, w, out):
    t = time.perf_counter()
    r = orig(x, w, out)
    acc[0] += time.perf_counter() - t
    return r


decode.weight_product = timed_product
k = 512
for _ in range(2):
    for threads in (16, 8, 4, 2, 1):
        with threadpool_limits(threads, "blas"):
            gemv = bench.gemv_floor_ms(m, steps=8, repeats=2)
            s.feed([int(ids[k])], logits="last")
            k += 1
            acc[0] = 0.0
            t = time.perf_counter()
            for _ in range(24):
                s.feed([int(ids[k])], logits="last")
                k += 1
            step = (time.perf_counter() - t) / 24 * 1e3
        print(f"threads {threads:2d}: decode {step:6.2f} ms/token, its layer products "
              f"{acc[0] / 24 * 1e3:6.2f} ms, GEMV floor {gemv:5.2f} ms", flush=True)
    s.reset()
    s.feed(ids[:512], logits="none")
    k = 512
