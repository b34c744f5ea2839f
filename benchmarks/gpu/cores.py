"""Many-core check: prompt/score tok/s by worker count on the device's CPU (numpy backend)."""
import json, shutil, time, sys
import numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
folder = "/tmp/smol"
cfg = json.load(open(".devwork/smol_config.json"))
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(folder)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".devwork/smol/{f}", folder)
import minillm
from minillm import parallel
m = minillm.load(folder, backend="numpy")
ids = np.random.default_rng(0).integers(100, cfg["vocab_size"], 2048)
default = parallel.workers()
print("default workers", default, flush=True)
m.session().feed(ids[:512], logits="last")
def rate(fn, n):
    fn(); t = time.perf_counter(); fn(); return round(n / (time.perf_counter() - t), 1)
for w in (1, 2, 4, 8, 16, 1):
    parallel.set_workers(w)
    r = dict(p512=rate(lambda: m.session().feed(ids[:512], logits="last"), 512),
             p2048=rate(lambda: m.session().feed(ids, logits="last"), 2048),
             score=rate(lambda: m.session().nll(ids, chunk_size=512), 2048))
    print(w, r, flush=True)
