"""`minillm passkey`: LM-Infinite's passkey retrieval test over lengths, depths and settings."""

from __future__ import annotations

import json

import click

from minillm.passkey import DEFAULT_SETTINGS, SETTINGS, TOP_K

from .common import (
    backend_options,
    load_model,
    model_argument,
    on_sigterm_exit,
    reports_errors,
    top_k_middle_options,
    top_k_middle_settings,
    write_stdout,
)


def _comma_list(convert, check, what: str):
    def parse(ctx, param, value):
        if value is None:
            return None
        items = []
        for item in value.split(","):
            try:
                x = convert(item.strip())
            except ValueError:
                raise click.BadParameter(f"{item.strip()!r} is not {what}") from None
            if not check(x):
                raise click.BadParameter(f"{item.strip()!r} is not {what}")
            items.append(x)
        if not items:
            raise click.BadParameter("the list is empty")
        return items
    return parse


@click.command()
@model_argument
@click.option("--lengths", default="4096,8192", show_default=True,
              callback=_comma_list(int, lambda x: x >= 1, "a positive number of tokens"),
              help="Prompt lengths in tokens, comma-separated.")
@click.option("--trials", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials per length (per depth with --depths) and setting.")
@click.option("--depths", default=None,
              callback=_comma_list(float, lambda x: 0 <= x <= 1, "a depth between 0 and 1"),
              help="Needle depths (0: right after the task's prefix, 1: before the question), "
                   "comma-separated: every trial count runs at each [default: a uniformly "
                   "random sentence boundary per trial].")
@click.option("--settings", default=",".join(DEFAULT_SETTINGS), show_default=True,
              callback=_comma_list(str, lambda x: x in SETTINGS,
                                   f"one of {', '.join(SETTINGS)}"),
              help="Settings to compare, comma-separated.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the keys and depths (the same seed, the same prompts).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per trial and setting on stdout.")
@click.option("--n-global", type=click.IntRange(min=0), default=None,
              help="Starting tokens kept forever (lminfinite settings; default 10).")
@click.option("--n-local", type=click.IntRange(min=1), default=None,
              help="Local window in tokens, also truncate's (default: the training length).")
@top_k_middle_options(default_k=5)
@backend_options
@reports_errors
def passkey(model, lengths, trials, depths, settings, seed, as_json, n_global, n_local,
            backend, threads, **kw):
    """Passkey retrieval on MODEL, as LM-Infinite evaluates it: a random pass key hidden in
    filler text at a sentence boundary, the question at the end, greedy answers of at most
    7 tokens.

    \b
    Settings: truncate (only the prompt's last n_local tokens), lminfinite,
    lminfinite+topk (top-k middle attention, --top-k-middle), lminfinite+neighbours
    (the same with --top-k-neighbours; not LM-Infinite's method), full (ordinary
    attention). The lminfinite settings share the work of the prompt's first tokens.
    The accuracy per length and setting is printed to stderr at the end.
    """
    from minillm.passkey import PasskeySettings, check_settings, run_passkey, summary

    opts = PasskeySettings(n_global=n_global, n_local=n_local, **top_k_middle_settings(kw))
    try:
        check_settings(settings, opts)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    m = load_model(model, backend, threads)
    _check_settings(m, opts, bool(set(TOP_K) & set(settings)))
    on_sigterm_exit()  # SIGTERM unwinds: the middle store is removed, the summary printed
    records = []
    try:
        for record in run_passkey(m, lengths, trials, settings, depths, seed, opts):
            records.append(record)
            write_stdout(json.dumps(record) + "\n" if as_json else _line(record))
    finally:
        if records:
            click.echo(summary(records, settings), err=True)


def _check_settings(model, opts, top_k: bool) -> None:
    """Refuse settings a session would refuse, before the first (long) prompt."""
    from minillm.attention import attention_spec
    from minillm.middle import top_k_settings

    try:
        spec = attention_spec(model.config, "lminfinite", opts.n_global, opts.n_local)
        if top_k:
            top_k_settings(model.config, spec, opts.top_k_middle, opts.top_k_from_layer,
                           opts.top_k_insert_at, opts.top_k_neighbours)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def _line(r: dict) -> str:
    mark = "correct" if r["correct"] else "wrong"
    return (f"length {r['length']} ({r['tokens']} tokens)  depth {r['depth']:.2f}  "
            f"{r['setting']:<21} key {r['key']:<8} answer {r['answer']!r:<12} {mark}  "
            f"{r['seconds']:.1f} s\n")
