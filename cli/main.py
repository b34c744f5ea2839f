"""The `minillm` command line: a thin click layer over the library."""

from __future__ import annotations

import json
import os
import time

import click

from minillm.generate import generate_text

from .calibrate import calibrate
from .chat import chat as _chat
from .common import (
    PromptProgress,
    backend_options,
    load_model,
    model_argument,
    on_sigterm_exit,
    progress_option,
    reports_errors,
    sampling_options,
    sampling_params,
    setup_process,
    top_k_middle_options,
    top_k_middle_settings,
    write_stdout,
)
from .passkey import passkey
from .score import score
from .serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="minillm")
def cli():
    """minillm: run Llama models in NumPy/CuPy over streams of any length (LM-Infinite).

    MODEL is minillm's single .safetensors file (see `minillm convert`), a Hugging Face
    folder, or a GGUF file.
    """


@cli.command()
@model_argument
@click.option("-p", "--prompt", required=True, help="The text to continue (special tokens such as "
              "<|im_start|> are parsed).")
@top_k_middle_options()
@sampling_options
@progress_option
@backend_options
@reports_errors
def generate(model, prompt, progress, backend, threads, **kw):
    """Stream a raw completion of PROMPT to stdout."""
    if not prompt:
        raise click.BadParameter("the prompt is empty", param_hint="'-p' / '--prompt'")
    params = sampling_params(kw)
    top_k = top_k_middle_settings(kw)
    m = load_model(model, backend, threads)
    ids = m.tokenizer.encode(prompt, special=True)
    if top_k["top_k_middle"]:
        on_sigterm_exit()  # SIGTERM unwinds, so that the middle store is removed
    try:
        session = m.session(**top_k)
    except ValueError as err:  # e.g. --top-k-from-layer past the model's layers
        raise click.UsageError(str(err)) from None
    with session:
        for piece in generate_text(m, session, ids, params, progress=PromptProgress(progress)):
            write_stdout(piece)
    write_stdout("\n")


@cli.command()
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@backend_options
@reports_errors
def info(model, as_json, backend, threads):
    """Print the model's config, parameter count, stored dtype and memory needed."""
    from minillm.info import model_info

    m = load_model(model, backend, threads)
    report = model_info(m)
    if as_json:
        write_stdout(json.dumps(report) + "\n")
        return
    write_stdout("".join(f"{key:>28}: {value}\n" for key, value in report.items()))


@cli.command()
@click.argument("src", type=click.Path(dir_okay=True, path_type=str))
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=str))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Stored dtype (float32 is memory-mapped without a copy).")
@reports_errors
def convert(src, out, dtype):
    """Convert SRC (a GGUF file, a Hugging Face folder, or a minillm file to store in another
    --dtype) into one self-contained OUT.safetensors. OUT is written whole or not at all, and
    is refused when it is SRC or one of its files."""
    from minillm.convert import convert as run_convert

    on_sigterm_exit()  # a killed conversion leaves no temporary file behind
    start = time.perf_counter()
    click.echo(f"converting {src} -> {out} ({dtype})", err=True)
    run_convert(src, out, dtype=dtype)
    size = os.path.getsize(out) / 1e6
    click.echo(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - start:.1f} s", err=True)


cli.add_command(_chat)
cli.add_command(score)
cli.add_command(serve)
cli.add_command(passkey)
cli.add_command(calibrate)


@cli.command()
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per measurement (after one warm-up); the median is reported.")
@backend_options
@reports_errors
def bench(model, as_json, repeats, backend, threads):
    """Measure prompt, decode and scoring tokens/s, peak RSS and the BLAS kernel.

    Beside them, the CPU and this machine's floors at the model's shapes (NumPy backend): the
    weight products alone, one GEMV per matrix for a decode token and 512-row GEMMs for a
    prompt. Decode is shown as a share of the GEMV floor and prompts of the GEMM floor.
    """
    from minillm.bench import run_bench

    m = load_model(model, backend, threads)
    result = run_bench(m, repeats, progress=lambda msg: click.echo(f"bench: {msg}", err=True))
    if as_json:
        write_stdout(json.dumps(result) + "\n")
        return
    write_stdout(bench_text(result))


def bench_text(result: dict) -> str:
    """The bench result as `key: value` lines, each rate beside its floor."""
    ceilings = {"decode_tps": ("GEMV floor", result.get("gemv_floor_tps")),
                **{k: ("GEMM floor", result.get("gemm_floor_tps"))
                   for k in ("prompt_512_tps", "prompt_2048_tps")}}
    lines = [f"{'cpu':>17}: {result['cpu']} ({result['cores']} usable cores)"]
    for key, value in result.items():
        if key in ("cpu", "cores"):
            continue
        if value is None:
            text = "n/a (NumPy backend only)"
        elif isinstance(value, float):
            text = f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"  # small ms stay visible
        else:
            text = str(value)
        label, floor = ceilings.get(key, (None, None))
        if floor:
            text += f" ({label} {floor:.1f} tok/s: {value / floor:.2f}x)"
        lines.append(f"{key:>17}: {text}")
    return "\n".join(lines) + "\n"


def main():
    setup_process()  # process-wide signal and warning settings: the console script only
    cli(prog_name="minillm")


if __name__ == "__main__":
    main()
