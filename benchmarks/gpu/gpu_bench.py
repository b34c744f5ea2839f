"""SmolLM2-shaped random weights: cupy vs numpy logits, then minillm bench on both backends."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import minillm

HERE = Path(__file__).resolve().parent  # smol_config.json and smol/ (the SmolLM2 tokenizer)
FOLDER = "/tmp/smol"


def save_random_model(folder: str) -> dict:
    """A SmolLM2-shaped Hugging Face folder with random weights; returns its config."""
    cfg = json.loads((HERE / "smol_config.json").read_text())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(HERE / "smol" / f, folder)
    return cfg


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
