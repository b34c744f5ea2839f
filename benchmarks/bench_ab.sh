#!/usr/bin/env bash
# A/B of two checkouts of minillm: `minillm bench --json` alternating between them in fresh
# processes, ROUNDS times (one JSON line per run, prefixed by the checkout's folder name).
# Usage: benchmarks/bench_ab.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]
# Each checkout runs with its own .venv, or with $PYTHON for both (a checkout's own minillm is
# imported either way: the command runs in the checkout, which comes first on sys.path);
# $MODEL: the weights (default: the checkout's weights/smollm2-135m-instruct.safetensors).
set -euo pipefail
old="$1" new="$2" rounds="${3:-3}"
model="${MODEL:-weights/smollm2-135m-instruct.safetensors}"
for _ in $(seq "$rounds"); do
    for tree in "$old" "$new"; do
        printf "%s " "$(basename "$tree")"
        (cd "$tree" && env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "${PYTHON:-.venv/bin/python}" \
            -c 'import sys; from minillm_cli import main; sys.argv[0] = "minillm"; main()' \
            bench "$model" --json 2>/dev/null)
    done
done
