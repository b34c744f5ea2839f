"""Many-core check: prompt/score tok/s by worker count on the device's CPU (numpy backend)."""
import time

import numpy as np
from random_smol import FOLDER, save_random_model

import minillm
from minillm import parallel


def rate(fn, n: int) -> float:
    """Tokens/s of fn (n tokens) after one warm-up call."""
    fn()
    t = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - t), 1)


def main() -> None:
    cfg = save_random_model(FOLDER)
    m = minillm.load(FOLDER, backend="numpy")
    ids = np.random.default_rng(0).integers(100, cfg["vocab_size"], 2048)
    print("default workers", parallel.workers(), flush=True)
    m.session().feed(ids[:512], logits="last")
    for w in (1, 2, 4, 8, 16, 1):
        parallel.set_workers(w)
        r = dict(p512=rate(lambda: m.session().feed(ids[:512], logits="last"), 512),
                 p2048=rate(lambda: m.session().feed(ids, logits="last"), 2048),
                 score=rate(lambda: m.session().nll(ids, chunk_size=512), 2048))
        print(w, r, flush=True)


if __name__ == "__main__":
    main()
