"""Running the app under uvicorn, with minillm's own shutdown.

The first SIGINT or SIGTERM stops taking connections and requests (503), lets the answers in
progress and those queued finish for up to `drain_timeout` seconds, then ends what is left
with an error event; a second signal ends everything at once. The exit status tells which
signal stopped the server (130 SIGINT, 143 SIGTERM), as for every minillm command. A SIGINT
that the process inherited as ignored (a background job) stays ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvicorn

from ..errors import MiniLLMError
from .engine import Engine

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
SHUTDOWN_MESSAGE = "the server is shutting down"
log = logging.getLogger("minillm.server")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "minillm serve: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line",
                            "stream": "ext://sys.stderr"}},
    "loggers": {name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "minillm.server")},
}


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port; the caller reads which)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise MiniLLMError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self.stopped_by: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's own handling re-raises the signal at the end (a traceback for SIGINT, no
        exit status of ours): the loop's handlers instead."""
        loop = asyncio.get_running_loop()
        watched = [s for s in EXIT_STATUS if signal.getsignal(s) is not signal.SIG_IGN]
        for sig in watched:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in watched:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self.stopped_by is not None:  # the second signal: now
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self.engine.cancel_all(SHUTDOWN_MESSAGE)
            self.force_exit = True
            return
        self.stopped_by = sig
        log.warning("%s: finishing the requests in progress (up to %g s), taking no new ones",
                    signal.Signals(sig).name, self.drain_timeout)
        self.engine.close()
        self.should_exit = True
        asyncio.get_running_loop().call_later(self.drain_timeout, self.engine.cancel_all,
                                              SHUTDOWN_MESSAGE)


def run(app, engine: Engine, sock: socket.socket, drain_timeout: float) -> int:
    """Serve until a signal stops the server; its exit status."""
    config = uvicorn.Config(app, log_config=LOGGING, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=None, server_header=False)
    server = _Server(config, engine, drain_timeout)
    engine.start()
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        engine.close()
        engine.cancel_all(SHUTDOWN_MESSAGE)
        engine.join(timeout=30)
        sys.stderr.flush()
    return EXIT_STATUS.get(server.stopped_by, 0)
