"""The regression corpus: every input that once broke a reader, kept as a description.

tests/fuzz_corpus/<reader>/<hash>.json holds {"seed", "ops"} (see mutate), "found", what the
reader did with it then, and "expect", what it does since the fix ("refused" or "loaded"; a
crash kept by a campaign has none until someone fixes the reader). A description is a few
hundred bytes where the file it stands for is ~100 KB, and it replays on the seeds, which are
built the same way on every machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "fuzz_corpus"


def key(description: dict) -> str:
    canonical = json.dumps({"seed": description["seed"], "ops": description["ops"]},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save(reader: str, description: dict, found: str, expect: str | None = None,
         folder: Path = CORPUS) -> Path:
    """Keep an input; `expect` ("refused" or "loaded") once the reader is fixed."""
    path = folder / reader / f"{key(description)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"seed": description["seed"], "ops": description["ops"], "found": found}
    if expect is not None:
        entry["expect"] = expect
    path.write_text(json.dumps(entry) + "\n")
    return path


def entries(folder: Path = CORPUS) -> list[tuple[str, Path]]:
    """(reader, path) of every stored input, in a stable order."""
    return [(p.parent.name, p) for p in sorted(folder.glob("*/*.json"))]


def load(path: Path) -> dict:
    return json.loads(path.read_text())
