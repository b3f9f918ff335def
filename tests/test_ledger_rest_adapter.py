"""The board's REST adapter (firmware.ledger.rest) against the real bench ledger, and against a
tiny stdlib HTTP server on 127.0.0.1 that answers garbage, to prove hostile answers never escape
as KeyError/TypeError and transient failures are retried with exponential back-off."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import coincurve
import pytest

from firmware.keystore import DeviceKey
from firmware.ledger.base import Ledger, LedgerRejected, LedgerUnavailable, SubmitResult, TradeRecord
from firmware.ledger.rest import RestLedger
from firmware.market import MarketRules
from firmware.messages import SignedMessage, new_fields, sign_message
from host_tools.bench_ledger.app import LedgerSettings
from host_tools.bench_ledger.server import running_ledger

LEDGER_ID = "adapter-test"
T0 = 1_800_000_000
RULES = MarketRules(slot_seconds=1800, markets_ahead=48, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
MARKET = T0 + 3 * 1800
TOKEN = "adapter-operator-token"


def make_key(n: int) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"adapter device {n}".encode()).digest()))


def order(key: DeviceKey, nonce: int, side: str, wh: int, price: int, now_s: int = T0 + 100) -> SignedMessage:
    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=nonce, issued_at=now_s, ttl_s=60,
                        market_id=MARKET, side=side, energy_wh=wh, price_per_kwh_minor=price)
    return sign_message(fields, key)


class Sleeps:
    """Records back-off delays instead of sleeping, so retry tests are instant."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# ------------------------------------------------------------------- against the real ledger

@pytest.fixture
def real_ledger(tmp_path):
    clock_ms = [(T0 + 100) * 1000]
    settings = LedgerSettings(db_path=tmp_path / "l.sqlite3", ledger_id=LEDGER_ID, rules=RULES, operator_token=TOKEN,
                              initial_credit_milli_minor=10**10, report_deadline_seconds=600, clock=lambda: clock_ms[0])
    with running_ledger(settings) as running:
        yield running, clock_ms


def register(running, key: DeviceKey) -> None:
    import requests

    r = requests.post(running.url + "/v1/devices", json={"public_key": key.public_key.hex(), "name": "h"},
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert r.status_code == 200


def test_adapter_against_the_real_ledger(real_ledger):
    running, clock_ms = real_ledger
    ledger = RestLedger(running.url, timeout_ms=2000, retries=2, backoff_ms=10)
    assert isinstance(ledger, Ledger)
    assert ledger.server_time_ms() == (T0 + 100) * 1000
    info = ledger.info()
    assert info["ledger_id"] == LEDGER_ID and info["slot_seconds"] == 1800 and info["lot_wh"] == 100
    seller, buyer = make_key(1), make_key(2)
    register(running, seller), register(running, buyer)
    board_clock = lambda: clock_ms[0]  # noqa: E731 - the boards' clocks agree with the ledger's
    as_seller = RestLedger(running.url, timeout_ms=2000, retries=2, backoff_ms=10, signer=seller, ledger_id=LEDGER_ID,
                           clock_ms=board_clock)
    as_buyer = RestLedger(running.url, timeout_ms=2000, retries=2, backoff_ms=10, signer=buyer, ledger_id=LEDGER_ID,
                          clock_ms=board_clock)
    with pytest.raises(LedgerRejected) as err:  # a device's account is private: unsigned reads are refused
        ledger.device_account(seller.device_id)
    assert err.value.code == "unauthorized" and err.value.http_status == 401
    with pytest.raises(LedgerRejected) as err:  # and one device cannot read another's
        as_buyer.device_account(seller.device_id)
    assert err.value.code == "unauthorized"
    account = as_seller.device_account(seller.device_id)
    assert (account["balance_milli_minor"], account["locked_milli_minor"], account["max_nonce"]) == (10**10, 0, 0)

    sell = order(seller, 1, "sell", 500, 2000)
    first = ledger.submit(sell)
    assert first == SubmitResult("accepted", False, None, "", first.result) and first.accepted
    assert first.result["remaining_wh"] == 500
    assert ledger.submit(sell).duplicate is True
    rejected = ledger.submit(order(seller, 2, "sell", 150, 2000))
    assert (rejected.status, rejected.code, rejected.duplicate) == ("rejected", "not_whole_lots", False)
    assert "energy_wh" in rejected.detail
    conflict = ledger.submit(order(seller, 1, "sell", 600, 2000))
    assert (conflict.status, conflict.code) == ("rejected", "nonce_conflict")

    trades, cursor = as_buyer.trades_since(buyer.device_id, 0)
    assert (trades, cursor) == ([], 0)
    bought = ledger.submit(order(buyer, 1, "buy", 300, 2500))
    assert bought.result["filled_wh"] == 300
    with pytest.raises(LedgerRejected):
        as_seller.trades_since(buyer.device_id, 0)
    trades, cursor = as_buyer.trades_since(buyer.device_id, 0)
    assert trades == [TradeRecord(trade_id=1, market_id=MARKET, side="buy", energy_wh=300, price_per_kwh_minor=2000,
                                  order_nonce=1, counterparty=seller.device_id, state="contracted")]
    assert cursor == 1
    assert as_buyer.trades_since(buyer.device_id, cursor) == ([], 1)
    seller_trades, _ = as_seller.trades_since(seller.device_id, 0)
    assert seller_trades[0].side == "sell" and seller_trades[0].counterparty == buyer.device_id

    book = ledger.market_book(MARKET)
    assert book["gate_open"] is True and book["asks"] == [{"price_per_kwh_minor": 2000, "remaining_wh": 200, "orders": 1}]
    assert as_seller.device_account(seller.device_id)["max_nonce"] == 2

    with pytest.raises(LedgerRejected) as err:
        as_seller.device_account("0" * 40)
    assert err.value.code == "unauthorized" and err.value.http_status == 401
    with pytest.raises(LedgerRejected):
        ledger.market_book(MARKET + 1)


def test_unknown_device_and_bad_signature_are_permanent(real_ledger):
    running, _ = real_ledger
    ledger = RestLedger(running.url, timeout_ms=2000, retries=0, backoff_ms=10)
    key = make_key(3)
    assert ledger.submit(order(key, 1, "sell", 100, 2000)).code == "unknown_device"
    register(running, key)
    genuine = order(key, 1, "sell", 100, 2000)
    altered = SignedMessage(genuine.payload.replace(b'"energy_wh":100', b'"energy_wh":900'), genuine.signature)
    result = ledger.submit(altered)
    assert (result.status, result.code) == ("rejected", "bad_signature")
    assert ledger.submit(genuine).accepted


def test_connection_refused_is_retried_with_exponential_backoff():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    ledger = RestLedger(f"http://127.0.0.1:{port}", timeout_ms=500, retries=3, backoff_ms=100, sleep=sleeps)
    with pytest.raises(LedgerUnavailable, match="after 4 attempt"):
        ledger.submit(order(make_key(1), 1, "sell", 100, 2000))
    assert sleeps.delays == [0.1, 0.2, 0.4]
    with pytest.raises(LedgerUnavailable):
        ledger.server_time_ms()


def test_constructor_rejects_bad_url():
    with pytest.raises(ValueError, match="http"):
        RestLedger("ftp://x", timeout_ms=100, retries=0, backoff_ms=0)


# -------------------------------------------------------------------------- hostile answers

class ScriptedServer(ThreadingHTTPServer):
    """Answers each request with the next scripted (status, headers, body, delay_s); repeats the last."""

    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict, bytes, float]]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script = list(script)
        self.requests: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()

    def next_answer(self) -> tuple[int, dict, bytes, float]:
        with self.lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class _ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, body))
        status, headers, payload, delay = self.server.next_answer()
        if delay:
            time.sleep(delay)
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}
        for name, value in headers.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = _answer


@contextmanager
def scripted(*answers) -> Iterator[tuple[RestLedger, ScriptedServer, Sleeps]]:
    script = [(a[0], a[1] if len(a) > 1 else {}, a[2] if len(a) > 2 else b"", a[3] if len(a) > 3 else 0.0) for a in answers]
    server = ScriptedServer(script)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    sleeps = Sleeps()
    try:
        yield RestLedger(f"http://127.0.0.1:{server.server_address[1]}", timeout_ms=300, retries=2, backoff_ms=50,
                         sleep=sleeps, max_response_bytes=64 * 1024), server, sleeps
    finally:
        server.shutdown()
        server.server_close()


def j(obj) -> bytes:
    return json.dumps(obj).encode()


GOOD_TRADE = {"trade_id": 1, "market_id": MARKET, "side": "buy", "energy_wh": 100, "price_per_kwh_minor": 2000,
              "order_nonce": 1, "counterparty": "abc", "state": "contracted"}

HOSTILE_TRADES_ANSWERS = [
    (200, {}, b"<html>oops</html>"),
    (200, {}, b""),
    (200, {}, b"\xff\xfe"),
    (200, {}, j([1, 2])),
    (200, {}, j({"cursor": 1})),
    (200, {}, j({"trades": "x", "cursor": 1})),
    (200, {}, j({"trades": [], "cursor": "1"})),
    (200, {}, j({"trades": [], "cursor": 1.0})),
    (200, {}, b'{"trades": [], "cursor": NaN}'),
    (200, {}, j({"trades": [], "cursor": True})),
    (200, {}, j({"trades": [], "cursor": 2**70})),
    (200, {}, j({"trades": [], "cursor": -1})),
    (200, {}, j({"trades": [1], "cursor": 1})),
    (200, {}, j({"trades": [{**GOOD_TRADE, "energy_wh": "100"}], "cursor": 1})),
    (200, {}, j({"trades": [{**GOOD_TRADE, "side": "hold"}], "cursor": 1})),
    (200, {}, j({"trades": [{**GOOD_TRADE, "state": None}], "cursor": 1})),
    (200, {}, j({"trades": [{k: v for k, v in GOOD_TRADE.items() if k != "counterparty"}], "cursor": 1})),
    (200, {}, j({"trades": [{**GOOD_TRADE, "trade_id": 9}], "cursor": 1})),  # outside (cursor, new cursor]
    (200, {}, b"[" * 100000 + b"]" * 100000),  # nesting bomb (and over the size cap)
    (200, {}, b"[" * 3000 + b"]" * 3000),  # nesting deeper than the recursion limit, under the cap
    (200, {}, b"x" * (200 * 1024)),  # larger than max_response_bytes
    (200, {"Content-Length": str(10**9)}, b"{}"),  # lies about its size
    (404, {"Content-Type": "text/html"}, b"<html>not found</html>"),  # a proxy's page, not a ledger rejection
    (302, {"Location": "http://example.invalid/"}, b""),
    (503, {}, j({"status": "rejected", "code": "busy", "detail": "x"})),
    (429, {}, b""),
]


@pytest.mark.parametrize("answer", HOSTILE_TRADES_ANSWERS, ids=range(len(HOSTILE_TRADES_ANSWERS)))
def test_hostile_answers_become_ledger_unavailable(answer):
    with scripted(answer) as (ledger, server, sleeps):
        with pytest.raises(LedgerUnavailable) as err:
            ledger.trades_since("dev", 0)
        assert str(err.value)  # a sentence, not a bare exception


def test_hostile_answers_to_every_query():
    cases = [
        ("server_time_ms", (), j({"time_ms": "now"})),
        ("server_time_ms", (), j({"time_ms": 1.5e12})),
        ("info", (), j({"ledger_id": 5, "slot_seconds": 1800})),
        ("info", (), j({"ledger_id": "x", "slot_seconds": 0, "markets_ahead": 1, "lot_wh": 1, "gate_closure_seconds": 0,
                        "price_min_per_kwh_minor": 1, "price_max_per_kwh_minor": 1})),
        ("device_account", ("dev",), j({"device_id": "other", "name": "n", "balance_milli_minor": 1, "locked_milli_minor": 0, "max_nonce": 0})),
        ("device_account", ("dev",), j({"device_id": "dev", "name": "n", "balance_milli_minor": None, "locked_milli_minor": 0, "max_nonce": 0})),
        ("market_book", (MARKET,), j({"market_id": MARKET + 1800, "gate_open": True, "asks": [], "bids": []})),
        ("market_book", (MARKET,), j({"market_id": MARKET, "gate_open": 1, "asks": [], "bids": []})),
        ("market_book", (MARKET,), j({"market_id": MARKET, "gate_open": True, "asks": [{"price_per_kwh_minor": 1}], "bids": []})),
    ]
    for method, args, body in cases:
        with scripted((200, {}, body)) as (ledger, _, _):
            with pytest.raises(LedgerUnavailable, match="malformed answer|not strict JSON"):
                getattr(ledger, method)(*args)


def test_hostile_answers_to_submit():
    message = order(make_key(1), 7, "sell", 100, 2000)
    cases = [
        (200, j({"status": "accepted", "duplicate": False, "nonce": 8, "type": "order", "result": {}})),  # someone else's nonce
        (200, j({"status": "accepted", "duplicate": "no", "nonce": 7, "type": "order", "result": {}})),
        (200, j({"status": "accepted", "duplicate": False, "nonce": 7, "type": "order", "result": []})),
        (200, j({"status": "rejected", "code": "x", "detail": "y"})),  # a rejection must be a 4xx
        (201, j({"weird": True})),
        (422, j({"status": "rejected", "code": 5, "detail": "y"})),
        (400, j({"error": "bad"})),
    ]
    for status, body in cases:
        with scripted((status, {}, body)) as (ledger, server, _):
            with pytest.raises(LedgerUnavailable):
                ledger.submit(message)
            sent = json.loads(server.requests[0][2])
            assert sent == message.to_wire()


def test_slow_answer_times_out_and_is_retried_then_succeeds():
    ok = j({"time_ms": 123})
    with scripted((200, {}, ok, 1.0), (200, {}, ok)) as (ledger, server, sleeps):
        started = time.monotonic()
        assert ledger.server_time_ms() == 123
        assert time.monotonic() - started < 1.0
        assert len(server.requests) == 2 and sleeps.delays == [0.05]


def test_transient_5xx_then_accepted_submit():
    message = order(make_key(1), 7, "sell", 100, 2000)
    accepted = j({"status": "accepted", "duplicate": True, "nonce": 7, "type": "order", "result": {"filled_wh": 0}})
    with scripted((502, {}, b"bad gateway"), (500, {}, b""), (200, {}, accepted)) as (ledger, server, sleeps):
        result = ledger.submit(message)
    assert result == SubmitResult("accepted", True, None, "", {"filled_wh": 0})
    assert sleeps.delays == [0.05, 0.1]
    assert [r[2] for r in server.requests] == [json.dumps(message.to_wire()).encode()] * 3  # the same bytes each time


def test_ledger_rejection_is_permanent_and_not_retried():
    message = order(make_key(1), 7, "sell", 100, 2000)
    body = j({"status": "rejected", "code": "gate_closed", "detail": "market_id: closed", "duplicate": True, "nonce": 7})
    with scripted((422, {}, body)) as (ledger, server, sleeps):
        result = ledger.submit(message)
    assert (result.status, result.code, result.detail, result.duplicate) == ("rejected", "gate_closed", "market_id: closed", True)
    assert len(server.requests) == 1 and sleeps.delays == []
    with scripted((404, {}, j({"status": "rejected", "code": "not_found", "detail": "no device"}))) as (ledger, server, _):
        with pytest.raises(LedgerRejected, match="not_found"):
            ledger.device_account("dev")
        assert len(server.requests) == 1


def test_cursor_that_goes_backwards_is_refused():
    with scripted((200, {}, j({"trades": [], "cursor": 3}))) as (ledger, _, _):
        with pytest.raises(LedgerUnavailable, match="cursor"):
            ledger.trades_since("dev", 5)
        assert ledger.trades_since("dev", 3) == ([], 3)


def test_device_id_is_quoted_into_the_path():
    with scripted((404, {}, j({"status": "rejected", "code": "not_found", "detail": "x"}))) as (ledger, server, _):
        with pytest.raises(LedgerRejected):
            ledger.device_account("../v1/stats?x=1")
        assert server.requests[0][1] == "/v1/devices/..%2Fv1%2Fstats%3Fx%3D1"


def test_from_board_config():
    from firmware.config import load_config
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "board_configs" / "sim.toml")
    ledger = RestLedger.from_config(config.ledger)
    assert ledger.url == config.ledger.url and ledger.retries == config.ledger.retries
    assert ledger.timeout_s == config.ledger.timeout_ms / 1000 and ledger.verify_tls is True


# ------------------------------------------------------------------ whole-call deadline (issue 7 r)

class TricklingServer:
    """A raw loopback TCP server that answers one byte every ``interval_s`` (headers or body).

    Per-read socket timeouts never fire against it - each byte arrives well inside them - so only
    a deadline on the whole call bounds how long a caller is held."""

    def __init__(self, answer: bytes, *, interval_s: float, trickle_headers: bool) -> None:
        self.answer, self.interval_s, self.trickle_headers = answer, interval_s, trickle_headers
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(65536)
                head, _, body = self.answer.partition(b"\r\n\r\n")
                if not self.trickle_headers:
                    conn.sendall(head + b"\r\n\r\n")
                    data = body
                else:
                    data = self.answer
                for i in range(len(data)):
                    if self.stop.wait(self.interval_s):
                        return
                    conn.sendall(data[i:i + 1])
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def _http_answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body)) + body


@pytest.mark.parametrize("trickle_headers", [False, True], ids=["body", "headers"])
def test_trickled_answer_is_bounded_by_a_deadline_on_the_whole_call(trickle_headers):
    """Issue 7 r: one byte every half second must not hold a 2-s call for 30 s."""
    body = json.dumps({"time_ms": 123, "pad": "x" * 40}).encode()
    server = TricklingServer(_http_answer(body), interval_s=0.5, trickle_headers=trickle_headers)
    try:
        ledger = RestLedger(f"http://127.0.0.1:{server.port}", timeout_ms=2000, retries=0, backoff_ms=10)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="2.0 s"):
            ledger.server_time_ms()
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"the call took {elapsed:.1f} s against a 2-s timeout"
        # with retries, every attempt has its own deadline: total ~ (retries + 1) x timeout + back-off
        ledger = RestLedger(f"http://127.0.0.1:{server.port}", timeout_ms=1000, retries=1, backoff_ms=10)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable):
            ledger.server_time_ms()
        assert time.monotonic() - started < 3.0
    finally:
        server.close()


def test_server_time_sample_is_one_attempt_with_its_own_round_trip(real_ledger):
    """The clock guard measures skew on one round trip: no retry, no back-off inside the sample."""
    running, clock_ms = real_ledger
    ledger = RestLedger(running.url, timeout_ms=2000, retries=3, backoff_ms=10)
    sample = ledger.server_time_sample()
    assert sample.server_ms == clock_ms[0]
    assert sample.sent_ms <= sample.received_ms and sample.round_trip_ms == sample.received_ms - sample.sent_ms
    assert sample.skew_ms == sample.server_ms - (sample.sent_ms + sample.received_ms) // 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    dead = RestLedger(f"http://127.0.0.1:{port}", timeout_ms=500, retries=3, backoff_ms=100, sleep=sleeps)
    with pytest.raises(LedgerUnavailable, match="1 attempt"):
        dead.server_time_sample()
    assert sleeps.delays == []
