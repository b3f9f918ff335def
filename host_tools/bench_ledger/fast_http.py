"""uvicorn's httptools protocol with POST /v1/messages answered straight from the parser.

Why: at a few thousand messages per second, uvicorn's per-request machinery (an ASGI scope, a
request-response cycle with its event, a task, the receive/send coroutines and their header
checks, the proxy-headers middleware) costs about as much event-loop CPU as parsing and
verifying the signed message itself, and the event loop is the ledger's bottleneck (it shares
one GIL with the writer thread). For the one hot request this protocol hands the whole body to
``app.fast_post`` from the parser's callbacks and writes the answer it gets back to the socket
- the same checks, bodies and status codes as the ASGI path (``app._lean_post``), and the
same default headers uvicorn adds.

Everything else takes uvicorn's path unchanged, and so does any hot request that is not plain:
HTTP/1.0 or ``Connection: close``, no Content-Length or one above the ledger's body limit,
chunked bodies, ``Expect: 100-continue``, an upgrade, proxy headers (the client address must
then come from uvicorn's proxy-headers middleware), a root path, or a request pipelined behind
one still being answered (uvicorn's queue keeps the answers in order).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .app import MAX_BODY_BYTES

_PATH = b"/v1/messages"
_SLOW_HEADERS = frozenset({b"transfer-encoding", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"expect",
                           b"upgrade"})


class _Event:
    def set(self) -> None:  # uvicorn's connection_lost sets the cycle's event; nobody waits on this one
        pass


class _FastCycle:
    """Stands in for uvicorn's RequestResponseCycle while a hot request is answered, so that
    uvicorn's own logic (pipelining, shutdown, connection_lost) treats it as a request in flight."""

    __slots__ = ("response_complete", "keep_alive", "disconnected", "message_event")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self.message_event = _Event()


class LedgerHttpProtocol(HttpToolsProtocol):
    """Subclassed per app by ``protocol_for`` (uvicorn instantiates the class itself)."""

    ledger_app: Any = None
    _fast_body: list | None = None
    _defaults_of: Any = None  # uvicorn's default header list last rendered, and its bytes
    _defaults = b""

    def on_headers_complete(self) -> None:
        if self._is_plain_hot_request():
            self._fast_body = []
            self.cycle = _FastCycle()  # type: ignore[assignment]
            return
        super().on_headers_complete()

    def _is_plain_hot_request(self) -> bool:
        if self.url != _PATH or self.root_path:
            return False
        parser = self.parser
        if (parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or not parser.should_keep_alive()
                or parser.should_upgrade()):
            return False
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return False  # pipelined behind an answer still pending: uvicorn queues it
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return False
                length = value
            elif name in _SLOW_HEADERS:
                return False
        return length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES

    def on_body(self, body: bytes) -> None:
        if self._fast_body is not None:
            self._fast_body.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        chunks = self._fast_body
        if chunks is None:
            super().on_message_complete()
            return
        self._fast_body = None
        cycle = self.cycle
        client = self.client
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.ledger_app.fast_post(raw, client[0] if client else "unknown",
                                  lambda status, data, headers: self._reply(cycle, status, data, headers))

    def _reply(self, cycle: _FastCycle, status: int, data: bytes, headers: list) -> None:
        cycle.response_complete = True
        transport = self.transport
        if cycle.disconnected or transport.is_closing():
            return  # the client went away; the message (if any) is committed and a resend gets its answer
        defaults = self.server_state.default_headers  # uvicorn replaces this list when the date changes
        if defaults is not self._defaults_of:
            self._defaults_of, self._defaults = defaults, b"".join(b"%s: %s\r\n" % pair for pair in defaults)
        content = [STATUS_LINE[status], self._defaults]
        for name, value in headers:
            if name != b"content-length":
                content += (name, b": ", value, b"\r\n")
        content += (b"content-length: ", str(len(data)).encode("ascii"), b"\r\n")
        if not cycle.keep_alive:  # the server is shutting down (uvicorn's shutdown() cleared it)
            content.append(b"connection: close\r\n")
        content += (b"\r\n", data)
        transport.write(b"".join(content))
        if not cycle.keep_alive:
            transport.close()
        self.on_response_complete()


def protocol_for(app: Any) -> type[LedgerHttpProtocol]:
    """The protocol class uvicorn should use to serve ``app`` (a ledger app from create_app)."""
    return type("LedgerHttpProtocolFor", (LedgerHttpProtocol,), {"ledger_app": app})
