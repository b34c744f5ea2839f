"""SmolLM2-shaped random weights: cupy vs numpy logits, then minillm bench on both backends."""
import json, os, shutil, subprocess, sys, time
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

folder = "/tmp/smol"
cfg = json.load(open(".devwork/smol_config.json"))
torch.manual_seed(0)
t = time.time()
LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(folder)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".devwork/smol/{f}", folder)
print(f"random model saved in {time.time() - t:.1f}s", flush=True)

import minillm
ids = np.random.default_rng(0).integers(100, cfg["vocab_size"], 1500)
gpu = minillm.load(folder, backend="cupy")
cpu = minillm.load(folder, backend="numpy")
for attention in ("lminfinite", "full"):
    kw = dict(attention=attention, n_local=512) if attention == "lminfinite" else dict(attention="full")
    a = gpu.session(**kw).nll(ids, chunk_size=256)
    b = cpu.session(**kw).nll(ids, chunk_size=256)
    print(attention, "max |nll cupy - nll numpy| =", float(np.abs(np.asarray(a)[1:] - np.asarray(b)[1:]).max()), flush=True)
del gpu, cpu
for backend in ("cupy", "numpy"):
    r = subprocess.run(["minillm", "bench", folder, "--backend", backend, "--json"],
                       capture_output=True, text=True, timeout=150)
    print(backend, r.returncode, r.stdout.strip(), r.stderr.strip()[-400:], flush=True)
