"""Run the bench ledger over HTTP with uvicorn: in the foreground (``serve``) or in a thread (tests, demo).

Why:
- The socket is bound here, before uvicorn starts, so a busy port is one clear error line and
  ``port=0`` gives a free port whose number is known at once.
- ``serve`` prints exactly one line, ``ledger listening on http://HOST:PORT ledger_id=ID``,
  flushed, once the app has started: an orchestrator (the demo, a HIL rig) waits for that line
  instead of polling.
- SIGTERM and SIGINT stop the server gracefully (uvicorn finishes in-flight requests, the store
  is closed) and ``serve`` then returns 0, so a supervisor sees a clean exit.
- Loopback by default: the bench ledger has no TLS and is meant for a bench.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

from .app import LedgerSettings, create_app

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750


class ServeError(Exception):
    """The server could not start (bad host, busy port). One line saying what was expected."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"port {port}: expected 0 (any free port) to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket says it is TCP; without it, keep-alive requests stall ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); expected a free port on a local address") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(settings: LedgerSettings, on_ready: Callable[[], None]):
    import uvicorn  # imported here so `dgc-host --help` stays light

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

    from .fast_http import protocol_for

    app = create_app(settings)
    # POST /v1/messages straight from the parser (fast_http); everything else is uvicorn's as usual
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=protocol_for(app))
    return _Server(config), app


def serve(settings: LedgerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, out: TextIO | None = None) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; returns the exit status (0)."""
    out = out or sys.stdout
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host

    def ready() -> None:
        # Everything built so far (FastAPI's and pydantic's objects, the books rebuilt from SQLite)
        # lives as long as the process: keep it out of the cyclic collector's full passes, which
        # otherwise stop the ledger for ~60 ms or more every few thousand messages (a p99 spike).
        gc.freeze()
        print(f"ledger listening on http://{shown_host}:{bound_port} ledger_id={settings.ledger_id}", file=out, flush=True)

    server, _ = _uvicorn_server(settings, ready)
    stop_signals: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles the signals itself and, after its graceful shutdown, re-raises them
        # to whatever handler was installed before: make that a recorder, so we exit with 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if stop_signals:
        log.info("ledger stopped by %s", signal.Signals(stop_signals[0]).name)
    return 0


@dataclass
class RunningLedger:
    """A ledger served from a background thread (see ``running_ledger``)."""

    url: str
    port: int
    app: object  # the FastAPI app, e.g. for app.state.store or app.openapi()


@contextmanager
def running_ledger(settings: LedgerSettings, host: str = DEFAULT_HOST, port: int = 0,
                   start_timeout_s: float = 10.0) -> Iterator[RunningLedger]:
    """Serve the ledger over real HTTP from a thread for the duration of a ``with`` block."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    started = threading.Event()
    server, app = _uvicorn_server(settings, started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"ledger-{bound_port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not started.wait(0.01):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"ledger on {host}:{bound_port} did not start within {start_timeout_s} s")
        shown_host = f"[{host}]" if ":" in host else host
        yield RunningLedger(url=f"http://{shown_host}:{bound_port}", port=bound_port, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
