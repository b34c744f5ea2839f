"""Where minillm's time and memory go, on the real model (the hot-spot table in BENCHMARKS.md).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/hotspots.py

1. Time: cProfile over prompt 2048 (last logits), decode (128 tokens after 512) and score
   (2048 tokens, 512-token chunks); each row is a function's inclusive share of the run.
   "qkv/o GEMMs + residual" is the own time of block()'s row phases (attention_input,
   attention_residual, mlp_residual): the projections are GEMMs there. cProfile sees one
   thread only, so the profile runs with one worker (BLAS threaded, as before the split); the
   last row times each workload with the default split over threads, unprofiled.
2. Decode floors: the decode step's GEMVs alone (one row through every weight matrix and the
   lm_head: the weight reads), and decode of a model with SmolLM2's 30 layers and heads but
   tiny matrices (the per-token cost of the Python and NumPy calls themselves).
3. Memory: scoring with the default window (n_local 8192): the weights, the session's cache
   and scratch, the logits rows, and the largest temporaries of a chunk (tracemalloc peak).
4. GEMM speed: one 512-token chunk through layer 0's projection matrices, NumPy's BLAS against
   torch's on the same shapes and threads (when torch is installed).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

import minillm
from minillm import parallel
from minillm.bench import bench_ids, blas_kernel, gemv_floor_ms

ROOT = Path(__file__).resolve().parent.parent
ROWS = [  # (label, inclusive time of these functions, own time of these); "file:function"
    ("attention (scores, softmax, values)", ("attention.py:attend", "decode.py:_attend"), ()),
    ("MLP (gate/up GEMM, SiLU, down GEMM)", ("model.py:mlp",), ()),
    ("qkv/o GEMMs + residual (block's own)", (),
     ("model.py:attention_input", "model.py:attention_residual", "model.py:mlp_residual")),
    ("decode step: weight products (GEMVs)", ("decode.py:weight_product",), ()),
    ("decode step: the rest of its layers (norms, RoPE, SiLU, copies)", (),
     ("decode.py:_layer", "decode.py:_rms_norm")),
    ("RoPE", ("rope.py:apply_rope",), ()),
    ("RMSNorm", ("model.py:rms_norm",), ()),
    ("masks (per chunk)", ("attention.py:plan_chunk",), ()),
    ("lm_head (last logits)", ("model.py:lm_head",), ()),
    ("lm_head + log-softmax (score)", ("session.py:_nll_of_rows",), ()),
]


def profile(fn) -> tuple[float, dict]:
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(pr).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def seconds(names, column):  # column 3: inclusive (cumtime), 2: own (tottime)
        return sum(v[column] for (f, _, n), v in stats.items()
                   if f"{Path(f).name}:{n}" in names and "minillm" in f)

    share = {label: seconds(inclusive, 3) + seconds(own, 2) for label, inclusive, own in ROWS}
    return wall, share


def workloads(model):
    ids = bench_ids(model, 2048)

    def decode():
        s = model.session()
        token = int(np.argmax(s.feed(ids[:512], logits="last")))
        for _ in range(128):
            token = int(np.argmax(s.feed([token], logits="last")))

    return {
        "prompt 2048": lambda: model.session().feed(ids, logits="last"),
        "decode 128 after 512": decode,
        "score 2048": lambda: model.session().nll(ids, chunk_size=512),
    }


def time_table(model) -> str:
    runs, threaded = {}, {}
    workers = parallel.workers()
    for name, fn in workloads(model).items():
        parallel.set_workers(1)
        fn()  # warm-up
        runs[name] = profile(fn)
        parallel.set_workers(workers)
        fn()
        t = time.perf_counter()
        fn()
        threaded[name] = time.perf_counter() - t
    names = list(runs)
    lines = ["| share of run time | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, *_ in ROWS:
        cells = [runs[n][1][label] / runs[n][0] for n in names]
        if any(c > 0.005 for c in cells):
            lines.append(f"| {label} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    lines.append("| wall seconds (under cProfile, one worker) | "
                 + " | ".join(f"{runs[n][0]:.2f}" for n in names) + " |")
    lines.append(f"| wall seconds ({workers} workers, no profiler) | "
                 + " | ".join(f"{threaded[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def dispatch_floor(model, tmp: Path) -> str:
    """ms/token of decode for SmolLM2's layer and head structure with tiny matrices."""
    import json

    from minillm.formats.safetensors import write_safetensors
    from minillm.weights import expected_shapes

    cfg = json.loads(model.config.to_json())
    cfg.update(hidden_size=cfg["num_attention_heads"] * 4, intermediate_size=8, head_dim=4,
               vocab_size=model.config.vocab_size)
    from minillm.config import Config
    small = Config.from_dict(cfg)
    rng = np.random.default_rng(0)
    shapes = expected_shapes(small)
    path = tmp / "floor.safetensors"
    meta = {"minillm.format": "1", "minillm.config": small.to_json(),
            "minillm.tokenizer_json": model_tokenizer_json(model)}
    write_safetensors(str(path), shapes.items(),
                      lambda k: rng.standard_normal(shapes[k]).astype(np.float32) * 0.1,
                      metadata=meta)
    before = os.environ.get("MINILLM_CALIBRATE")
    os.environ["MINILLM_CALIBRATE"] = "off"  # its settings would replace the real model's
    try:
        tiny = minillm.load(path, backend="numpy")
    finally:
        os.environ.pop("MINILLM_CALIBRATE")
        if before is not None:
            os.environ["MINILLM_CALIBRATE"] = before

    def per_token(m):
        s = m.session()
        s.feed(bench_ids(m, 512), logits="none")
        t = time.perf_counter()
        for i in range(128):
            s.feed([i + 100], logits="last")
        return (time.perf_counter() - t) / 128 * 1e3

    floor = min(per_token(tiny) for _ in range(3))
    real = min(per_token(model) for _ in range(3))
    gemv = gemv_floor_ms(model)  # best of minillm.bench's repeats
    return (f"decode ms/token: SmolLM2 {real:.1f}; its GEMVs alone (one row through every "
            f"weight matrix and the lm_head, nothing else) {gemv:.1f}; the same structure with "
            f"tiny matrices {floor:.1f} (the dispatch floor, {floor / real:.0%} of the real "
            f"step; the tiny model's lm_head still reads a {tiny.config.vocab_size}-row "
            f"embedding)")


def gemm_rates(model, rows: int = 512) -> str:
    """GFLOP/s of one prompt chunk's projection GEMMs (rows x every layer-0 matrix), NumPy's
    BLAS against torch's (MKL) when torch is installed, same threads; best of 5."""
    lw = model.weights.layers[0]
    mats = [lw.w_qkv, lw.wo, lw.w_gate_up, lw.w_down]
    flops = sum(2 * rows * m.shape[0] * m.shape[1] for m in mats)
    xs = [np.random.default_rng(0).standard_normal((rows, m.shape[1]), np.float32) for m in mats]

    def best(fn):
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times) / 1e9

    ours = best(lambda: [x @ m.T for x, m in zip(xs, mats)])
    line = f"projection GEMMs of a {rows}-token chunk: NumPy ({blas_kernel()}) {ours:.0f} GFLOP/s"
    try:
        import torch
    except ImportError:
        return line + "; torch not installed"
    torch.set_num_threads(max(1, parallel.workers()))
    tx, tm = [torch.from_numpy(x) for x in xs], [torch.from_numpy(np.array(m)) for m in mats]
    with torch.inference_mode():
        theirs = best(lambda: [x @ m.T for x, m in zip(tx, tm)])
    return line + f", torch {torch.__version__} {theirs:.0f} GFLOP/s ({ours / theirs:.2f}x)"


def model_tokenizer_json(model) -> str:
    from minillm.formats.safetensors import SafetensorsFile
    return SafetensorsFile(model.path).metadata["minillm.tokenizer_json"]


def memory_table(model) -> str:
    w = model.weights
    arrays = [w.embed, w.norm] + ([] if w.lm_head is w.embed else [w.lm_head])
    for lw in w.layers:
        arrays += [lw.attn_norm, lw.w_qkv, lw.wo, lw.mlp_norm, lw.w_gate_up, lw.w_down]
    weights_mb = sum(a.nbytes for a in arrays) / 1e6
    ids = bench_ids(model, 2048)
    s = model.session()
    s.nll(ids[:1536], chunk_size=512)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    s.nll(ids[1536:], chunk_size=512)  # one 512-token chunk, cache well filled
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    c, work = s.cache, s.workspace
    rows = [
        ("weights (float32; shared page cache when memory-mapped)", weights_mb),
        ("KV cache: K, V, un-rotated global K, positions", c.nbytes / 1e6),
        ("attention score scratch (one query block per worker)",
         sum(a.nbytes for a in work._scores) / 1e6),
        ("per-chunk buffers (norms, qkv, RoPE, attention, MLP; 512 rows)",
         sum(b.nbytes for b in work._buffers.values()) / 1e6),
        ("logits rows for NLL (128 x vocab)", work.logits_rows.nbytes / 1e6),
        ("activations: peak temporaries of a 512-token chunk (tracemalloc)", peak / 1e6),
    ]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    lines = ["| scoring, default window (n_local 8192) | MB |", "|---|---|"]
    lines += [f"| {label} | {mb:.1f} |" for label, mb in rows]
    lines.append(f"| process peak RSS (after all of the above) | {rss:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct.safetensors"))
    p.add_argument("--tmp", default=str(ROOT / "build" / "hotspots"))
    args = p.parse_args()
    model = minillm.load(args.model, backend="numpy")
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"kernel: {blas_kernel()}\n")
    print(time_table(model) + "\n")
    print(dispatch_floor(model, tmp) + "\n")
    print(memory_table(model) + "\n")
    print(gemm_rates(model))  # last: importing torch would raise the peak RSS above


if __name__ == "__main__":
    main()
