"""How to spread a long chunk over this machine's cores, chosen by measuring (NumPy only).

Two settings decide a prompt's speed besides BLAS itself, and their best values differ
between machines (BENCHMARKS.md, issue 14): how many threads share a long chunk, each with
single-threaded BLAS, against one thread and BLAS's own threading (parallel.set_workers);
and how many bytes of scores a query block fills (workspace.set_score_budget), which decides
whether the softmax passes stay in the core's cache. A constant tuned on one CPU was a loss
on another, so the first load of a model on a machine times one layer of it on a prompt-like
chunk with each candidate (a few hundred milliseconds) and keeps the fastest.

The result is cached in `$XDG_CACHE_HOME/minillm/calibration.json` (default ~/.cache), one
entry per machine, BLAS build and model shape, and reused while all three stay the same.
MINILLM_CALIBRATE=refresh measures again (as does `minillm calibrate`); MINILLM_CALIBRATE=off
keeps the built-in defaults and touches no file.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import parallel, workspace
from .bench import blas_kernel, cpu_model
from .errors import MiniLLMError

SCORE_BUDGETS = (1 << 20, 4 << 20, 16 << 20)
CHUNK = 256         # rows of the measured chunk
CACHED_BEFORE = 768  # keys already in the cache when it comes (scores of a long prompt)
REPEATS = 3
SPIN_S = 0.15
MARGIN = 0.05       # a candidate must beat the default by this much to replace it (noise)
ENV = "MINILLM_CALIBRATE"
VERSION = 1


@dataclass(frozen=True)
class Settings:
    workers: int
    score_budget: int


def defaults() -> Settings:
    return Settings(parallel.default_workers(), workspace.SCORE_BUDGET_BYTES)


def candidate_workers(cores: int) -> list[int]:
    """1 (BLAS threads the chunk), then 2, 4, ... threads each on its own rows, and all cores."""
    out, n = [1], 2
    while n <= cores:
        out.append(n)
        n *= 2
    if cores > 1 and cores not in out:
        out.append(cores)
    return out


def choose(measured: dict, default: Settings) -> Settings:
    """The settings from measurements {"workers": {n: seconds}, "score_budget": {bytes:
    seconds}}: for each, the fastest candidate, unless the default is within MARGIN of it
    (noise must not flip a setting back and forth). Deterministic given the measurements."""
    return Settings(_best(measured["workers"], default.workers),
                    _best(measured["score_budget"], default.score_budget))


def _best(times: dict, default_value: int) -> int:
    times = {int(k): float(v) for k, v in times.items()}  # JSON gives the keys back as str
    fastest = min(times, key=lambda k: (times[k], k))
    if default_value in times and times[default_value] <= times[fastest] * (1 + MARGIN):
        return default_value
    return fastest


def blas_build() -> str:
    return blas_kernel()


def machine_key(cfg) -> str:
    """What the measurements hold for: the CPU, the cores usable, the BLAS build and its
    threads, NumPy, and the model's shape."""
    shape = (cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    return json.dumps({"cpu": cpu_model(), "cores": parallel.usable_cores(),
                       "blas": blas_build(), "numpy": np.__version__,
                       "shape": shape, "version": VERSION}, sort_keys=True)


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minillm" / "calibration.json"


def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again and rewrite it


def _write_cache(path: Path, entries: dict) -> None:
    from .files import replace_atomically
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_atomically(str(path)) as f:
            f.write(json.dumps(entries, indent=1).encode())
    except (OSError, MiniLLMError) as e:  # a read-only home costs a re-measure next time
        warnings.warn(f"could not save the calibration to {path}: {e}", stacklevel=3)


def settings_for(model, refresh: bool = False) -> tuple[Settings, dict | None]:
    """(the settings for this model on this machine, the measurements behind them or None
    when the defaults stand). Measures only when the cache holds no valid entry, or when
    asked to (refresh=True, even with MINILLM_CALIBRATE=off; or MINILLM_CALIBRATE=refresh)."""
    mode = os.environ.get(ENV, "").strip().lower()
    if model.xp is not np or (mode == "off" and not refresh):
        return defaults(), None
    refresh = refresh or mode == "refresh"
    path, key = cache_path(), machine_key(model.config)
    entries = _read_cache(path)
    entry = entries.get(key)
    if not refresh and _valid(entry):
        return Settings(**entry["settings"]), entry["measured"]
    start = time.perf_counter()
    measured = measure(model)
    measured["seconds"] = time.perf_counter() - start
    settings = choose(measured, defaults())
    entries[key] = {"settings": asdict(settings), "measured": measured, "when": time.time()}
    _write_cache(path, entries)
    return settings, measured


def _valid(entry) -> bool:
    try:
        s = entry["settings"]
        return (isinstance(entry["measured"], dict) and s["workers"] >= 1
                and isinstance(s["workers"], int) and isinstance(s["score_budget"], int)
                and s["score_budget"] >= 4)
    except (KeyError, TypeError):
        return False


def apply(settings: Settings) -> None:
    """The settings for the whole process (the last model loaded sets them), except a split
    the program chose itself (parallel.set_workers)."""
    parallel.use_calibrated(settings.workers)
    workspace.set_score_budget(settings.score_budget)


def measure(model) -> dict:
    """Seconds of one layer of the model over a CHUNK-token chunk after CACHED_BEFORE cached
    keys, for each worker count (default score budget), then for each score budget (the
    chosen worker count). The process's settings are as they were after."""
    default = defaults()
    budget_before = workspace.score_budget()
    layer = _OneLayer(model)
    try:
        with parallel.trying(default.workers):
            layer.run()  # pages the layer's weights in and starts the BLAS threads
        times_w = _rounds(layer, {n: (n, default.score_budget)
                                  for n in candidate_workers(parallel.thread_limit())})
        workers = _best(times_w, default.workers)
        times_b = _rounds(layer, {b: (workers, b) for b in SCORE_BUDGETS})
    finally:
        workspace.set_score_budget(budget_before)
    return {"workers": times_w, "score_budget": times_b}


def _rounds(layer: _OneLayer, candidates: dict) -> dict:
    """Each candidate's best time of REPEATS runs after one untimed run (which also fills its
    buffers). Going from BLAS's own threading to a split, it first waits SPIN_S: BLAS's idle
    threads spin for about 0.1 s after a threaded call and took a core from the split runs
    that followed, which a real feed, split throughout, never meets."""
    best, previous = {}, None
    for name, (workers, budget) in candidates.items():
        if workers > 1 and previous == 1:
            time.sleep(SPIN_S)
        previous = workers
        workspace.set_score_budget(budget)
        with parallel.trying(workers):
            layer.run()
            best[name] = min(layer.run() for _ in range(REPEATS))
    return best


class _OneLayer:
    """The model's first layer alone, over a chunk that follows CACHED_BEFORE random keys."""

    def __init__(self, model):
        from .attention import attention_spec
        from .cache import KVCache
        from .weights import Weights

        cfg = model.config
        self.cfg = type(cfg).from_dict({**json.loads(cfg.to_json()), "num_hidden_layers": 1})
        w = model.weights
        self.weights = Weights(w.embed, w.layers[:1], w.norm, w.lm_head)
        self.freq = model.freq
        self.spec = attention_spec(self.cfg, "lminfinite", n_local=CACHED_BEFORE + CHUNK)
        self.cache = KVCache(self.cfg, self.spec.n_global, self.spec.n_local, np)
        rng = np.random.default_rng(0)
        self.cache.k[...] = rng.standard_normal(self.cache.k.shape, dtype=np.float32)
        self.cache.v[...] = rng.standard_normal(self.cache.v.shape, dtype=np.float32)
        self.cache.pos[:CACHED_BEFORE] = np.arange(CACHED_BEFORE)
        self.cache.length = CACHED_BEFORE
        self.ids = rng.integers(0, cfg.vocab_size, CHUNK)
        self.positions = np.arange(CACHED_BEFORE, CACHED_BEFORE + CHUNK)
        self.works: dict = {}

    def run(self) -> float:
        """Seconds of one forward pass (the cache is only read: every run does the same)."""
        from .model import forward_staged
        from .workspace import Workspace

        settings = parallel.workers(), workspace.score_budget()
        if settings not in self.works:  # its buffers reused, as a session's are
            self.works[settings] = Workspace(1, np)
        work = self.works[settings]
        with parallel.chunk_threads(parallel.parts_for(CHUNK, np)):
            t = time.perf_counter()
            forward_staged(self.weights, self.cfg, self.freq, self.ids, self.positions,
                           self.spec, self.cache, work)
            return time.perf_counter() - t
