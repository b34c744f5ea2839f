"""`minillm serve`: the OpenAI-compatible server (minillm.server) as a command."""

from __future__ import annotations

import os
import sys

import click

from .common import (
    FiniteFloat,
    attention_options,
    backend_options,
    load_model,
    model_argument,
    reports_errors,
)


def _http_stack():
    """The server's modules; a clear line when the `serve` extra is missing."""
    try:
        from minillm.server import app, runner
    except ImportError as err:
        raise click.ClickException(f"minillm serve needs the HTTP stack ({err.name} is not "
                                   "installed): pip install 'minillm[serve]'") from None
    return app, runner


@click.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port; the address is printed).")
@click.option("--parallel", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Conversation slots, decoded together in one batched pass.")
@click.option("--queue", "queue_size", type=click.IntRange(min=0), default=16,
              show_default=True, help="Requests that may wait for a slot; more get 503.")
@click.option("--api-key", envvar="MINILLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also $MINILLM_API_KEY).")
@attention_options("each conversation's keys")
@click.option("--max-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Most new tokens of a chat answer whose request names no max_tokens.")
@click.option("--max-body-mb", type=click.IntRange(min=1), default=16, show_default=True,
              help="Largest request body; a larger one gets 413.")
@click.option("--drain-timeout", type=FiniteFloat(min=0), default=10.0, show_default=True,
              help="On SIGINT/SIGTERM, seconds the answers in progress may take to finish.")
@click.option("--model-name", default=None,
              help="The model's id in /v1/models (default: MODEL's file name).")
@backend_options
@reports_errors
def serve(model, host, port, parallel, queue_size, api_key, attention, n_global, n_local,
          max_tokens, max_body_mb, drain_timeout, model_name, backend, threads):
    """Serve MODEL over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models.

    \b
    A conversation continues in its slot: only its new tokens are read, and the LM-Infinite
    cache keeps it going at any length. Slots that are generating advance together, one
    batched forward pass per token. Point an OpenAI client at http://HOST:PORT/v1.
    SIGINT/SIGTERM: finish the answers in progress (--drain-timeout), then exit 130/143.
    """
    app, runner = _http_stack()
    from minillm.server.engine import Engine
    from minillm.server.prompts import Prompts

    with runner.listen(host, port) as sock:  # before loading: a taken port fails at once
        m = load_model(model, backend, threads)
        try:
            engine = Engine(m, parallel, queue_size, dict(attention=attention, n_global=n_global,
                                                          n_local=n_local))
        except ValueError as err:  # settings the session refuses, e.g. n_global > n_local
            raise click.UsageError(str(err)) from None
        name = model_name or os.path.splitext(os.path.basename(os.path.normpath(model)))[0]
        settings = app.Settings(name, api_key, max_body_mb << 20, max_tokens,
                                "fp_" + m.fingerprint)
        service = app.create_app(engine, Prompts(m), settings)
        bound_host, bound_port = sock.getsockname()[:2]
        window = engine.slots[0].session.spec.n_local or "unbounded"
        click.echo(f"minillm serve: {name} on http://{_url_host(bound_host)}:{bound_port}/v1 "
                   f"({parallel} slots, window {window}, {m.backend})", err=True)
        status = runner.run(service, engine, sock, drain_timeout)
    sys.exit(status)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
