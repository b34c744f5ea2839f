"""RssAnon of a session with top-k middle attention while it reads a long text (issue 11).

Reads L tokens of the Python standard library's source in feeds of 8,192 tokens (top-k off
during the prompt, as topk_speed.py reads it) and prints after each: RssAnon and the memory
Python's tracemalloc tracks (NumPy's arrays included); then RssAnon after glibc's
malloc_trim. The text is tokenized up front, so the first line already holds the
tokenizer's memory for the whole text.

    taskset -c 1 env OPENBLAS_NUM_THREADS=1 MINILLM_CALIBRATE=off .venv/bin/python \\
        benchmarks/topk_memory.py 57344
"""

import ctypes
import sys
import tracemalloc
from pathlib import Path

from topk_speed import stdlib_ids

import minillm
from minillm.passkey import process_memory

ROOT = Path(__file__).resolve().parent.parent
L = int(sys.argv[1])
tracemalloc.start()
model = minillm.load(ROOT / "weights" / "smollm2-135m-instruct.safetensors")
ids = stdlib_ids(model, L + 4)
with model.session(top_k_middle=5, middle_dir="/tmp") as s:
    for a in range(0, L, 8192):
        s.feed(ids[a:min(L, a + 8192)], logits="none", top_k_middle=False)
        cur, peak = tracemalloc.get_traced_memory()
        print(a + 8192, "rss_anon", process_memory().get("rss_anon"), "traced MB",
              round(cur / 1e6, 1), flush=True)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print("after malloc_trim rss_anon", process_memory().get("rss_anon"), flush=True)
