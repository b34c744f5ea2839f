"""`minillm bench --json` reports the keys docs/DESIGN.md pins ("Interfaces others rely on"),
with plausible values, and the machine's floors beside them."""

import json
import math
from types import SimpleNamespace

from click.testing import CliRunner
from helpers import BACKEND

from minillm.bench import cpu_model, floors
from minillm_cli.main import bench_text, cli

FLOOR_KEYS = {"gemv_floor_ms", "gemv_floor_tps", "gemm_floor_tps", "gemm_floor_gflops"}
MACHINE_KEYS = {"cpu", "cores"}
KEYS = {"prompt_512_tps", "prompt_2048_tps", "decode_tps", "score_tps", "peak_rss_mb",
        "blas_kernel"} | FLOOR_KEYS | MACHINE_KEYS


def test_bench_json(tiny_dir):
    folder, _ = tiny_dir("gqa")
    result = CliRunner().invoke(cli, ["bench", str(folder), "--json", "--repeats", "1",
                                      "--backend", BACKEND])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == KEYS
    assert isinstance(report["blas_kernel"], str) and report["blas_kernel"]
    assert isinstance(report["cpu"], str) and report["cpu"]
    numbers = KEYS - {"blas_kernel", "cpu"} - (FLOOR_KEYS if BACKEND == "cupy" else set())
    assert all(report[k] > 0 for k in numbers)


def test_floors_of_the_tiny_model(tiny_model):
    f = floors(tiny_model)
    assert set(f) == FLOOR_KEYS | MACHINE_KEYS
    assert f["cpu"] and f["cores"] >= 1
    if BACKEND == "cupy":
        assert all(f[k] is None for k in FLOOR_KEYS)
        return
    assert all(math.isfinite(f[k]) and f[k] > 0 for k in FLOOR_KEYS)
    assert math.isclose(f["gemv_floor_tps"], 1000 / f["gemv_floor_ms"])


def test_no_floors_off_numpy():
    f = floors(SimpleNamespace(xp=object()))  # a CuPy model: the floors are NumPy's
    assert all(f[k] is None for k in FLOOR_KEYS)
    assert f["cpu"]


def test_cpu_model():
    name = cpu_model()
    assert isinstance(name, str) and name.strip()


def test_bench_text_puts_rates_beside_their_floors():
    result = {"prompt_512_tps": 500.0, "prompt_2048_tps": 400.0, "decode_tps": 30.0,
              "score_tps": 450.0, "peak_rss_mb": 600.0, "blas_kernel": "openblas x",
              "cpu": "Some CPU", "cores": 2, "gemv_floor_ms": 25.0, "gemv_floor_tps": 40.0,
              "gemm_floor_tps": 1000.0, "gemm_floor_gflops": 200.0}
    text = bench_text(result)
    assert "cpu: Some CPU (2 usable cores)" in text
    assert "decode_tps: 30.0 (GEMV floor 40.0 tok/s: 0.75x)" in text
    assert "prompt_512_tps: 500.0 (GEMM floor 1000.0 tok/s: 0.50x)" in text
    assert "prompt_2048_tps: 400.0 (GEMM floor 1000.0 tok/s: 0.40x)" in text
    assert "blas_kernel: openblas x" in text
    none = bench_text({**result, **dict.fromkeys(FLOOR_KEYS)})
    assert "decode_tps: 30.0\n" in none and "gemv_floor_tps: n/a" in none
