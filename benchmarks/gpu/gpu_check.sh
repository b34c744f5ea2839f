#!/bin/bash
# One device run: the test suite on the CuPy backend, then bench on a SmolLM2-shaped random model.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi -L
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, cupy.cuda.runtime.getDeviceCount())"
which minillm
MINILLM_TEST_BACKEND=cupy timeout ${TEST_LIMIT:-300} python3 -m pytest -q --maxfail=30 -p no:cacheprovider --timeout 120 ${TESTS:-tests} > $OUT/pytest_cupy.log 2>&1
echo "pytest rc=$?"; tail -60 $OUT/pytest_cupy.log
timeout ${BENCH_LIMIT:-200} python3 .devwork/gpu_bench.py 2>&1 | tee $OUT/bench.log
