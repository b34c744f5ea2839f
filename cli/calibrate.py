"""`minillm calibrate`: measure again how this machine runs a model's long chunks best."""

from __future__ import annotations

import json
import os

import click

from .common import load_model, model_argument, reports_errors, threads_option, write_stdout


@click.command()
@model_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@threads_option
@reports_errors
def calibrate(model, as_json, threads):
    """Measure how to spread MODEL's long chunks over this machine's cores, and remember it.

    Times one layer of MODEL over a 256-token chunk with each way of using the cores (one
    thread with BLAS's own threading, or 2, 4, ... threads each computing its own rows) and
    each query-block size, in turns, and keeps the fastest (the default unless another wins
    by over 5%). Loading a model does this by itself the first time on a machine (a few
    hundred milliseconds); run this to measure again, say on a machine that was busy then.
    The result is kept in $XDG_CACHE_HOME/minillm/calibration.json (default ~/.cache), per
    CPU, cores, BLAS build and model shape. MINILLM_CALIBRATE=off keeps the built-in
    defaults; MINILLM_CALIBRATE=refresh measures at every load.
    """
    from minillm.calibrate import cache_path, settings_for

    before = os.environ.get("MINILLM_CALIBRATE")
    os.environ["MINILLM_CALIBRATE"] = "off"  # measured below, once
    try:
        m = load_model(model, "numpy", threads)  # the split is the NumPy backend's, GPU or not
    finally:
        if before is None:
            del os.environ["MINILLM_CALIBRATE"]
        else:
            os.environ["MINILLM_CALIBRATE"] = before
    settings, measured = settings_for(m, refresh=True)
    if as_json:
        write_stdout(json.dumps({"workers": settings.workers,
                                 "score_budget": settings.score_budget,
                                 "measured": measured, "cache": str(cache_path())}) + "\n")
        return
    lines = []
    for name, chosen, label in (("workers", settings.workers, "threads per long chunk"),
                                ("score_budget", settings.score_budget,
                                 "score bytes per query block")):
        lines.append(f"{label}:")
        for value, seconds in measured[name].items():
            mark = "  <- chosen" if int(value) == chosen else ""
            lines.append(f"  {int(value):>10,}  {seconds * 1e3:8.2f} ms{mark}")
    lines.append(f"measured in {measured['seconds']:.2f} s; saved in {cache_path()}")
    write_stdout("\n".join(lines) + "\n")
