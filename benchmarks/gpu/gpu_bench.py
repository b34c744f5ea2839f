"""SmolLM2-shaped random weights: cupy vs numpy logits, then minillm bench on both backends."""
import subprocess
import time

import numpy as np
from random_smol import FOLDER, save_random_model

import minillm


def compare_backends(folder: str, vocab_size: int) -> None:
    """Largest difference between the cupy and the numpy NLL of the same 1500 tokens."""
    ids = np.random.default_rng(0).integers(100, vocab_size, 1500)
    gpu = minillm.load(folder, backend="cupy")
    cpu = minillm.load(folder, backend="numpy")
    for attention in ("lminfinite", "full"):
        if attention == "lminfinite":
            kw = dict(attention=attention, n_local=512)
        else:
            kw = dict(attention="full")
        a = gpu.session(**kw).nll(ids, chunk_size=256)
        b = cpu.session(**kw).nll(ids, chunk_size=256)
        diff = float(np.abs(np.asarray(a)[1:] - np.asarray(b)[1:]).max())
        print(attention, "max |nll cupy - nll numpy| =", diff, flush=True)


def main() -> None:
    t = time.time()
    cfg = save_random_model(FOLDER)
    print(f"random model saved in {time.time() - t:.1f}s", flush=True)
    compare_backends(FOLDER, cfg["vocab_size"])
    for backend in ("cupy", "numpy"):
        r = subprocess.run(["minillm", "bench", FOLDER, "--backend", backend, "--json"],
                           capture_output=True, text=True, timeout=150)
        print(backend, r.returncode, r.stdout.strip(), r.stderr.strip()[-400:], flush=True)


if __name__ == "__main__":
    main()
