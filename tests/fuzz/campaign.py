"""The fuzz campaign (`make fuzz`, `python -m fuzz`): many damaged files per reader, counted
and timed.

    PYTHONPATH=tests python -m fuzz [--examples N] [--readers a,b] [--jobs J] [--seed S]
                                    [--real-gguf N] [--memory-gb G]

Each reader runs in its own process (J at a time), with its address space limited to what it
uses after warming up plus --memory-gb: an input that makes a reader allocate what the file
merely declares fails with MemoryError, which counts as a crash like any other exception
(tracemalloc, which the tests use instead, would triple the time per input). Every crash is
kept in tests/fuzz_corpus/<reader>/, which `make test` replays; the exit status is 1 if any.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from . import corpus, mutate, runner, seeds, targets


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", 2500)),
                   help="inputs per reader (default: $FUZZ_EXAMPLES or 2500)")
    p.add_argument("--readers", default=",".join(mutate.READERS))
    p.add_argument("--jobs", type=int, default=2, help="readers fuzzed at once")
    p.add_argument("--seed", type=int, default=None, help="hypothesis's random seed")
    p.add_argument("--real-gguf", type=int, default=0, metavar="N",
                   help="also N inputs made from SmolLM2's GGUF, when it is installed")
    p.add_argument("--memory-gb", type=float, default=2.0,
                   help="address space a reader may take beyond its own after warming up")
    return p.parse_args(argv)


def _limit_address_space(extra_bytes: int) -> None:
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, resource.RLIM_INFINITY))


def _campaign(job: tuple) -> dict:
    """One reader in this process: warm up on the seeds, limit memory, then fuzz."""
    reader, folder, real_gguf, examples, random_seed, memory = job
    import minillm

    seed_files = seeds.build_seeds(Path(folder), real_gguf)
    model = minillm.load(seed_files.model_file, backend="numpy")
    names = mutate.SEEDS_OF[reader] if reader != "real_gguf" else (seeds.REAL_GGUF_SEED,)
    kind = "gguf" if reader == "real_gguf" else reader
    for name in names:  # the seeds must load; this also allocates what every input reuses
        outcome = targets.check(kind, seed_files.bytes(name), model, trace_memory=False)
        assert outcome == "loaded", (name, outcome)
    _limit_address_space(int(memory * 2**30))
    start = time.perf_counter()
    result = runner.fuzz(kind, seed_files, model, examples, random_seed=random_seed,
                         keep_going=True, seed_names=names, trace_memory=False)
    return {"reader": reader, "outcomes": dict(result.outcomes), "crashes": result.crashes,
            "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    args = _arguments(argv)
    random_seed = args.seed if args.seed is not None else random.randrange(2**32)
    readers = [r for r in args.readers.split(",") if r]
    real_gguf = None
    if args.real_gguf:
        from helpers import smollm2_gguf
        real_gguf = smollm2_gguf()
        if real_gguf and os.path.isfile(real_gguf):
            readers.append("real_gguf")
        else:
            print("fuzz: SmolLM2's GGUF is not installed: --real-gguf skipped", flush=True)
    print(f"fuzz: {args.examples} inputs per reader ({args.real_gguf} from SmolLM2's GGUF), "
          f"hypothesis seed {random_seed}, {args.jobs} processes", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        seeds.build_seeds(Path(folder))  # once, before the processes start
        jobs = [(r, folder, real_gguf, args.real_gguf if r == "real_gguf" else args.examples,
                 random_seed, args.memory_gb) for r in readers]
        context = multiprocessing.get_context("spawn")  # no inherited hypothesis state
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            results = list(pool.map(_campaign, jobs))
    return _report(results, time.perf_counter() - start)


def _report(results: list[dict], wall: float) -> int:
    total = crashes = 0
    for r in results:
        n = sum(r["outcomes"].values())
        total += n
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
        print(f"fuzz: {r['reader']:>12}: {n:7d} inputs ({outcomes}) in {r['seconds']:.0f} s, "
              f"{n / max(r['seconds'], 1e-9):.0f}/s", flush=True)
        for signature, (description, message) in r["crashes"].items():
            reader = "gguf" if r["reader"] == "real_gguf" else r["reader"]
            path = corpus.save(reader, description, message)
            print(f"fuzz:   CRASH {signature}: {message}\n        kept as {path}", flush=True)
            crashes += 1
    print(f"fuzz: total {total} inputs, {crashes} distinct crashes, {wall:.0f} s wall time",
          flush=True)
    return 1 if crashes else 0

