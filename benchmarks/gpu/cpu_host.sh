#!/bin/bash
# The device host's CPU (16 cores), issue 14: calibration, `minillm bench` with its floors, the
# chunk split by hand, the decode step against the chunk path, the decode step by BLAS thread
# count, then the CPU-side tests on the CuPy backend. Run through the device tool with the
# files of this folder and the SmolLM2 tokenizer (smol/) copied into .devwork/ (see README.md).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE MINILLM_CALIBRATE
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
lscpu | grep -E "Model name|^CPU\(s\)|Thread|L2|L3" ; grep -o -w -E "avx512f|avx2|amx_tile" /proc/cpuinfo | sort | uniq -c
timeout 300 python3 .devwork/cpu_host.py 2>&1 | tee $OUT/cpu.log
timeout 150 python3 .devwork/decode_threads.py 2>&1 | tee $OUT/decode_threads.log
timeout 60 minillm calibrate /tmp/smol 2>&1 | tee $OUT/calibrate.log
MINILLM_TEST_BACKEND=cupy timeout 120 python3 -m pytest -q -x -p no:cacheprovider -m "not real_model" tests/test_forward.py tests/test_lminfinite.py tests/test_batch.py tests/test_decode.py tests/test_calibrate.py > $OUT/pytest_cupy.log 2>&1
echo "cupy pytest rc=$?"; tail -15 $OUT/pytest_cupy.log
