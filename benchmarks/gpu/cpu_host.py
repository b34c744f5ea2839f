"""The device host CPU (16 cores, issue 14): `minillm calibrate`, `minillm bench` with its
floors, prompt and score tok/s by worker count, the decode step against the chunk path."""
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_smol import FOLDER, save_random_model  # noqa: E402


def sh(*cmd, timeout=240):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print("$", " ".join(cmd), f"({time.time() - t:.1f} s, rc={r.returncode})")
    print(r.stdout.strip())
    print(r.stderr.strip()[-800:], flush=True)


def rate(fn, n):
    fn()
    t = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - t), 1)


def main():
    save_random_model(FOLDER)
    sh("minillm", "calibrate", FOLDER)
    sh("minillm", "bench", FOLDER, "--backend", "numpy")
    import minillm
    from minillm import calibrate, parallel
    m = minillm.load(FOLDER, backend="numpy")
    chosen = parallel.workers()
    print("chosen workers", chosen, "score budget", minillm.workspace.score_budget(), flush=True)
    ids = np.random.default_rng(0).integers(100, m.config.vocab_size, 2048)
    for w in calibrate.candidate_workers(parallel.thread_limit()):
        parallel.set_workers(w)
        time.sleep(0.2)
        r = dict(p512=rate(lambda: m.session().feed(ids[:512], logits="last"), 512),
                 p2048=rate(lambda: m.session().feed(ids, logits="last"), 2048),
                 score=rate(lambda: m.session().nll(ids, chunk_size=512), 2048))
        print("workers", w, r, flush=True)
    parallel.set_workers(chosen)
    s = m.session()
    s.feed(ids[:512], logits="none")
    k = 512
    for _ in range(3):
        for name in ("decode step", "chunk path"):
            s._step = m.session()._step if name == "decode step" else None
            t = time.perf_counter()
            for _ in range(32):
                s.feed([int(ids[k])], logits="last")
                k += 1
            print(f"{name}: {(time.perf_counter() - t) / 32 * 1e3:.2f} ms/token", end="  ")
        print(flush=True)


if __name__ == "__main__":
    main()
