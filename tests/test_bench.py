"""`minillm bench --json` reports the keys docs/DESIGN.md pins ("Interfaces others rely on"),
with plausible values."""

import json

from click.testing import CliRunner
from helpers import BACKEND

from minillm_cli.main import cli

KEYS = {"prompt_512_tps", "prompt_2048_tps", "decode_tps", "score_tps", "peak_rss_mb",
        "blas_kernel"}


def test_bench_json(tiny_dir):
    folder, _ = tiny_dir("gqa")
    result = CliRunner().invoke(cli, ["bench", str(folder), "--json", "--repeats", "1",
                                      "--backend", BACKEND])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == KEYS
    assert all(report[k] > 0 for k in KEYS - {"blas_kernel"})
    assert isinstance(report["blas_kernel"], str) and report["blas_kernel"]
