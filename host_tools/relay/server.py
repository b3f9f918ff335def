"""The relay's HTTP face: the bench ledger's paths and answer shapes, served by the stdlib.

Why the stdlib server: the relay answers a handful of boards, one request at a time per board,
and every request waits on the chain anyway; ``ThreadingHTTPServer`` keeps a slow receipt from
blocking other boards, with nothing to configure. Bodies are capped at 16 KiB and parsed as
strict JSON; every failure is a JSON rejection body, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

from host_tools.evm.market import TxFailed
from host_tools.evm.rpc import RpcError

from .core import Answer, Relay, RelayUnavailable, _rejected

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def _route(relay: Relay, method: str, path: str, query: dict, body: bytes | None) -> Answer:
    if method == "POST" and path == "/v1/messages":
        try:
            envelope = json.loads(body or b"", parse_float=lambda v: None, parse_constant=lambda v: None)
        except (ValueError, RecursionError):
            return _rejected(400, "malformed", "body: expected the JSON envelope {\"payload\", \"signature\"}", None)
        return relay.handle_wire(envelope)
    if method != "GET":
        return _rejected(405, "method_not_allowed", f"{method} {path}: not supported", None)
    if path == "/v1/time":
        return Answer(200, {"time_ms": relay.time_ms()})
    if path == "/v1/info":
        return Answer(200, relay.info())
    parts = path.strip("/").split("/")
    if len(parts) in (3, 4) and parts[:2] == ["v1", "devices"]:
        if not _ADDRESS.match(parts[2]):
            return _rejected(400, "malformed", "device: expected the device's address, 0x and 40 hex digits", None)
        device = bytes.fromhex(parts[2][2:])
        if len(parts) == 3:
            return Answer(200, relay.device_account(device))
        if parts[3] == "trades":
            after_text = (query.get("after") or ["0"])[0]
            if not after_text.isdigit() or len(after_text) > 19:
                return _rejected(400, "malformed", "after: expected a trade id (a non-negative integer)", None)
            return Answer(200, relay.trades_since(device, int(after_text)))
    return _rejected(404, "not_found", f"{path}: no such resource", None)


def make_handler(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dgc-relay"

        def log_message(self, fmt: str, *args) -> None:  # stdlib logging, not stderr
            log.debug("%s " + fmt, self.client_address[0], *args)

        def _answer(self, answer: Answer) -> None:
            data = json.dumps(answer.body, separators=(",", ":")).encode()
            self.send_response(answer.http_status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the board gave up waiting; it will resend
                log.info("relay: client went away before the answer (%s)", self.path)
                self.close_connection = True

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            body = None
            if method == "POST":
                length = self.headers.get("Content-Length", "")
                if not length.isdigit():
                    self.close_connection = True
                    return self._answer(_rejected(411, "malformed", "Content-Length: required", None))
                if int(length) > MAX_BODY_BYTES:
                    self.close_connection = True
                    return self._answer(_rejected(413, "too_large", f"body: larger than {MAX_BODY_BYTES} bytes", None))
                body = self.rfile.read(int(length))
            try:
                answer = _route(relay, method, url.path, parse_qs(url.query), body)
            except (RelayUnavailable, RpcError, TxFailed) as exc:
                answer = _rejected(503, "unavailable", f"chain not reachable or not confirming: {str(exc)[:300]}", None)
            except Exception:  # hostile bytes never crash the relay; the trace goes to the log only
                log.exception("relay: unexpected error on %s %s", method, url.path)
                answer = _rejected(500, "internal", "the relay failed on this request (see its log)", None)
            self._answer(answer)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@dataclass
class RunningRelay:
    url: str
    port: int
    server: ThreadingHTTPServer


def make_server(relay: Relay, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(relay))
    server.daemon_threads = True
    return server


@contextmanager
def running_relay(relay: Relay, host: str = "127.0.0.1", port: int = 0) -> Iterator[RunningRelay]:
    """Serve from a background thread for the duration of a ``with`` block (tests, demo)."""
    server = make_server(relay, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="relay", daemon=True)
    thread.start()
    try:
        bound = server.server_address[1]
        yield RunningRelay(url=f"http://{host}:{bound}", port=bound, server=server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
