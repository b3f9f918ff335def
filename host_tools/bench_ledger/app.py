"""The bench ledger's HTTP API (FastAPI): the reference implementation of docs/ledger-api.json.

Why it is shaped like this:

- Request bodies are read and parsed here, by hand, with a size cap, rather than by FastAPI's
  automatic body handling: a hostile body (invalid UTF-8, deep nesting, floats where integers
  belong, a wrong content type) must get a clear 4xx JSON error naming what was wrong, never a
  500, and the signed envelope must reach ``messages.open_message`` as the exact bytes.
- Forgeries are cheap to refuse: a client address over its rate gets 429 before any parsing; an
  unknown device id is refused before any cryptography; signatures are verified with
  ``coincurve`` (libsecp256k1, ~26 us) and a forgery is not logged line by line. The tests
  cross-check every accepted signature with the independent pure-Python ``ecdsa``.
- Access: registration, revocation and clearing an audit need the operator token (a ledger
  started without one has no operator and refuses them). A device's account, orders, trades
  and messages are read with that device's signed, time-stamped read request (headers
  ``X-DGC-Read`` and ``X-DGC-Read-Signature``, see docs/ledger.md) or the operator token. The
  public book shows price levels only, never who is behind them.
- The ledger's notion of time is an injected ``clock`` (milliseconds), so tests can close gates
  and pass report deadlines without sleeping, over real HTTP.
- Before every request the store sweeps what time has closed (orders at gate closure, trades
  past the report deadline), so every answer reflects the current time without a timer thread.

All numbers on the wire are integers: Wh, minor units per kWh, milli-minor units, epoch ms/s.
"""

from __future__ import annotations

import hmac
import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from fastapi import FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from firmware.market import MarketRules
from firmware.messages import (
    MAX_PAYLOAD_BYTES,
    MessageError,
    SignedMessage,
    canonical_bytes,
    open_message,
    verify_signature,
)

from . import fastpath, views_api
from .committer import GroupCommitter
from .limits import RateLimit, RateLimiter
from .store import (
    DEFAULT_MAX_OPEN_ORDERS,
    DEFAULT_MAX_OPEN_SHORTFALL_WH,
    DEFAULT_SELL_CAPACITY_WH,
    INT64_MAX,
    MAX_CREDIT_MILLI_MINOR,
    REJECTION_STATUS,
    MAX_FUTURE_ISSUE_SECONDS,
    MAX_ORDER_WH,
    LedgerStore,
    Outcome,
    Rejection,
)

log = logging.getLogger(__name__)

API_TITLE = "DGC bench ledger"
API_VERSION = "1"
MAX_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 8
READ_HEADER = "x-dgc-read"
READ_SIGNATURE_HEADER = "x-dgc-read-signature"
DEVICE_ID_PATTERN = "^[0-9a-f]{40}$"


def wall_clock_ms() -> int:
    """UTC epoch milliseconds from the host clock (the default ledger clock)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class OffsetClock:
    """The host clock shifted by ``offset_ms``: lets a bench give the ledger a skewed clock, so the
    boards' clock guard can be exercised without touching the machine's time."""

    offset_ms: int

    def __call__(self) -> int:
        return wall_clock_ms() + self.offset_ms


@dataclass(frozen=True)
class LedgerSettings:
    """Everything a ledger instance needs. The operator token is kept out of repr (and so out of logs)."""

    db_path: Path | str
    ledger_id: str
    rules: MarketRules = field(default_factory=MarketRules)
    operator_token: Optional[str] = field(default=None, repr=False)
    initial_credit_milli_minor: int = 1_000_000_000
    report_deadline_seconds: int = 3600
    clock: Callable[[], int] = wall_clock_ms
    last_market_id: Optional[int] = None  # when set, no market after this one takes orders (a bounded demo day)
    default_sell_capacity_wh: int = DEFAULT_SELL_CAPACITY_WH
    max_open_shortfall_wh: int = DEFAULT_MAX_OPEN_SHORTFALL_WH
    max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS
    # Verified messages per device, and requests per client address (0 per second: no limit).
    device_rate: RateLimit = RateLimit(per_second=20, burst=100)
    client_rate: RateLimit = RateLimit(per_second=500, burst=1000)
    # Signs the record's blocks; boards pin its public key at provisioning. None: an ephemeral key.
    authority_key: Any = field(default=None, repr=False)
    seal_interval_ms: int = 2000
    # The store (book, SQLite, the record) in a process of its own, so the HTTP side and the
    # writer each get a core (writer_process.py). Needs a clock both processes read alike.
    writer_process: bool = False

    def __post_init__(self) -> None:
        if self.writer_process and not (self.clock is wall_clock_ms or isinstance(self.clock, OffsetClock)):
            raise ValueError("writer_process: expected the host clock or an OffsetClock (an injected clock lives in "
                             "one process only); use writer_process=False with a test clock")
        if not self.ledger_id or not self.ledger_id.isascii() or not self.ledger_id.isprintable():
            raise ValueError(f"ledger_id: expected non-empty printable ASCII, got {self.ledger_id!r}")
        if not 0 <= self.initial_credit_milli_minor <= MAX_CREDIT_MILLI_MINOR:
            raise ValueError(f"initial_credit_milli_minor: expected 0 to {MAX_CREDIT_MILLI_MINOR}, got {self.initial_credit_milli_minor}")
        if self.report_deadline_seconds < 0:
            raise ValueError(f"report_deadline_seconds: expected zero or more, got {self.report_deadline_seconds}")
        if self.last_market_id is not None and not self.rules.is_market_id(self.last_market_id):
            raise ValueError(f"last_market_id: expected a slot start (a multiple of {self.rules.slot_seconds}), got {self.last_market_id}")
        if self.operator_token is not None and not self.operator_token:
            raise ValueError("operator_token: expected a non-empty token or None")


# --------------------------------------------------------------------------- API models
# These document the API (docs/ledger-api.json) and validate the registration body; the
# HTTP tests validate live answers against them so the document cannot drift from the code.

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Rejected(_Strict):
    status: Literal["rejected"]
    code: Literal[tuple(sorted({*REJECTION_STATUS, "http_error"}))] = Field(  # type: ignore[valid-type]
        description="machine-readable reason, e.g. gate_closed, bad_signature")
    detail: str = Field(description="what was wrong and what was expected")
    duplicate: Optional[bool] = Field(None, description="for messages: true when this is the stored answer to a resend")
    nonce: Optional[int] = None


class TimeOut(_Strict):
    time_ms: int = Field(description="the ledger's clock, UTC epoch milliseconds")


class InfoOut(_Strict):
    ledger_id: str
    slot_seconds: int
    markets_ahead: int
    lot_wh: int
    gate_closure_seconds: int
    price_min_per_kwh_minor: int
    price_max_per_kwh_minor: int
    report_deadline_seconds: int
    last_market_id: Optional[int] = Field(description="no market after this one takes orders; null when unbounded")
    authority_public_key: str = Field(pattern="^[0-9a-f]{66}$",
                                      description="compressed secp256k1 key that signs the record's blocks (pin it)")


class RegisterIn(_Strict):
    public_key: str = Field(min_length=66, max_length=130, pattern=r"^([0-9a-fA-F]{66}|[0-9a-fA-F]{130})$",
                            description="secp256k1 public key, hex (compressed or not)")
    name: str = Field("", max_length=64, pattern=r"^[ -~]*$", description="a label for people (printable ASCII)")
    credit_milli_minor: Optional[int] = Field(
        None, ge=0, le=MAX_CREDIT_MILLI_MINOR, description="opening balance; the ledger's default when absent")
    sell_capacity_wh: Optional[int] = Field(
        None, ge=0, le=MAX_ORDER_WH, description="qualification: the most it may offer or sell in one market; "
                                                "the ledger's default when absent")


class Account(_Strict):
    device_id: str
    public_key: str
    name: str
    balance_milli_minor: int = Field(description="spendable money")
    locked_milli_minor: int = Field(description="money held for open buy orders and unsettled trades")
    max_nonce: int = Field(description="highest nonce stored from this device, 0 if none")
    revoked_ms: Optional[int] = Field(description="when the operator revoked the device (its messages are then rejected "
                                                  "'revoked'); null while it is valid")
    sell_capacity_wh: int = Field(description="qualification: Wh it may offer plus have sold in one market")
    open_shortfall_wh: int = Field(description="shortfall charged to it, not yet cleared by the operator; above the "
                                               "ledger's limit its orders are refused 'audit_failed'")


class RegisterOut(Account):
    created: bool = Field(description="false when the key was already registered (idempotent)")


class RevokeOut(Account):
    already_revoked: bool = Field(description="true when the device had been revoked before (nothing changed)")
    cancelled_orders: int = Field(description="open orders of the device cancelled by this revocation")


class Envelope(_Strict):
    payload: str = Field(max_length=MAX_PAYLOAD_BYTES, pattern=r"^[ -~]*$",
                         description="the canonical message JSON (printable ASCII), exactly as signed")
    signature: str = Field(pattern=r"^[0-9a-fA-F]{128}$", description="128 hex: compact r||s, low-S, over sha256(payload)")


class Accepted(_Strict):
    status: Literal["accepted"]
    duplicate: bool = Field(description="true when this nonce was already applied; nothing was applied again")
    nonce: int
    type: str = Field(description="order, cancel or delivery_report")
    result: dict[str, Any] = Field(description="order: fills; cancel: released quantity; delivery_report: report and settlement")


class BookLevel(_Strict):
    price_per_kwh_minor: int
    remaining_wh: int = Field(description="open quantity at this price, all devices together")
    orders: int = Field(description="how many orders rest at this price")


class BookOut(_Strict):
    market_id: int
    gate_open: bool
    asks: list[BookLevel] = Field(description="sell price levels, lowest first (aggregates only: no device ids)")
    bids: list[BookLevel] = Field(description="buy price levels, highest first (aggregates only: no device ids)")


class Settlement(_Strict):
    reason: str = Field(description="'reports' (both parties reported) or 'deadline' (swept)")
    seller_wh: int
    buyer_wh: int
    settled_wh: int
    paid_milli_minor: int
    released_milli_minor: int
    shortfall_wh: int
    shortfall_party: Optional[str]
    shortfall_device_id: Optional[str]
    settled_ms: int


class DeviceTrade(_Strict):
    trade_id: int
    market_id: int
    side: Literal["buy", "sell"]
    energy_wh: int
    price_per_kwh_minor: int
    order_nonce: int
    counterparty: str
    state: Literal["contracted", "reported", "settled"]
    created_ms: int
    settlement: Optional[Settlement]


class DeviceTradesOut(_Strict):
    trades: list[DeviceTrade]
    cursor: int = Field(description="pass as ?after= to get only newer trades")


class OrderOut(_Strict):
    nonce: int
    market_id: int
    side: Literal["buy", "sell"]
    energy_wh: int
    remaining_wh: int
    filled_wh: int
    cancelled_wh: int
    price_per_kwh_minor: int
    state: Literal["open", "filled", "cancelled", "expired"]
    created_ms: int


class OrdersOut(_Strict):
    orders: list[OrderOut]


class Party(_Strict):
    device_id: str
    order_nonce: int


class Report(_Strict):
    role: Literal["seller", "buyer"]
    device_id: str
    nonce: int
    energy_wh: int
    status: str
    received_ms: int


class TradeDetail(_Strict):
    trade_id: int
    market_id: int
    energy_wh: int
    price_per_kwh_minor: int
    seller: Party
    buyer: Party
    taker_side: Literal["buy", "sell"]
    created_ms: int
    state: Literal["contracted", "reported", "settled"]
    reports: list[Report] = Field(description="the delivery reports received so far, seller's first")
    settlement: Optional[Settlement]


class MarketTradesOut(_Strict):
    market_id: int
    trades: list[TradeDetail]


class MessageRecord(_Strict):
    nonce: int
    kind: str
    payload_sha256: str
    payload: str = Field(description="the canonical payload exactly as received and verified")
    signature: str
    received_ms: int
    http_status: int
    status: Literal["accepted", "rejected"]
    code: Optional[str] = Field(description="the rejection code, null when accepted")


class MessagesOut(_Strict):
    messages: list[MessageRecord]


class BlockOut(_Strict):
    v: int
    ledger_id: str
    height: int = Field(ge=0)
    prev_block_hash: str = Field(pattern="^[0-9a-f]{64}$", description="the previous block's hash; 64 zeros for block 0")
    entries_root: str = Field(pattern="^[0-9a-f]{64}$", description="Merkle root of the block's leaf hashes")
    entry_count: int = Field(ge=1)
    first_seq: int = Field(ge=1)
    sealed_ms: int
    block_hash: str = Field(pattern="^[0-9a-f]{64}$", description="sha256 of the canonical header")
    signature: str = Field(pattern="^[0-9a-f]{128}$", description="the authority's compact low-S signature of block_hash")
    entries: Optional[list[str]] = Field(None, description="the leaves (operator only)")


class BlocksOut(_Strict):
    blocks: list[BlockOut]
    count: int = Field(description="how many blocks are sealed")


class ProofOut(_Strict):
    seq: int = Field(description="the entry's position in the whole log")
    leaf: str = Field(description="the entry's canonical JSON (firmware.ledger.record)")
    leaf_index: int = Field(ge=0, description="its index in the block")
    path: list[str] = Field(description="sibling hashes from the leaf up to entries_root")
    block: BlockOut


class StatsOut(_Strict):
    devices: int
    messages: int
    orders: int
    open_orders: int
    trades: int
    traded_wh: int
    reported_trades: int = Field(description="trades with both delivery reports in")
    settled_trades: int
    delivered_wh: int = Field(description="sum of settled_wh")
    shortfall_wh: int
    failed_trades: int = Field(description="trades with a shortfall or a report of a failed delivery")
    delivered_markets: int = Field(description="markets (slots) in which energy was delivered and settled")
    balance_milli_minor: int
    locked_milli_minor: int


_REJECTIONS: dict = {status: {"model": Rejected} for status in (400, 401, 403, 404, 409, 413, 422, 425)}
_REJECTIONS[405] = {"model": Rejected, "description": "method not allowed on this path",
                    "headers": {"Allow": {"description": "the methods this path allows", "schema": {"type": "string"}}}}
_REJECTIONS[429] = {"model": Rejected, "description": "over the device's or the client address's rate",
                    "headers": {"Retry-After": {"description": "seconds until a retry may succeed",
                                                "schema": {"type": "integer", "minimum": 1}}}}


# --------------------------------------------------------------------------- helpers

def _reject(code: str, detail: str, **extra: Any) -> JSONResponse:
    rejection = Rejection(code, detail)
    return JSONResponse(rejection.body(**extra), status_code=rejection.http_status)


def _depth_ok(text: str) -> bool:
    """Cheap nesting bound before json.loads, so deep nesting cannot hit the recursion limit."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # the usual case, at C speed
        return True
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _parse_json(raw: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, bounded depth, no NaN/Infinity, no floats. Raises Rejection('malformed')."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection("malformed", f"{what}: expected UTF-8 JSON, got undecodable bytes") from None
    if not _depth_ok(text):
        raise Rejection("malformed", f"{what}: nested deeper than {MAX_JSON_DEPTH} levels; expected a flat JSON object")

    try:
        return fastpath.strict_loads(text)  # json.loads with no floats, no NaN/Infinity
    except ValueError as exc:
        raise Rejection("malformed", f"{what}: expected a JSON object ({exc})") from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Rejection("too_large", f"body: {declared} bytes; expected at most {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Rejection("too_large", f"body: more than {MAX_BODY_BYTES} bytes; expected a small JSON object")
        chunks.append(chunk)
    return b"".join(chunks)


_HEX = frozenset("0123456789abcdef")
_SIGNATURE_HEX = re.compile(r"[0-9a-fA-F]{128}")


def _envelope(obj: Any) -> SignedMessage:
    """``SignedMessage.from_wire`` at C speed for a well-formed envelope; anything else goes
    through from_wire itself, so every malformed envelope gets exactly its error."""
    if type(obj) is dict:
        payload, signature = obj.get("payload"), obj.get("signature")
        if (type(payload) is str and type(signature) is str and len(payload) <= MAX_PAYLOAD_BYTES and payload.isascii()
                and _SIGNATURE_HEX.fullmatch(signature)):
            return SignedMessage(payload=payload.encode("ascii"), signature=bytes.fromhex(signature))
    return SignedMessage.from_wire(obj)


async def _lean_body(scope: dict, receive) -> Optional[bytes]:
    """``_read_body`` for a raw ASGI request; None when the client disconnected first."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise Rejection("too_large", f"body: {value.decode('latin-1')} bytes; expected at most {MAX_BODY_BYTES}")
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Rejection("too_large", f"body: more than {MAX_BODY_BYTES} bytes; expected a small JSON object")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_render = fastpath.render_response  # the bytes JSONResponse would send for a body
_JSON_HEADERS = [(b"content-type", b"application/json")]  # (fast_http adds content-length)


class _LedgerAPI(FastAPI):
    """FastAPI with one path served in front of its stack: POST /v1/messages (see _lean_post).
    Everything else (other methods on that path: 405 with Allow; every other route) is FastAPI's."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/messages" and not self.root_path:
            await self.lean_post(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _is_device_id(text: str) -> bool:
    """Device ids are 40 lowercase hex characters (messages.device_id_from_public_key)."""
    return len(text) == 40 and set(text) <= _HEX


def _validation_detail(errors: list[dict]) -> str:
    """First pydantic/FastAPI error as 'where: what was expected'."""
    if not errors:
        return "request: invalid"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("path", "query", "header"):
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}"
    elif loc and loc[0] == "body":
        where = "body" + ("." + ".".join(loc[1:]) if len(loc) > 1 else "")
    else:
        where = ".".join(loc) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


# --------------------------------------------------------------------------- the app

def _is_loopback_client(host: str | None) -> bool:
    return host is not None and (host.startswith("127.") or host in ("::1", "localhost"))


def create_app(settings: LedgerSettings) -> FastAPI:
    """Build the ledger API over a store at ``settings.db_path`` (created if missing)."""
    def make_store() -> LedgerStore:
        return LedgerStore(settings.db_path, settings.rules, settings.report_deadline_seconds, settings.last_market_id,
                           clock=settings.clock, default_sell_capacity_wh=settings.default_sell_capacity_wh,
                           max_open_shortfall_wh=settings.max_open_shortfall_wh, max_open_orders=settings.max_open_orders,
                           authority=settings.authority_key, ledger_id=settings.ledger_id,
                           seal_interval_ms=settings.seal_interval_ms)

    committer: Any
    if settings.writer_process:
        from .writer_process import PipelinedCommitter, RemoteStore

        store: Any = RemoteStore(make_store)  # the same store, in a forked child (writer_process.py)
        committer = PipelinedCommitter(store)  # messages over a channel of their own, from the event loop
    else:
        store = make_store()
        committer = GroupCommitter(store)
    rules = settings.rules
    verifier = fastpath.Verifier()
    device_limiter = RateLimiter(settings.device_rate)
    client_limiter = RateLimiter(settings.client_rate)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await committer.open()
        store.start_checkpointer()
        yield
        await committer.close()
        store.close()

    app = _LedgerAPI(
        title=API_TITLE,
        version=API_VERSION,
        description=(
            "Reference service-provider API for DGC boards: signed orders, cancels and delivery reports; "
            "a continuous double auction per delivery slot; prepaid buyer locks; settlement on metered energy. "
            "All numbers are integers (Wh, minor units per kWh, milli-minor units, epoch ms). "
            "Every error is JSON: {status: 'rejected', code, detail}. Operator endpoints need "
            "'Authorization: Bearer <operator token>'; a device's private reads need its signed read request "
            "(X-DGC-Read, X-DGC-Read-Signature) or the operator token."
        ),
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.settings = settings
    app.state.committer = committer

    def now_ms() -> int:
        """The ledger's time, after closing whatever that time has closed."""
        now = settings.clock()
        store.sweep(now)
        return now

    def client_rejection(scope: dict) -> Optional[JSONResponse]:
        """Per client address, before anything is parsed: a flood costs a dict look-up and a 429."""
        client = scope.get("client")
        return client_rejection_of(client[0] if client else "unknown")

    def client_rejection_of(host: str) -> Optional[JSONResponse]:
        wait_s = client_limiter.take(host)
        if not wait_s:
            return None
        return _too_many(f"client {host[:64]}: more than {settings.client_rate.per_second:g} requests per second "
                         f"(burst {settings.client_rate.burst}); expected a retry after {wait_s:.2f} s", wait_s)

    if settings.client_rate.enabled:
        app.add_middleware(_ClientLimit, reject=client_rejection)  # a plain ASGI middleware: no per-request task

    @app.exception_handler(Rejection)
    async def on_rejection(request: Request, exc: Rejection) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _reject("malformed", _validation_detail(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = None
        if exc.status_code == 404:
            detail = f"no endpoint {request.method} {request.url.path[:200]}; expected one of the /v1 paths in docs/ledger-api.json"
            code = "not_found"
        elif exc.status_code == 405:
            allowed = _allowed_methods(app, request.scope)
            detail = (f"{request.method} is not allowed on {request.url.path[:200]}; expected "
                      f"{' or '.join(allowed) or 'one of the methods in docs/ledger-api.json'}")
            code = "method_not_allowed"
            headers = {"Allow": ", ".join(allowed)}
        else:
            detail, code = str(exc.detail), "http_error"
        return JSONResponse({"status": "rejected", "code": code, "detail": detail}, status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"status": "error", "code": "internal", "detail": "internal ledger error; the request was not applied"},
            status_code=500,
        )

    # ----------------------------------------------------------------- access

    def _operator_ok(request: Request) -> bool:
        """True only when the ledger has an operator token and the request carries it."""
        if settings.operator_token is None:
            return False
        header = request.headers.get("authorization", "")
        expected = f"Bearer {settings.operator_token}".encode()
        return hmac.compare_digest(header.encode("utf-8", "replace"), expected)

    def _require_operator(request: Request) -> None:
        if settings.operator_token is None:
            raise Rejection("unauthorized", "this ledger was started without an operator token, so it has no operator; "
                                            "expected a ledger started with --operator-token")
        if not _operator_ok(request):
            raise Rejection("unauthorized", "Authorization header: expected 'Bearer <operator token>' (the token was missing or wrong)")

    def _signed_path(request: Request) -> str:
        query = request.scope.get("query_string", b"").decode("latin-1")
        return request.scope["path"] + (f"?{query}" if query else "")

    def _reader(request: Request) -> Optional[str]:
        """The device id that signed this read request, None for the operator; raises Rejection otherwise.

        Checked in order of cost: headers present, payload shape, device known (no cryptography
        for an unknown id), then the signature (coincurve), then ledger, path and time window."""
        if _operator_ok(request):
            return None
        payload_text = request.headers.get(READ_HEADER)
        signature_text = request.headers.get(READ_SIGNATURE_HEADER)
        if payload_text is None or signature_text is None:
            raise Rejection(
                "unauthorized",
                "this is a device's private data: expected the device's signed read request (headers X-DGC-Read and "
                "X-DGC-Read-Signature) or 'Authorization: Bearer <operator token>'",
            )
        try:
            message = SignedMessage.from_wire({"payload": payload_text, "signature": signature_text})
            fields = json.loads(message.payload) if len(message.payload) <= MAX_PAYLOAD_BYTES else None
        except (MessageError, ValueError):
            raise Rejection("malformed", "X-DGC-Read: expected a canonical read request and a 128-hex signature") from None
        device_id = fields.get("device_id") if isinstance(fields, dict) else None
        if not isinstance(device_id, str) or not _is_device_id(device_id) or fields.get("type") != "read":
            raise Rejection("malformed", "X-DGC-Read: expected a read request (type 'read') naming the device's id")
        public_key = store.public_key_of(device_id)
        if public_key is None:
            raise Rejection("unknown_device", f"X-DGC-Read.device_id: no device {device_id} is registered")
        if not verify_signature(message.payload, message.signature, public_key, backend="coincurve"):
            raise Rejection("bad_signature", "X-DGC-Read-Signature: does not verify against the device's registered key")
        try:
            fields = open_message(message, public_key, backend="coincurve")
        except MessageError as exc:
            raise Rejection("malformed", f"X-DGC-Read: {exc}") from None
        if fields["ledger_id"] != settings.ledger_id:
            raise Rejection("wrong_ledger", f"X-DGC-Read.ledger_id: {fields['ledger_id']!r} is not this ledger; expected {settings.ledger_id!r}")
        if fields["path"] != _signed_path(request):
            raise Rejection("unauthorized", f"X-DGC-Read.path: signed for {fields['path'][:128]!r}, not this request; "
                                            "expected the exact path and query of the request")
        now = settings.clock()
        if now > fields["expires_at"] * 1000:
            raise Rejection("expired", f"X-DGC-Read.expires_at: {fields['expires_at']} is before the ledger's time {now // 1000}")
        if fields["issued_at"] * 1000 > now + MAX_FUTURE_ISSUE_SECONDS * 1000:
            raise Rejection("not_yet_valid", f"X-DGC-Read.issued_at: more than {MAX_FUTURE_ISSUE_SECONDS} s after the ledger's "
                                             f"time {now // 1000}; expected the board's clock to agree with GET /v1/time")
        if store.revoked_ms(device_id) is not None:
            raise Rejection("revoked", f"X-DGC-Read.device_id: device {device_id} was revoked by the operator")
        return device_id

    def _require_reader_of(request: Request, device_id: str) -> None:
        """Operator, or the device itself (a signed read by another device is refused)."""
        reader = _reader(request)
        if reader is not None and reader != device_id:
            raise Rejection("unauthorized", "X-DGC-Read.device_id: a device may read only its own data; "
                                            "expected a read request signed by the device in the path")

    def _require_device(device_id: str) -> None:
        if not _is_device_id(device_id) or store.account(device_id) is None:
            raise Rejection("not_found", f"device_id: no device {device_id[:64]!r} is registered; expected the id from POST /v1/devices")

    def device_path():
        return PathParam(pattern=DEVICE_ID_PATTERN, description="40 lowercase hex: sha256(compressed key)[:20]")

    # ----------------------------------------------------------------- clock and rules

    @app.get("/v1/time", response_model=TimeOut, responses=_REJECTIONS, summary="The ledger's clock (boards check their skew against it)")
    def get_time() -> dict:
        return {"time_ms": settings.clock()}

    @app.get("/v1/info", response_model=InfoOut, responses=_REJECTIONS, summary="Ledger id and market rules")
    def get_info() -> dict:
        return {
            "ledger_id": settings.ledger_id,
            "slot_seconds": rules.slot_seconds,
            "markets_ahead": rules.markets_ahead,
            "lot_wh": rules.lot_wh,
            "gate_closure_seconds": rules.gate_closure_seconds,
            "price_min_per_kwh_minor": rules.price_min_per_kwh_minor,
            "price_max_per_kwh_minor": rules.price_max_per_kwh_minor,
            "report_deadline_seconds": settings.report_deadline_seconds,
            "last_market_id": settings.last_market_id,
            "authority_public_key": store.authority_public_key.hex(),
        }

    # ------------------------------------------------------------------------- the record

    @app.get("/v1/log/blocks", response_model=BlocksOut, responses=_REJECTIONS,
             summary="The record's sealed, signed blocks (headers; with their entries for the operator)")
    def get_blocks(request: Request, start: int = Query(0, ge=0, le=INT64_MAX, alias="from", description="first height"),
                   limit: int = Query(100, ge=1, le=1000)) -> JSONResponse:
        blocks, count = store.blocks(start, limit, settings.clock(), with_entries=_operator_ok(request))
        return JSONResponse({"blocks": blocks, "count": count})

    @app.get("/v1/devices/{device_id}/messages/{nonce}/proof", response_model=ProofOut, responses=_REJECTIONS,
             summary="Inclusion proof of one of the device's accepted messages (the device's signed read, or the operator)")
    def get_message_proof(request: Request, device_id: str = device_path(),
                          nonce: int = PathParam(ge=1, le=INT64_MAX)) -> JSONResponse:
        _require_reader_of(request, device_id)
        proof = store.message_proof(device_id, nonce, settings.clock())
        if proof is None:
            return _reject("not_found", f"nonce: no accepted message {nonce} of device {device_id} is in the record")
        return JSONResponse(proof)

    @app.get("/v1/trades/{trade_id}/proof", response_model=ProofOut, responses=_REJECTIONS,
             summary="Inclusion proof of a trade (a party's signed read, or the operator)")
    def get_trade_proof(request: Request, trade_id: int = PathParam(ge=1, le=INT64_MAX)) -> JSONResponse:
        reader = _reader(request)
        trade = store.trade(trade_id)
        if trade is None or (reader is not None and reader not in (trade["seller"]["device_id"], trade["buyer"]["device_id"])):
            return _reject("not_found", f"trade_id: no trade {trade_id} of yours; expected an id from your trades listing")
        proof = store.trade_proof(trade_id, settings.clock())
        if proof is None:
            return _reject("not_found", f"trade_id: trade {trade_id} is not in the record")
        return JSONResponse(proof)

    # ------------------------------------------------------------------------- devices

    @app.post(
        "/v1/devices",
        response_model=RegisterOut,
        responses=_REJECTIONS,
        summary="Register a device's public key (operator only); idempotent",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": RegisterIn.model_json_schema()}}}},
    )
    async def register(request: Request) -> JSONResponse:
        _require_operator(request)
        raw = await _read_body(request)
        obj = _parse_json(raw, "body")
        try:
            body = RegisterIn.model_validate(obj)
        except ValidationError as exc:
            return _reject("malformed", _validation_detail([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]))
        credit = settings.initial_credit_milli_minor if body.credit_milli_minor is None else body.credit_milli_minor
        account, created = await run_in_threadpool(store.register_device, body.public_key, body.name, credit, settings.clock(),
                                                   sell_capacity_wh=body.sell_capacity_wh)
        return JSONResponse({**account, "created": created})

    @app.post(
        "/v1/devices/{device_id}/revoke",
        response_model=RevokeOut,
        responses=_REJECTIONS,
        summary="Revoke a device (operator only): its messages are rejected 'revoked' "
                "from now on and its open orders are cancelled; idempotent",
    )
    async def revoke(request: Request, device_id: str = device_path()) -> JSONResponse:
        _require_operator(request)
        account, already, cancelled = await run_in_threadpool(store.revoke_device, device_id, settings.clock())
        return JSONResponse({**account, "already_revoked": already, "cancelled_orders": cancelled})

    @app.post(
        "/v1/devices/{device_id}/clear-shortfalls",
        response_model=Account,
        responses=_REJECTIONS,
        summary="The operator's audit cleared the device's shortfalls (operator only): it may place orders again",
    )
    async def clear_shortfalls(request: Request, device_id: str = device_path()) -> JSONResponse:
        _require_operator(request)
        return JSONResponse(await run_in_threadpool(store.clear_shortfalls, device_id, settings.clock()))

    @app.get("/v1/devices/{device_id}", response_model=Account, responses=_REJECTIONS,
             summary="A device's account (the device's signed read, or the operator)")
    def get_account(request: Request, device_id: str = device_path()) -> JSONResponse:
        _require_reader_of(request, device_id)
        now_ms()
        account = store.account(device_id)
        if account is None:
            return _reject("not_found", f"device_id: no device {device_id[:64]!r} is registered; expected the id from POST /v1/devices")
        return JSONResponse(account)

    @app.get("/v1/devices/{device_id}/trades", response_model=DeviceTradesOut, responses=_REJECTIONS,
             summary="Trades involving the device, newer than a cursor (the device's signed read, or the operator)")
    def get_device_trades(
        request: Request,
        device_id: str = device_path(),
        after: int = Query(0, ge=0, le=INT64_MAX, description="cursor from the previous answer; 0 for all"),
        limit: int = Query(500, ge=1, le=1000),
    ) -> JSONResponse:
        _require_reader_of(request, device_id)
        now_ms()
        _require_device(device_id)
        trades, cursor = store.device_trades(device_id, after, limit)
        return JSONResponse({"trades": trades, "cursor": cursor})

    @app.get("/v1/devices/{device_id}/orders", response_model=OrdersOut, responses=_REJECTIONS,
             summary="The device's orders (the device's signed read, or the operator)")
    def get_device_orders(request: Request, device_id: str = device_path(),
                          market_id: Optional[int] = Query(None, ge=0, le=INT64_MAX)) -> JSONResponse:
        _require_reader_of(request, device_id)
        now_ms()
        _require_device(device_id)
        return JSONResponse({"orders": store.device_orders(device_id, market_id)})

    @app.get("/v1/devices/{device_id}/messages", response_model=MessagesOut, responses=_REJECTIONS,
             summary="The device's stored messages (nonce order): proof that each was recorded once "
                     "(the device's signed read, or the operator)")
    def get_device_messages(
        request: Request,
        device_id: str = device_path(),
        after: int = Query(0, ge=0, le=INT64_MAX, description="only nonces above this"),
        limit: int = Query(1000, ge=1, le=1000),
    ) -> JSONResponse:
        _require_reader_of(request, device_id)
        now_ms()
        _require_device(device_id)
        return JSONResponse({"messages": store.device_messages(device_id, after, limit)})

    # ------------------------------------------------------------------------ messages

    @app.post(
        "/v1/messages",
        response_model=Accepted,
        responses=_REJECTIONS,
        summary="Submit a signed order, cancel or delivery report (deduplicated on device and nonce)",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": Envelope.model_json_schema()}}}},
    )
    async def post_message(request: Request) -> JSONResponse:
        # The route documents the operation (OpenAPI); requests are answered by _lean_post below,
        # in front of FastAPI's stack. This body is the same path for anything that reaches it.
        raw = await _read_body(request)
        checked = _check_message(raw)
        if isinstance(checked, JSONResponse):
            return checked
        fields, message = checked
        outcome = await committer.submit(fields, message.payload, message.signature)  # group commit, under the lock
        return JSONResponse(outcome.body, status_code=outcome.http_status)

    async def _lean_post(scope: dict, receive, send) -> None:
        """POST /v1/messages as a plain ASGI handler: the hot path of a busy ledger.

        Why: FastAPI's routing (every route's regex tried), dependency solving, request object
        and exception-middleware layers cost more CPU per message than parsing, verifying and
        committing it. The checks and answers are exactly those of ``post_message`` (the same
        ``_check_message``, the same JSON bodies, status codes and headers; the client limit
        first, as its middleware would), so the HTTP tests hold for both."""
        try:
            if client_limited:
                response = client_rejection(scope)
                if response is not None:
                    await response(scope, receive, send)
                    return
            raw = await _lean_body(scope, receive)
            if raw is None:  # the client went away before sending its body: nothing to answer
                return
            checked = _check_message(raw)
            if isinstance(checked, JSONResponse):
                await checked(scope, receive, send)
                return
            fields, message = checked
            result: Any = await committer.submit(fields, message.payload, message.signature)
        except Exception as exc:
            result = exc
        status, data = _answer(result)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(data)).encode("ascii")), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    def _answer(result: Any) -> tuple[int, bytes]:
        """Status and body bytes for what the committer (or a check) gave: an Outcome, or an exception."""
        if isinstance(result, Outcome):
            return result.http_status, result.data if result.data is not None else _render(result.body)
        if isinstance(result, Rejection):
            return result.http_status, _render(result.body())
        log.error("internal error on POST /v1/messages", exc_info=result)
        return 500, _render({"status": "error", "code": "internal", "detail": "internal ledger error; the request was not applied"})

    def fast_post(raw: bytes, client_host: str, reply: Callable[[int, bytes, list], None]) -> None:
        """POST /v1/messages for fast_http's protocol: the body is whole (its length was checked
        against MAX_BODY_BYTES from Content-Length), the answer goes to ``reply(status, body,
        headers)`` - at once for a refusal, after the commit for a message. Exactly ``_lean_post``'s
        checks, order and answers, without an ASGI scope, a task or a future per message."""
        try:
            if client_limited:
                response = client_rejection_of(client_host)
                if response is not None:
                    reply(response.status_code, response.body, response.raw_headers)
                    return
            checked = _check_message(raw)
            if isinstance(checked, JSONResponse):
                reply(checked.status_code, checked.body, checked.raw_headers)
                return
            fields, message = checked
            committer.submit_then(fields, message.payload, message.signature, asyncio.get_running_loop(),
                                  lambda result: reply(*_answer(result), _JSON_HEADERS))
        except Exception as exc:
            reply(*_answer(exc), _JSON_HEADERS)

    client_limited = settings.client_rate.enabled
    known_keys = store.known_public_keys  # device id -> key, filled by public_key_of (keys never change)
    app.lean_post = _lean_post  # type: ignore[attr-defined]  (served by _LedgerAPI.__call__)
    app.fast_post = fast_post  # type: ignore[attr-defined]  (served by fast_http.LedgerHttpProtocol)

    def _check_message(raw: bytes):
        try:
            message = _envelope(_parse_json(raw, "body"))
        except MessageError as exc:
            return _reject("malformed", str(exc))
        try:
            peek = _parse_json(message.payload, "envelope.payload")
        except Rejection as exc:
            return _reject(exc.code, exc.detail)
        device_id = peek.get("device_id") if isinstance(peek, dict) else None
        # A key already in memory names a registered, hence well-formed, id: the shape is checked only otherwise.
        public_key = known_keys.get(device_id) if type(device_id) is str else None
        if public_key is None:
            if not isinstance(device_id, str) or not _is_device_id(device_id):
                return _reject("malformed", "payload.device_id: expected the sending device's id (40 lowercase hex characters)")
            public_key = store.public_key_of(device_id)  # before any cryptography: an unknown id costs a look-up
        if public_key is None:
            return _reject("unknown_device", f"payload.device_id: no device {device_id[:64]!r} is registered; expected a registered device")
        if not verifier.verify(message.payload, message.signature, public_key):
            log.debug("bad signature on a message claiming device %s", device_id)  # not a line per forgery at INFO
            return _reject(
                "bad_signature",
                "signature: does not verify against the registered public key of payload.device_id "
                "(the payload was altered or signed by another key); expected the board's signature over the exact payload",
            )
        # open_message's remaining checks (canonical form, schema); the key was looked up by
        # this very device id, and a registered id is derived from its key, so they match.
        if fastpath.fields_ok(peek) and fastpath.is_canonical(peek, message.payload):
            fields = peek  # what canonical_bytes(peek) == payload says, without re-validating in Python
        else:
            try:
                fields = peek if canonical_bytes(peek) == message.payload else None
            except MessageError as exc:
                return _reject("malformed", str(exc))
        if fields is None:
            return _reject("malformed", "payload: not in canonical form (sorted keys, compact, integers and strings only)")
        if fields["type"] not in ("order", "cancel", "delivery_report"):
            return _reject("malformed", f"type: {fields['type']!r} is not a message to submit; expected order, cancel or delivery_report")
        if fields["ledger_id"] != settings.ledger_id:
            return _reject(
                "wrong_ledger",
                f"payload.ledger_id: {fields['ledger_id']!r} is not this ledger; expected {settings.ledger_id!r}",
                nonce=fields["nonce"],
            )
        wait_s = device_limiter.take(device_id)
        if wait_s:
            return _too_many(f"device {device_id}: more than {settings.device_rate.per_second:g} messages per second "
                             f"(burst {settings.device_rate.burst}); expected a retry after {wait_s:.2f} s", wait_s,
                             nonce=fields["nonce"])
        return fields, message

    # ------------------------------------------------------------------------- markets

    def _check_market(market_id: int) -> None:
        if not rules.is_market_id(market_id):
            raise Rejection(
                "unknown_market",
                f"market_id: {market_id} is not a slot start; expected a multiple of {rules.slot_seconds} (UTC epoch seconds)",
            )

    def market_path():
        return PathParam(ge=0, le=INT64_MAX, multiple_of=rules.slot_seconds,
                         description=f"the slot start, UTC epoch seconds (a multiple of {rules.slot_seconds})")

    @app.get("/v1/markets/{market_id}/book", response_model=BookOut, responses=_REJECTIONS,
             summary="A market's open quantity per price level (public: aggregates only)")
    def get_book(market_id: int = market_path()) -> JSONResponse:
        now = now_ms()
        _check_market(market_id)
        book = store.book(market_id)
        return JSONResponse({"market_id": market_id, "gate_open": rules.gate_open(market_id, now // 1000), **book})

    @app.get("/v1/markets/{market_id}/trades", response_model=MarketTradesOut, responses=_REJECTIONS,
             summary="A market's trades with reports and settlements (operator only)")
    def get_market_trades(request: Request, market_id: int = market_path()) -> JSONResponse:
        _require_operator(request)
        now_ms()
        _check_market(market_id)
        return JSONResponse({"market_id": market_id, "trades": store.market_trades(market_id)})

    @app.get("/v1/trades/{trade_id}", response_model=TradeDetail, responses=_REJECTIONS,
             summary="One trade with both reports and its settlement (a party's signed read, or the operator)")
    def get_trade(request: Request, trade_id: int = PathParam(ge=1, le=INT64_MAX)) -> JSONResponse:
        reader = _reader(request)
        now_ms()
        trade = store.trade(trade_id)
        if trade is None or (reader is not None and reader not in (trade["seller"]["device_id"], trade["buyer"]["device_id"])):
            # the same answer for "no such trade" and "not yours": a device learns nothing of others' trades
            return _reject("not_found", f"trade_id: no trade {trade_id} of yours; expected an id from your trades listing")
        return JSONResponse(trade)

    @app.get("/v1/stats", response_model=StatsOut, responses=_REJECTIONS, summary="Counts and totals for dashboards and demos (aggregates only)")
    def get_stats() -> JSONResponse:
        now_ms()
        return JSONResponse(store.stats())

    views_api.register(app, store, rules=rules, last_market_id=settings.last_market_id, now_ms=now_ms,
                       require_operator=_require_operator, responses=_REJECTIONS)  # markets list, per-device summary
    return app


def _allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """The methods of the routes whose path matches (for a 405's Allow header)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        methods_of = getattr(route, "methods", None)
        if not methods_of:
            continue
        match, _ = route.matches({**scope, "method": next(iter(methods_of))})
        if match == Match.FULL:
            methods |= set(methods_of)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class _ClientLimit:
    """ASGI middleware: answer 429 before routing when the client address is over its rate."""

    def __init__(self, app, reject) -> None:
        self.app, self.reject = app, reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            response = self.reject(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_many(detail: str, wait_s: float, **extra: Any) -> JSONResponse:
    rejection = Rejection("rate_limited", detail)
    return JSONResponse(rejection.body(**extra), status_code=429, headers={"Retry-After": str(max(1, int(wait_s + 0.999)))})
