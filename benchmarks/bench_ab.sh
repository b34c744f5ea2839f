#!/usr/bin/env bash
# A/B of two checkouts of minillm: `minillm bench --json` alternating between them in fresh
# processes, ROUNDS times. Each checkout needs its own .venv (make install) and the weights.
# Usage: benchmarks/bench_ab.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]   (one JSON line per run)
set -euo pipefail
old="$1" new="$2" rounds="${3:-3}"
for _ in $(seq "$rounds"); do
    for tree in "$old" "$new"; do
        printf "%s " "$(basename "$tree")"
        (cd "$tree" && env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/minillm bench \
            weights/smollm2-135m-instruct.safetensors --json 2>/dev/null)
    done
done
