"""REST backend of the ledger interface: the thin HTTP adapter that runs on the board.

Why it is this careful:
- The board runs unattended and the network between it and the service provider is not ours.
  Every answer is checked for shape and types before anything reads it; a hostile, truncated,
  oversized or nonsensical answer becomes ``LedgerUnavailable`` with a sentence saying what was
  wrong - never a KeyError or TypeError deep inside the daemon, never a bid on stale data.
- Retries (with exponential back-off) happen only on transient failures, and are safe for
  ``submit`` because the ledger deduplicates on (device, nonce): a message that did arrive
  before the connection dropped is answered "duplicate" and applied once.
- A 4xx is the ledger's permanent answer only when it carries the ledger's rejection body
  (``{"status": "rejected", "code", "detail"}``). A 4xx without it (a proxy's HTML page, a wrong
  URL) says nothing about the message, so it is treated as transient: the outbox keeps the
  signed bytes instead of dropping a bid because of a misconfigured relay. 408/425/429 are
  transient too.
- A deadline bounds the *whole* call (connect, send, status line, headers, body), not each
  read: a ledger or a relay that trickles one byte every half second would otherwise hold the
  outbox job for as long as it likes, since every single read arrives inside its timeout. Each
  read gets the time that is left of the call as its socket timeout.
- The standard library's ``http.client`` only (no ``requests``/``urllib3`` on the board: the
  deadline needs the socket, and the idle daemon saves several MiB of imports). One connection
  per call, closed after it: a board makes a few calls a minute. No float is accepted anywhere
  in an answer.
- Redirects are not followed: a signed message goes to the configured ledger or nowhere.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

from firmware.messages import READ_MAX_TTL_SECONDS, SignedMessage, Signer, new_fields, sign_message

from . import record
from .base import (
    TRADE_SIDES,
    TRADE_STATES,
    LedgerRejected,
    LedgerUnavailable,
    Refusal,
    SubmitResult,
    TradeRecord,
)

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 1000
TRANSIENT_4XX = (408, 425, 429)
_TRANSPORT_ERRORS = (http.client.HTTPException, OSError, ValueError)

# The bench ledger's rejection codes (docs/ledger.md, "All codes") -> what they mean to the board
# (firmware.ledger.base.Refusal). Only this adapter knows these strings; the scheduler branches on
# the Refusal. report_too_early (425), rate_limited (429) never get here: transient 4xx are
# LedgerUnavailable. A code not listed (a newer ledger) is a plain permanent refusal.
REFUSALS: dict[str, Refusal] = {
    "expired": Refusal.RESIGN,
    "not_yet_valid": Refusal.RESIGN,
    "unknown_device": Refusal.DEVICE_UNKNOWN,
    "revoked": Refusal.DEVICE_REVOKED,
    "unauthorized": Refusal.DEVICE_UNAUTHORISED,
    "not_found": Refusal.NOT_FOUND,
    "order_closed": Refusal.ORDER_CLOSED,
    **{code: Refusal.REFUSED for code in (
        "malformed", "bad_signature", "nonce_conflict", "too_large", "wrong_ledger", "unknown_market", "gate_closed",
        "price_out_of_band", "not_whole_lots", "energy_too_large", "insufficient_funds", "over_capacity",
        "too_many_orders", "unknown_order", "not_owner", "unknown_trade", "not_a_party", "wrong_role",
        "trade_settled", "report_too_late", "audit_failed", "method_not_allowed",
        "report_too_early", "rate_limited",  # only if ever sent without their transient status
    )},
}


def refusal_for(code: str) -> Refusal:
    """What the bench ledger's rejection ``code`` means to the board."""
    return REFUSALS.get(code, Refusal.REFUSED)


class RestRejected(LedgerRejected):
    """``LedgerRejected`` from the REST ledger, with the HTTP status (REST-only; the scheduler
    never reads it: it acts on ``refusal``)."""

    def __init__(self, code: str, detail: str, http_status: int) -> None:
        super().__init__(code, detail, refusal_for(code), message=f"ledger refused the request ({http_status} {code}): {detail}")
        self.http_status = http_status



@dataclass(frozen=True)
class TimeSample:
    """One round trip to the ledger's clock: local wall-clock ms just before the request was sent
    and just after the answer arrived, and the ledger's time in between. The clock guard measures
    skew on this one attempt, so retries and back-off never widen the window."""

    server_ms: int
    sent_ms: int
    received_ms: int

    @property
    def round_trip_ms(self) -> int:
        return self.received_ms - self.sent_ms

    @property
    def skew_ms(self) -> int:
        """Ledger minus local clock at the midpoint of the round trip (error at most round_trip_ms/2)."""
        return self.server_ms - (self.sent_ms + self.received_ms) // 2


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each with the time left of the call as its timeout."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float) -> None:
        self._sock, self._deadline, self._timeout_s = sock, deadline, timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self._timeout_s:.1f} s (the deadline of the whole call)")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"no complete answer within {self._timeout_s:.1f} s (the deadline of the whole call)") from None


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` needs of a socket (``makefile``), with the call's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, timeout_s: float) -> None:
        self._raw = _DeadlineReader(sock, deadline, timeout_s)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


class _Transient(Exception):
    """One attempt failed in a way worth retrying."""


class _BadAnswer(Exception):
    """An answer whose shape or types are wrong (turned into LedgerUnavailable)."""


# ----------------------------------------------------------------------- shape checks

def _strict_json(data: bytes) -> Any:
    def no_float(value: str) -> Any:
        raise ValueError(f"non-integer number {value[:20]}")

    def no_constant(value: str) -> Any:
        raise ValueError(f"non-JSON constant {value}")

    try:
        return json.loads(data.decode("utf-8"), parse_float=no_float, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        text = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise _BadAnswer(f"answer is not strict JSON of integers and strings ({text[:200]})") from None


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _BadAnswer(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = INT64_MIN) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise _BadAnswer(f"{what}.{key}: expected an integer, got {type(value).__name__}")
    if not minimum <= value <= INT64_MAX:
        raise _BadAnswer(f"{what}.{key}: {value} is out of range (expected {minimum} to {INT64_MAX})")
    return value


def _str(obj: Mapping[str, Any], key: str, what: str, *, choices: tuple[str, ...] | None = None) -> str:
    value = obj.get(key)
    if type(value) is not str:
        raise _BadAnswer(f"{what}.{key}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise _BadAnswer(f"{what}.{key}: longer than {MAX_TEXT_CHARS} characters")
    if choices is not None and value not in choices:
        raise _BadAnswer(f"{what}.{key}: expected one of {', '.join(choices)}, got {value[:40]!r}")
    return value


def _bool(obj: Mapping[str, Any], key: str, what: str) -> bool:
    value = obj.get(key)
    if type(value) is not bool:
        raise _BadAnswer(f"{what}.{key}: expected true or false, got {type(value).__name__}")
    return value


def _list(obj: Mapping[str, Any], key: str, what: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise _BadAnswer(f"{what}.{key}: expected a list, got {type(value).__name__}")
    return value


def _trade(value: Any, what: str) -> TradeRecord:
    t = _obj(value, what)
    return TradeRecord(
        trade_id=_int(t, "trade_id", what, minimum=1),
        market_id=_int(t, "market_id", what, minimum=0),
        side=_str(t, "side", what, choices=TRADE_SIDES),
        energy_wh=_int(t, "energy_wh", what, minimum=1),
        price_per_kwh_minor=_int(t, "price_per_kwh_minor", what, minimum=1),
        order_nonce=_int(t, "order_nonce", what, minimum=1),
        counterparty=_str(t, "counterparty", what),
        state=_str(t, "state", what, choices=TRADE_STATES),
    )


def _book_level(value: Any, what: str) -> dict:
    e = _obj(value, what)
    return {
        "price_per_kwh_minor": _int(e, "price_per_kwh_minor", what, minimum=1),
        "remaining_wh": _int(e, "remaining_wh", what, minimum=1),
        "orders": _int(e, "orders", what, minimum=1),
    }


def _device_id(signer: Signer) -> str:
    from firmware.messages import device_id_from_public_key

    return device_id_from_public_key(signer.public_key)


# ---------------------------------------------------------------------------- adapter

class RestLedger:
    """The ledger interface over the bench ledger's REST API (docs/ledger-api.json)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int,
        retries: int,
        backoff_ms: int,
        verify_tls: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        signer: Signer | None = None,
        ledger_id: str | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected an http:// or https:// URL, got {url!r}")
        if timeout_ms <= 0 or backoff_ms < 0 or retries < 0:
            raise ValueError("timeout_ms must be positive, backoff_ms and retries zero or more")
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"url: the port of {url!r} is not a number from 0 to 65535") from None
        if not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"url: expected http(s)://HOST[:PORT][/PATH] without query, got {url!r}")
        self._https = parts.scheme == "https"
        self._host, self._port, self._base_path = parts.hostname, port, parts.path.rstrip("/")
        self.timeout_s = timeout_ms / 1000
        self.retries = retries
        self.backoff_s = backoff_ms / 1000
        self.verify_tls = verify_tls
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        if (signer is None) != (ledger_id is None):
            raise ValueError("signer and ledger_id: expected both (signed reads of the device's own data) or neither")
        # The device key signs read requests for the device's own account and trades (the ledger
        # shows them to nobody else); it never leaves the Signer.
        self._signer, self._ledger_id = signer, ledger_id
        self._clock_ms = clock_ms  # the board's wall clock (read time stamps, time samples)
        self._tls: ssl.SSLContext | None = None
        if self._https:
            self._tls = ssl.create_default_context()
            if not verify_tls:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    @classmethod
    def from_config(cls, config: Any, *, signer: Signer | None = None) -> "RestLedger":
        """Build from the board config's [ledger] table (firmware.config.LedgerConfig); with the
        device key as ``signer`` its reads of its own account and trades are signed."""
        return cls(config.url, timeout_ms=config.timeout_ms, retries=config.retries, backoff_ms=config.backoff_ms,
                   verify_tls=config.verify_tls, signer=signer, ledger_id=config.ledger_id if signer is not None else None)

    def _read_headers(self, target: str) -> dict[str, str]:
        """X-DGC-Read / X-DGC-Read-Signature for one request (signed per attempt: fresh time stamps)."""
        if self._signer is None:
            return {}
        now_ms = self._clock_ms()
        fields = new_fields("read", ledger_id=self._ledger_id, device_id=_device_id(self._signer), nonce=now_ms,
                            issued_at=now_ms // 1000, ttl_s=READ_MAX_TTL_SECONDS, path=target)
        wire = sign_message(fields, self._signer).to_wire()
        return {"X-DGC-Read": wire["payload"], "X-DGC-Read-Signature": wire["signature"]}

    def __repr__(self) -> str:
        return f"RestLedger({self.url!r})"

    # ------------------------------------------------------------------ transport

    def _once(self, method: str, path: str, body: Any, params: Mapping[str, Any] | None,
              signed: bool = False) -> tuple[int, Mapping[str, Any]]:
        """One HTTP exchange within one deadline. Returns (status, JSON object) for 2xx and for a proper 4xx rejection."""
        deadline = time.monotonic() + self.timeout_s
        api_target = path + (("?" + urlencode(params)) if params else "")
        target = self._base_path + api_target
        data_out = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        send_headers = {"Accept": "application/json", "Connection": "close", **(self._read_headers(api_target) if signed else {})}
        if data_out is not None:
            send_headers["Content-Type"] = "application/json"
        if self._https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            try:
                conn.connect()
                conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                conn.request(method, target, body=data_out, headers=send_headers)
                response = http.client.HTTPResponse(_DeadlineSocket(conn.sock, deadline, self.timeout_s), method=method)
                response.begin()
            except (TimeoutError, socket.timeout):
                raise _Transient(f"no complete answer within {self.timeout_s:.1f} s (the deadline of the whole call)") from None
            except _TRANSPORT_ERRORS as exc:
                raise _Transient(f"no answer ({type(exc).__name__}: {str(exc)[:200]})") from None
            try:
                declared = response.getheader("Content-Length", "") or ""
                if declared.isdigit() and int(declared) > self.max_response_bytes:
                    raise _Transient(f"answer of {declared} bytes is larger than {self.max_response_bytes}")
                status = response.status
                try:
                    data = response.read(self.max_response_bytes + 1)
                except (TimeoutError, socket.timeout):
                    raise _Transient(f"no complete answer within {self.timeout_s:.1f} s (the deadline of the whole call)") from None
                except _TRANSPORT_ERRORS as exc:
                    raise _Transient(f"answer cut short ({type(exc).__name__}: {str(exc)[:200]})") from None
                if len(data) > self.max_response_bytes:
                    raise _Transient(f"answer is larger than {self.max_response_bytes} bytes")
            finally:
                response.close()
        finally:
            conn.close()
        if status >= 500 or status in TRANSIENT_4XX:
            raise _Transient(f"HTTP {status} from the ledger")
        if not 200 <= status < 500 or 300 <= status < 400:
            raise _Transient(f"unexpected HTTP {status} (redirects are not followed; check the ledger URL)")
        try:
            obj = _obj(_strict_json(data), "answer")
        except _BadAnswer as exc:
            raise _Transient(f"HTTP {status}: {exc}") from None
        if status >= 400:
            if obj.get("status") != "rejected" or type(obj.get("code")) is not str or type(obj.get("detail")) is not str:
                raise _Transient(f"HTTP {status} without a ledger rejection body (a proxy or a wrong URL?)")
        return status, obj

    def _call(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
              attempts: int | None = None, signed: bool = False) -> tuple[int, Mapping[str, Any]]:
        attempts = self.retries + 1 if attempts is None else attempts
        for attempt in range(attempts):
            try:
                return self._once(method, path, body, params, signed)
            except _Transient as exc:
                last = exc
                if attempt + 1 < attempts:
                    delay = self.backoff_s * (2**attempt)
                    log.warning("ledger %s %s: %s; retrying in %.2f s (%d/%d)", method, path, exc, delay, attempt + 1, self.retries)
                    self._sleep(delay)
        raise LedgerUnavailable(f"ledger {method} {path} failed after {attempts} attempt(s): {last}")

    def _get(self, path: str, params: Mapping[str, Any] | None = None, *, attempts: int | None = None,
             signed: bool = False) -> Mapping[str, Any]:
        status, obj = self._call("GET", path, params=params, attempts=attempts, signed=signed)
        if status >= 400:
            raise RestRejected(obj["code"][:100], obj["detail"][:MAX_TEXT_CHARS], status)
        if status != 200:
            raise LedgerUnavailable(f"ledger GET {path}: unexpected HTTP {status}, expected 200")
        return obj

    def _checked(self, path: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except _BadAnswer as exc:
            raise LedgerUnavailable(f"ledger GET {path}: malformed answer: {exc}") from None

    # ------------------------------------------------------------------ interface

    def server_time_ms(self) -> int:
        obj = self._get("/v1/time")
        return self._checked("/v1/time", lambda: _int(obj, "time_ms", "time", minimum=1))

    def server_time_sample(self) -> TimeSample:
        """The ledger's clock on ONE attempt (no retry, no back-off), with the local send and
        receive times around it, so the clock guard's skew has an error of at most half a round trip."""
        sent_ms = self._clock_ms()
        obj = self._get("/v1/time", attempts=1)
        received_ms = self._clock_ms()
        server_ms = self._checked("/v1/time", lambda: _int(obj, "time_ms", "time", minimum=1))
        return TimeSample(server_ms=server_ms, sent_ms=sent_ms, received_ms=received_ms)

    def info(self) -> dict:
        obj = self._get("/v1/info")

        def build() -> dict:
            out = dict(obj)
            out["ledger_id"] = _str(obj, "ledger_id", "info")
            for key in ("slot_seconds", "markets_ahead", "lot_wh", "price_min_per_kwh_minor", "price_max_per_kwh_minor"):
                out[key] = _int(obj, key, "info", minimum=1)
            out["gate_closure_seconds"] = _int(obj, "gate_closure_seconds", "info", minimum=0)
            return out

        return self._checked("/v1/info", build)

    def device_account(self, device_id: str) -> dict:
        path = f"/v1/devices/{quote(device_id, safe='')}"
        obj = self._get(path, signed=True)

        def build() -> dict:
            out = dict(obj)
            if _str(obj, "device_id", "account") != device_id:
                raise _BadAnswer(f"account.device_id: expected {device_id!r}, got another device's account")
            out["name"] = _str(obj, "name", "account")
            out["balance_milli_minor"] = _int(obj, "balance_milli_minor", "account")
            out["locked_milli_minor"] = _int(obj, "locked_milli_minor", "account", minimum=0)
            out["max_nonce"] = _int(obj, "max_nonce", "account", minimum=0)
            return out

        return self._checked(path, build)

    def market_book(self, market_id: int) -> dict:
        path = f"/v1/markets/{int(market_id)}/book"
        obj = self._get(path)

        def build() -> dict:
            if _int(obj, "market_id", "book") != market_id:
                raise _BadAnswer(f"book.market_id: expected {market_id}, got another market's book")
            return {
                **obj,
                "gate_open": _bool(obj, "gate_open", "book"),
                "asks": [_book_level(e, f"book.asks[{i}]") for i, e in enumerate(_list(obj, "asks", "book"))],
                "bids": [_book_level(e, f"book.bids[{i}]") for i, e in enumerate(_list(obj, "bids", "book"))],
            }

        return self._checked(path, build)

    def trades_since(self, device_id: str, cursor: int) -> tuple[list[TradeRecord], int]:
        path = f"/v1/devices/{quote(device_id, safe='')}/trades"
        obj = self._get(path, params={"after": int(cursor)}, signed=True)

        def build() -> tuple[list[TradeRecord], int]:
            trades = [_trade(t, f"trades[{i}]") for i, t in enumerate(_list(obj, "trades", "answer"))]
            new_cursor = _int(obj, "cursor", "answer", minimum=0)
            if new_cursor < cursor:
                raise _BadAnswer(f"answer.cursor: {new_cursor} goes back before the cursor sent ({cursor})")
            for trade in trades:
                if not cursor < trade.trade_id <= new_cursor:
                    raise _BadAnswer(f"trade {trade.trade_id}: outside the range asked for ({cursor}, {new_cursor}]")
            return trades, new_cursor

        return self._checked(path, build)

    # ------------------------------------------------------------ the signed record

    def _proof(self, path: str) -> record.InclusionProof:
        obj = self._get(path, signed=True)
        try:
            return record.InclusionProof.from_obj(obj)
        except record.RecordError as exc:
            raise LedgerUnavailable(f"ledger GET {path}: malformed proof: {exc}") from None

    def message_proof(self, device_id: str, nonce: int) -> record.InclusionProof:
        """The ledger's inclusion proof of one of the device's messages (not yet verified)."""
        return self._proof(f"/v1/devices/{quote(device_id, safe='')}/messages/{int(nonce)}/proof")

    def trade_proof(self, trade_id: int) -> record.InclusionProof:
        return self._proof(f"/v1/trades/{int(trade_id)}/proof")

    def verify_message_recorded(self, message: SignedMessage, authority_public_key: bytes) -> record.InclusionProof:
        """Check that ``message`` - these exact bytes and signature - is in a block signed by the
        pinned authority key. Raises ``record.RecordError`` when the ledger's answer does not prove
        it (alarm: the ledger denies or altered what it acknowledged), ``LedgerRejected``
        ('not_found') when the ledger says it has no such message, ``LedgerUnavailable`` when it
        cannot be asked now."""
        fields = message.fields
        proof = self.message_proof(fields["device_id"], fields["nonce"])
        if proof.leaf != record.message_leaf(message.payload, message.signature):
            raise record.RecordError(f"proof of nonce {fields['nonce']}: the recorded entry is not the message the board signed")
        proof.verify(authority_public_key, ledger_id=fields["ledger_id"])
        return proof

    def verify_trade_recorded(self, trade: TradeRecord, device_id: str, authority_public_key: bytes) -> record.InclusionProof:
        """Check that ``trade`` (as the trade poll gave it) is in a block signed by the pinned
        authority key. Same errors as ``verify_message_recorded``. A trade that fails this must
        not move energy."""
        proof = self.trade_proof(trade.trade_id)
        if not record.trade_matches_leaf(trade, device_id, proof.leaf):
            raise record.RecordError(f"proof of trade {trade.trade_id}: the recorded trade differs from the one reported to the board")
        proof.verify(authority_public_key, ledger_id=self._ledger_id)
        return proof

    def confirm_trade(self, trade: TradeRecord, device_id: str, authority_public_key: bytes | None) -> None:
        """The backend-specific landing check the scheduler asks before a trade may move energy
        (firmware/scheduler/trade_record.py, A3): here, the inclusion proof under the pinned key."""
        if authority_public_key is None:
            raise record.RecordError("no pinned authority key: the trade cannot be checked")
        self.verify_trade_recorded(trade, device_id, authority_public_key)

    def confirm_message(self, message: SignedMessage, authority_public_key: bytes | None) -> None:
        """Same seam for an accepted own message (the outbox asks after an accepted submit)."""
        if authority_public_key is None:
            raise record.RecordError("no pinned authority key: the message cannot be checked")
        self.verify_message_recorded(message, authority_public_key)

    def submit(self, message: SignedMessage) -> SubmitResult:
        """Submit a signed message; 4xx rejections are returned, transient failures raised."""
        try:
            nonce = json.loads(message.payload)["nonce"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("submit: the message's payload has no nonce; expected a message built by firmware.messages") from None
        status, obj = self._call("POST", "/v1/messages", body=message.to_wire())
        try:
            if status >= 400:
                code = _str(obj, "code", "rejection")[:100]
                return SubmitResult(
                    status="rejected",
                    duplicate=obj.get("duplicate") is True,
                    code=code,
                    detail=_str(obj, "detail", "rejection"),
                    result={},
                    refusal=refusal_for(code),
                )
            if status != 200 or obj.get("status") != "accepted":
                raise _BadAnswer(f"expected HTTP 200 with status 'accepted', got HTTP {status} with status {str(obj.get('status'))[:40]!r}")
            answered_nonce = _int(obj, "nonce", "answer", minimum=1)
            if answered_nonce != nonce:
                raise _BadAnswer(f"answer.nonce: {answered_nonce} is not the nonce sent ({nonce})")
            result = _obj(obj.get("result"), "answer.result")
            return SubmitResult(
                status="accepted", duplicate=_bool(obj, "duplicate", "answer"), code=None, detail="", result=dict(result)
            )
        except _BadAnswer as exc:
            raise LedgerUnavailable(f"ledger POST /v1/messages: malformed answer: {exc}") from None
