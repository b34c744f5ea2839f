"""Long-stream scoring benchmark (issue 3): NLL by position, tokens/s and RSS, start vs end.

Scores a real text stream with one attention setting per run, each run in its own process so
that peak RSS is its own. The stream is the Python standard library's *.py files (or the
files given with --text), repeated as often as needed (said in the report: a repeating stream
is easier than fresh text). Per chunk it logs position, wall and CPU seconds and current RSS.

    python benchmarks/long_stream.py run --name lminfinite-8k --tokens 100000 --out OUT
    python benchmarks/long_stream.py run --name lminfinite-2k --n-local 2048 --tokens 1000000 \
        --out OUT
    python benchmarks/long_stream.py run --name full --attention full --tokens 32768 --out OUT
    python benchmarks/long_stream.py report OUT        # markdown tables + OUT/nll.png
    python benchmarks/long_stream.py report OUT --start-at 40000   # start window elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from texts import RepeatedFiles, add_text_option, text_files

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "weights" / "smollm2-135m-instruct.safetensors"
WINDOW = 20_000  # tokens over which start and end speeds are measured


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def run(args) -> None:
    import minillm
    from minillm.scoring import Scorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = minillm.load(MODEL, backend="numpy")
    session = model.session(args.attention, n_global=args.n_global, n_local=args.n_local)
    scorer = Scorer(session, chunk_size=512, max_tokens=args.tokens)
    log = open(out / f"{args.name}.jsonl", "w")
    sums = {}  # log2 bucket -> [nll sum, count]
    t0, c0 = time.perf_counter(), time.process_time()

    def on_chunk(sc, first, ids, nll):
        pos = np.arange(first, first + len(nll))
        ok = ~np.isnan(nll)
        for b in np.unique(np.floor(np.log2(np.maximum(pos[ok], 1) / 2048) + 1).clip(0)):
            sel = ok & (np.floor(np.log2(np.maximum(pos, 1) / 2048) + 1).clip(0) == b)
            s = sums.setdefault(int(b), [0.0, 0])
            s[0] += float(nll[sel].sum(dtype=np.float64))
            s[1] += int(sel.sum())
        log.write(json.dumps({"pos": first + len(nll), "wall": time.perf_counter() - t0,
                              "cpu": time.process_time() - c0, "rss_mb": rss_mb(),
                              "nll_sum": float(np.nansum(nll, dtype=np.float64)),
                              "n": int(ok.sum())}) + "\n")
        log.flush()
        if sc.stats.tokens % 51200 < 512:
            print(f"{args.name}: {sc.stats.tokens} tokens, {sc.stats.tokens_per_second:.0f} tok/s, "
                  f"rss {rss_mb():.0f} MB", file=sys.stderr, flush=True)

    stats = scorer.run(RepeatedFiles(text_files(args.text)), on_chunk=on_chunk)
    summary = dict(stats.summary(), name=args.name, attention=args.attention,
                   n_global=session.spec.n_global, n_local=session.spec.n_local,
                   peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   buckets={k: v for k, v in sorted(sums.items())},
                   blas=_blas())
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1))


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info
        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        return ", ".join(f"{i['internal_api']} {i.get('architecture')} x{i['num_threads']}"
                         for i in info)
    except ImportError:
        return "unknown"


def bucket_label(b: int) -> str:
    lo = 0 if b == 0 else 2048 * 2 ** (b - 1)
    hi = 2048 * 2 ** b

    def k(n):
        return f"{n // 1024}K" if n < 1 << 20 else f"{n / (1 << 20):g}M"

    return f"{k(lo)}–{k(hi)}"


def window_stats(rows, lo, hi):
    """tokens/s (wall), CPU ms per token and mean RSS over the chunks ending in (lo, hi]."""
    sel = [r for r in rows if lo < r["pos"] <= hi]
    if len(sel) < 2:
        return None
    a, b = sel[0], sel[-1]
    n = b["pos"] - a["pos"]
    return {"tps": n / (b["wall"] - a["wall"]), "cpu_ms": 1e3 * (b["cpu"] - a["cpu"]) / n,
            "rss": float(np.mean([r["rss_mb"] for r in sel]))}


def peak_rss_mb(run: dict) -> float:
    """ru_maxrss is KiB; the first runs stored it divided by 1000 as peak_rss_mb."""
    kib = run["peak_rss_kib"] if "peak_rss_kib" in run else run["peak_rss_mb"] * 1e3
    return kib * 1024 / 1e6


def report(args) -> None:
    out = Path(args.out)
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    labels = sorted({int(b) for r in runs for b in r["buckets"]})
    print("| run | tokens | " + " | ".join(bucket_label(b) for b in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for r in runs:
        cells = []
        for b in labels:
            s = r["buckets"].get(str(b))
            cells.append(f"{s[0] / s[1]:.3f}" if s and s[1] else "")
        print(f"| {r['name']} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    print()
    print("| run | tok/s start | tok/s end | CPU ms/token start | end | RSS MB start | end | "
          "peak RSS MB | overall tok/s | BLAS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    curves = {}
    for r in runs:
        rows = [json.loads(line) for line in open(out / f"{r['name']}.jsonl")]
        end = rows[-1]["pos"]
        start = args.start_at if args.start_at is not None else 2 * (r["n_local"] or 2048)
        first = window_stats(rows, start, start + WINDOW)
        last = window_stats(rows, end - WINDOW, end)
        print(f"| {r['name']} | {_cell(first, 'tps', '.1f')} | {_cell(last, 'tps', '.1f')} | "
              f"{_cell(first, 'cpu_ms', '.2f')} | {_cell(last, 'cpu_ms', '.2f')} | "
              f"{_cell(first, 'rss', '.0f')} | {_cell(last, 'rss', '.0f')} | "
              f"{peak_rss_mb(r):.0f} | {r['tokens_per_second']:.1f} | {r['blas']} |")
        curves[r["name"]] = _curve(rows)
    from minillm.plot import plot_curves
    plot_curves(str(out / "nll.png"), curves, title="SmolLM2-135M on a repeated real-text stream",
                training_length=8192)
    print(f"\nplot: {out / 'nll.png'}")


def _cell(window, key: str, fmt: str) -> str:
    """A window_stats() value formatted for the table, or a dash when there is no window."""
    return format(window[key], fmt) if window else "–"


def _curve(rows):
    """Mean NLL per log-spaced position window, from the per-chunk sums."""
    pos = np.array([r["pos"] for r in rows], dtype=float)
    s = np.array([r["nll_sum"] for r in rows])
    n = np.array([r["n"] for r in rows])
    edges = np.unique(np.geomspace(512, pos[-1] + 1, 40).astype(int))
    idx = np.searchsorted(edges, pos)
    xs, ys = [], []
    for i in np.unique(idx):
        sel = idx == i
        if n[sel].sum():
            xs.append(float(pos[sel].mean()))
            ys.append(float(s[sel].sum() / n[sel].sum()))
    return np.array(xs), np.array(ys)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--attention", default="lminfinite", choices=["lminfinite", "window", "full"])
    r.add_argument("--n-global", type=int, default=None)
    r.add_argument("--n-local", type=int, default=None)
    r.add_argument("--tokens", type=int, required=True)
    r.add_argument("--out", required=True)
    add_text_option(r)
    rep = sub.add_parser("report")
    rep.add_argument("out")
    rep.add_argument("--start-at", type=int, default=None,
                     help="position where the 'start' speed window begins [default: 2 x n_local]")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
