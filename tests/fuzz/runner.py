"""Runs hypothesis over one reader: damaged files from `mutate`, judged by `targets`."""

from __future__ import annotations

import collections
import os
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from . import mutate, targets


@dataclass
class Result:
    reader: str
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    # a crash's signature -> (the first description that gave it, the error in one line)
    crashes: dict[str, tuple[dict, str]] = field(default_factory=dict)

    @property
    def inputs(self) -> int:
        return sum(self.outcomes.values())


def signature(err: BaseException) -> str:
    """Where an error comes from: its type and the innermost minillm frame (else the last)."""
    if isinstance(err, targets.ReaderBug):
        return f"ReaderBug: {str(err).split(':')[0]}"
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f"{os.sep}minillm{os.sep}" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(err).__name__} at {where}"


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def fuzz(reader: str, seeds, model, max_examples: int, random_seed: int | None = None,
         keep_going: bool = False, seed_names=None, trace_memory: bool = True,
         check=targets.check) -> Result:
    """Try `max_examples` damaged files on `reader`.

    random_seed: None for hypothesis's fixed derandomized sequence (tests), else the seed of a
    random search (a campaign prints it, so that a run can be repeated).
    keep_going=False: the first crash is shrunk by hypothesis and raised (a test).
    keep_going=True: every crash is recorded by signature and the search goes on (a campaign).
    seed_names: the seeds to start from (default: all of the reader's small seeds).
    """
    result = Result(reader)
    strategy = mutate.descriptions(reader, seed_names)
    with tempfile.TemporaryDirectory() as scratch:

        @settings(max_examples=max_examples, derandomize=random_seed is None, database=None,
                  deadline=None, print_blob=False, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate] if keep_going else [Phase.generate, Phase.shrink])
        @given(strategy)
        def one(description):
            data = mutate.apply(seeds, description)
            try:
                outcome = check(reader, data, model, Path(scratch), trace_memory=trace_memory)
            except Exception as err:
                if not keep_going:
                    raise
                result.crashes.setdefault(signature(err), (description, one_line(err)))
                outcome = "crashed"
            result.outcomes[outcome] += 1

        if random_seed is not None:
            one = hypothesis_seed(random_seed)(one)
        one()
    return result
