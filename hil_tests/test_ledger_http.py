"""The bench ledger over real HTTP: a uvicorn server on 127.0.0.1 (free port), real signed messages.

The only thing injected is the ledger's clock, so gates close and report deadlines pass without
sleeping; everything else (HTTP, JSON, SQLite, both signature libraries) is the real thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import coincurve
import ecdsa
import pytest
import requests

from firmware.keystore import DeviceKey, generate_key_file
from firmware.market import MarketRules
from firmware.messages import SignedMessage, new_fields, sign_message
from host_tools.bench_ledger import app as api
from host_tools.bench_ledger.app import LedgerSettings
from host_tools.bench_ledger.server import running_ledger

REPO = Path(__file__).resolve().parents[1]
LEDGER_ID = "test-ledger"
T0 = 1_800_000_000  # a slot boundary (multiple of 1800)
RULES = MarketRules(slot_seconds=1800, markets_ahead=48, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
MARKET = T0 + 3 * 1800  # gate open at T0 + 100 s
DEADLINE_S = 600
CREDIT = 10**12
TOKEN = "ledger-test-operator-token"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}


class Clock:
    """The ledger's clock in ms, moved by the test."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def set_s(self, seconds: int) -> None:
        self.ms = seconds * 1000


def make_key(n: int) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"test device {n}".encode()).digest()))


class Bench:
    """A ledger under test plus helpers that sign and send like a board would."""

    def __init__(self, url: str, clock: Clock, app) -> None:
        self.url, self.clock, self.app = url, clock, app
        self.http = requests.Session()
        self.http.headers.update(OPERATOR)  # the bench's helpers read as the operator; access tests use bare requests
        self._nonces: dict[str, int] = {}

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=10, **kw)

    def register(self, key: DeviceKey, credit: int = CREDIT, name: str = "house", capacity_wh: int | None = None) -> dict:
        body = {"public_key": key.public_key.hex(), "name": name, "credit_milli_minor": credit}
        if capacity_wh is not None:
            body["sell_capacity_wh"] = capacity_wh
        r = self.http.post(self.url + "/v1/devices", json=body, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def message(self, key: DeviceKey, kind: str, *, nonce: int | None = None, ttl_s: int = 60,
                ledger_id: str = LEDGER_ID, issued_at: int | None = None, **body) -> SignedMessage:
        if nonce is None:
            nonce = self._nonces.get(key.device_id, 0) + 1
        self._nonces[key.device_id] = max(nonce, self._nonces.get(key.device_id, 0))
        fields = new_fields(kind, ledger_id=ledger_id, device_id=key.device_id, nonce=nonce,
                            issued_at=self.clock.ms // 1000 if issued_at is None else issued_at, ttl_s=ttl_s, **body)
        return sign_message(fields, key)

    def post(self, message: SignedMessage | dict) -> requests.Response:
        wire = message.to_wire() if isinstance(message, SignedMessage) else message
        return self.http.post(self.url + "/v1/messages", json=wire, timeout=10)

    def send(self, key: DeviceKey, kind: str, **body) -> requests.Response:
        return self.post(self.message(key, kind, **body))

    def order(self, key: DeviceKey, side: str, wh: int, price: int, market: int = MARKET, **kw) -> requests.Response:
        return self.send(key, "order", market_id=market, side=side, energy_wh=wh, price_per_kwh_minor=price, **kw)

    def report(self, key: DeviceKey, trade_id: int, role: str, wh: int, market: int = MARKET, status: str = "delivered") -> requests.Response:
        return self.send(key, "delivery_report", trade_id=trade_id, market_id=market, role=role, energy_wh=wh, status=status)

    def account(self, key: DeviceKey) -> dict:
        r = self.get(f"/v1/devices/{key.device_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def book(self, market: int = MARKET) -> dict:
        r = self.get(f"/v1/markets/{market}/book")
        assert r.status_code == 200, r.text
        api.BookOut.model_validate(r.json())
        return r.json()

    def stats(self) -> dict:
        r = self.get("/v1/stats")
        assert r.status_code == 200
        api.StatsOut.model_validate(r.json())
        return r.json()


def settings_for(db: Path, clock: Clock, **kw) -> LedgerSettings:
    kw.setdefault("operator_token", TOKEN)
    return LedgerSettings(db_path=db, ledger_id=LEDGER_ID, rules=RULES, report_deadline_seconds=DEADLINE_S,
                          initial_credit_milli_minor=CREDIT, clock=clock, **kw)


@pytest.fixture
def bench(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    with running_ledger(settings_for(tmp_path / "ledger.sqlite3", clock)) as running:
        assert running.url.startswith("http://127.0.0.1:")
        yield Bench(running.url, clock, running.app)


def accepted(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    api.Accepted.model_validate(body)
    assert body["status"] == "accepted"
    return body


def rejected(r: requests.Response, code: str, status: int | None = None) -> dict:
    body = r.json()
    assert body.get("code") == code, body
    api.Rejected.model_validate(body)
    assert body["status"] == "rejected" and body["detail"]
    if status is not None:
        assert r.status_code == status
    return body


def book_levels(entries: list[dict]) -> list[tuple[int, int]]:
    return [(e["remaining_wh"], e["price_per_kwh_minor"]) for e in entries]


def money(bench: Bench, key: DeviceKey) -> tuple[int, int]:
    account = bench.account(key)
    return account["balance_milli_minor"], account["locked_milli_minor"]


# ------------------------------------------------------------------------------ the auction

def test_table1_and_the_two_worked_orders(bench):
    """Primary source, Table 1 (Over/UNDER as the band's far prices), then its two worked orders."""
    asks = [(16, 4000), (3, 2100), (30, 2080), (15, 2070), (12, 2060), (10, 2050), (20, 2040), (10, 2020), (20, 2010)]
    bids = [(40, 1990), (5, 1980), (10, 1970), (50, 1960), (20, 1950), (9, 1940), (4, 1930), (12, 1910), (18, 1000)]
    seller, buyer, taker_sell, taker_buy = make_key(1), make_key(2), make_key(3), make_key(4)
    for key in (seller, buyer, taker_sell, taker_buy):
        bench.register(key, capacity_wh=200_000)  # the whole table's sellers, qualified as one
    for kwh, price in asks:
        assert accepted(bench.order(seller, "sell", kwh * 1000, price))["result"]["filled_wh"] == 0
    for kwh, price in bids:
        assert accepted(bench.order(buyer, "buy", kwh * 1000, price))["result"]["filled_wh"] == 0
    book = bench.book()
    assert book["gate_open"] is True
    assert book_levels(book["asks"]) == sorted(((k * 1000, p) for k, p in asks), key=lambda x: x[1])
    assert book_levels(book["bids"]) == [(k * 1000, p) for k, p in bids]

    # A sell of 5 kWh at 19.5 trades 5 kWh at 19.9; the 19.9 bid drops to 35 kWh.
    result = accepted(bench.order(taker_sell, "sell", 5000, 1950))["result"]
    assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in result["trades"]] == [(5000, 1990)]
    assert result["filled_wh"] == 5000 and result["remaining_wh"] == 0 and result["state"] == "filled"
    assert book_levels(bench.book()["bids"])[0] == (35000, 1990)

    # A buy of 26 kWh at 20.3 trades 20 kWh at 20.1 and 6 kWh at 20.2; 4 kWh stay at 20.2.
    result = accepted(bench.order(taker_buy, "buy", 26000, 2030))["result"]
    assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in result["trades"]] == [(20000, 2010), (6000, 2020)]
    assert book_levels(bench.book()["asks"])[:2] == [(4000, 2020), (20000, 2040)]
    # The buyer locked 26 kWh x 20.3 and got the price improvement back at once.
    locked = 26000 * 2030
    paid_later = 20000 * 2010 + 6000 * 2020
    assert result["locked_milli_minor"] == locked and result["released_milli_minor"] == locked - paid_later
    assert money(bench, taker_buy) == (CREDIT - paid_later, paid_later)

    trades = bench.get(f"/v1/markets/{MARKET}/trades").json()
    api.MarketTradesOut.model_validate(trades)
    assert [(t["seller"]["device_id"], t["buyer"]["device_id"], t["energy_wh"], t["price_per_kwh_minor"], t["state"])
            for t in trades["trades"]] == [
        (taker_sell.device_id, buyer.device_id, 5000, 1990, "contracted"),
        (seller.device_id, taker_buy.device_id, 20000, 2010, "contracted"),
        (seller.device_id, taker_buy.device_id, 6000, 2020, "contracted"),
    ]


def test_self_trade_skips_own_resting_order_over_http(bench):
    me, other = make_key(1), make_key(2)
    bench.register(me), bench.register(other)
    accepted(bench.order(me, "sell", 200, 1900))
    accepted(bench.order(other, "sell", 200, 2000))
    result = accepted(bench.order(me, "buy", 300, 2100))["result"]
    assert [(t["counterparty"], t["energy_wh"], t["price_per_kwh_minor"]) for t in result["trades"]] == [(other.device_id, 200, 2000)]
    book = bench.book()  # aggregates only: the own ask and the crossed own bid both rest
    assert [(e["price_per_kwh_minor"], e["remaining_wh"], e["orders"]) for e in book["asks"]] == [(1900, 200, 1)]
    assert [(e["price_per_kwh_minor"], e["remaining_wh"], e["orders"]) for e in book["bids"]] == [(2100, 100, 1)]
    mine = bench.get(f"/v1/devices/{me.device_id}/orders").json()["orders"]
    assert [(o["side"], o["remaining_wh"], o["state"]) for o in mine] == [("sell", 200, "open"), ("buy", 100, "open")]


# ------------------------------------------------------------------------ integrity of messages

def test_payload_altered_by_a_relay_is_rejected_and_nothing_applied(bench):
    key = make_key(1)
    bench.register(key)
    message = bench.message(key, "order", market_id=MARKET, side="buy", energy_wh=1000, price_per_kwh_minor=2000)
    tampered = message.payload.replace(b'"energy_wh":1000', b'"energy_wh":9000')
    assert tampered != message.payload
    r = bench.post({"payload": tampered.decode(), "signature": message.signature.hex()})
    rejected(r, "bad_signature", 401)
    assert bench.book()["bids"] == []
    assert money(bench, key) == (CREDIT, 0)
    assert bench.account(key)["max_nonce"] == 0  # not stored: the nonce is still free for the genuine message
    accepted(bench.post(message))


def test_replayed_nonce_is_a_duplicate_and_applied_once(bench):
    key = make_key(1)
    bench.register(key)
    message = bench.message(key, "order", market_id=MARKET, side="buy", energy_wh=1000, price_per_kwh_minor=2000)
    first = accepted(bench.post(message))
    book, balance = bench.book(), money(bench, key)
    again = accepted(bench.post(message))
    assert again["duplicate"] is True and first["duplicate"] is False
    assert again["result"] == first["result"]
    assert bench.book() == book and money(bench, key) == balance == (CREDIT - 2_000_000, 2_000_000)
    # the same nonce with other content is a conflict, and changes nothing either
    other = bench.message(key, "order", nonce=1, market_id=MARKET, side="buy", energy_wh=500, price_per_kwh_minor=2000)
    rejected(bench.post(other), "nonce_conflict", 409)
    assert bench.book() == book and money(bench, key) == balance
    # the ledger's record of the device's messages: each once, with the exact bytes signed
    records = bench.get(f"/v1/devices/{key.device_id}/messages").json()
    api.MessagesOut.model_validate(records)
    assert [(m["nonce"], m["kind"], m["status"], m["payload"], m["signature"]) for m in records["messages"]] == [
        (1, "order", "accepted", message.payload.decode(), message.signature.hex())]
    assert records["messages"][0]["payload_sha256"] == hashlib.sha256(message.payload).hexdigest()
    # a resend after the message expired still gets the stored answer (its first ack may have been lost)
    bench.clock.ms += 3600 * 1000
    assert accepted(bench.post(message))["duplicate"] is True
    assert bench.stats()["orders"] == 1


def test_signatures_cross_check_with_the_independent_ecdsa_package(bench):
    key = make_key(1)
    bench.register(key)
    message = bench.message(key, "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    # The board's coincurve signature verifies with the pure-Python ecdsa package ...
    verifier = ecdsa.VerifyingKey.from_string(key.public_key, curve=ecdsa.SECP256k1)
    assert verifier.verify_digest(message.signature, hashlib.sha256(message.payload).digest(), sigdecode=ecdsa.util.sigdecode_string)
    accepted(bench.post(message))
    # ... and a message signed by ecdsa (canonical low-S) is accepted by the ledger, which verifies with ecdsa.
    secret = hashlib.sha256(b"test device 1").digest()
    signer = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1)
    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=2, issued_at=bench.clock.ms // 1000,
                        ttl_s=60, market_id=MARKET, side="sell", energy_wh=200, price_per_kwh_minor=2000)
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    signature = signer.sign_digest_deterministic(hashlib.sha256(payload).digest(), hashfunc=hashlib.sha256,
                                                 sigencode=ecdsa.util.sigencode_string_canonize)
    assert signature == sign_message(fields, key).signature  # RFC 6979 + low-S: byte-identical
    accepted(bench.post({"payload": payload.decode(), "signature": signature.hex()}))
    # a high-S twin of a valid signature is refused (malleability)
    r_int, s_int = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    high_s = signature[:32] + (ecdsa.SECP256k1.order - s_int).to_bytes(32, "big")
    assert r_int and high_s != signature
    fields3 = {**fields, "nonce": 3}
    payload3 = json.dumps(fields3, sort_keys=True, separators=(",", ":")).encode()
    sig3 = sign_message(fields3, key).signature
    high_s3 = sig3[:32] + (ecdsa.SECP256k1.order - int.from_bytes(sig3[32:], "big")).to_bytes(32, "big")
    rejected(bench.post({"payload": payload3.decode(), "signature": high_s3.hex()}), "bad_signature", 401)


def test_message_signed_by_another_key_or_unknown_device(bench):
    key, stranger = make_key(1), make_key(2)
    bench.register(key)
    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=1, issued_at=bench.clock.ms // 1000,
                        ttl_s=60, market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    rejected(bench.post(sign_message(fields, stranger)), "bad_signature", 401)
    rejected(bench.order(stranger, "sell", 100, 2000), "unknown_device", 401)


def test_validity_window_and_ledger_binding(bench):
    key = make_key(1)
    bench.register(key)
    now = bench.clock.ms // 1000
    rejected(bench.order(key, "sell", 100, 2000, ledger_id="another-ledger"), "wrong_ledger", 422)
    rejected(bench.order(key, "sell", 100, 2000, issued_at=now - 120, ttl_s=60), "expired", 422)
    rejected(bench.order(key, "sell", 100, 2000, issued_at=now + 301), "not_yet_valid", 422)
    assert bench.account(key)["max_nonce"] == 0  # none of these consumed a nonce
    accepted(bench.order(key, "sell", 100, 2000, nonce=1, issued_at=now + 299))


# --------------------------------------------------------------------------- market rules

def test_market_rule_rejections_name_field_and_are_stored(bench):
    key, poor, other = make_key(1), make_key(2), make_key(3)
    bench.register(key), bench.register(other)
    bench.register(poor, credit=1_000_000)
    now = bench.clock.ms // 1000
    nearest = RULES.next_slot_start(now)  # starts in 1700 s: open
    assert RULES.gate_open(nearest, now)
    bench.clock.set_s(nearest - 900)  # exactly 900 s before delivery: closed
    body = rejected(bench.order(key, "sell", 100, 2000, market=nearest), "gate_closed", 422)
    assert "market_id" in body["detail"]
    bench.clock.set_s(now)
    rejected(bench.order(key, "sell", 100, 999), "price_out_of_band", 422)
    rejected(bench.order(key, "sell", 100, 4001), "price_out_of_band", 422)
    body = rejected(bench.order(key, "sell", 150, 2000), "not_whole_lots", 422)
    assert "energy_wh" in body["detail"] and "100" in body["detail"]
    rejected(bench.order(key, "sell", 100, 2000, market=MARKET + 1), "unknown_market", 422)
    rejected(bench.order(key, "sell", 100, 2000, market=RULES.next_slot_start(now) + 48 * 1800), "unknown_market", 422)
    accepted(bench.order(key, "sell", 100, 2000, market=RULES.next_slot_start(now) + 47 * 1800))
    body = rejected(bench.order(poor, "buy", 1000, 2000), "insufficient_funds", 422)
    assert "1000000" in body["detail"]
    assert money(bench, poor) == (1_000_000, 0)
    accepted(bench.order(poor, "buy", 500, 2000))  # exactly the balance
    assert money(bench, poor) == (0, 1_000_000)

    # cancel rules
    sell = accepted(bench.order(other, "sell", 300, 2500))
    rejected(bench.send(key, "cancel", market_id=MARKET, order_nonce=sell["nonce"]), "not_owner", 422)
    rejected(bench.send(key, "cancel", market_id=MARKET, order_nonce=999), "unknown_order", 422)
    assert [o["remaining_wh"] for o in bench.get(f"/v1/devices/{other.device_id}/orders").json()["orders"]] == [300]

    # a stored rejection is answered again, as a duplicate, for a resend of the same bytes
    message = bench.message(key, "order", market_id=MARKET, side="sell", energy_wh=150, price_per_kwh_minor=2000)
    first = rejected(bench.post(message), "not_whole_lots")
    again = rejected(bench.post(message), "not_whole_lots", 422)
    assert first["duplicate"] is False and again["duplicate"] is True


def test_cancel_releases_the_remaining_lock(bench):
    buyer, seller = make_key(1), make_key(2)
    bench.register(buyer), bench.register(seller)
    order = accepted(bench.order(buyer, "buy", 1000, 2000))
    accepted(bench.order(seller, "sell", 400, 1900))  # trades 400 at the resting 2000
    assert money(bench, buyer) == (CREDIT - 2_000_000, 2_000_000)
    cancel = bench.message(buyer, "cancel", market_id=MARKET, order_nonce=order["nonce"])
    result = accepted(bench.post(cancel))["result"]
    assert result["cancelled_wh"] == 600 and result["filled_wh"] == 400 and result["released_milli_minor"] == 1_200_000
    assert money(bench, buyer) == (CREDIT - 800_000, 800_000)  # the trade's payment stays locked
    assert bench.book()["bids"] == []
    assert accepted(bench.post(cancel))["duplicate"] is True  # resend of the same cancel: fine
    rejected(bench.send(buyer, "cancel", market_id=MARKET, order_nonce=order["nonce"]), "order_closed", 422)
    orders = bench.get(f"/v1/devices/{buyer.device_id}/orders", params={"market_id": MARKET}).json()
    api.OrdersOut.model_validate(orders)
    assert [(o["state"], o["filled_wh"], o["cancelled_wh"], o["remaining_wh"]) for o in orders["orders"]] == [("cancelled", 400, 600, 0)]
    assert money(bench, buyer) == (CREDIT - 800_000, 800_000)


def test_open_orders_expire_at_gate_closure(bench):
    buyer = make_key(1)
    bench.register(buyer)
    accepted(bench.order(buyer, "buy", 1000, 2000))
    bench.clock.set_s(MARKET - 900)
    book = bench.book()
    assert book["gate_open"] is False and book["bids"] == []
    assert money(bench, buyer) == (CREDIT, 0)
    orders = bench.get(f"/v1/devices/{buyer.device_id}/orders").json()["orders"]
    assert [(o["state"], o["cancelled_wh"]) for o in orders] == [("expired", 1000)]
    rejected(bench.send(buyer, "cancel", market_id=MARKET, order_nonce=1), "order_closed")


# ------------------------------------------------------------------------------ settlement

def make_trade(bench: Bench, wh: int = 1000, ask: int = 2000, bid: int = 2500) -> tuple[DeviceKey, DeviceKey, int]:
    seller, buyer = make_key(10), make_key(11)
    bench.register(seller), bench.register(buyer)
    accepted(bench.order(seller, "sell", wh, ask))
    trades = accepted(bench.order(buyer, "buy", wh, bid))["result"]["trades"]
    assert len(trades) == 1 and trades[0]["price_per_kwh_minor"] == ask
    return seller, buyer, trades[0]["trade_id"]


def test_both_reports_settle_and_move_the_money(bench):
    seller, buyer, trade_id = make_trade(bench)
    assert money(bench, buyer) == (CREDIT - 2_000_000, 2_000_000)
    bench.clock.set_s(MARKET + 1800 + 5)
    first = accepted(bench.report(seller, trade_id, "seller", 1000))["result"]
    assert first["trade_state"] == "reported" and first["settlement"] is None
    listing = bench.get(f"/v1/devices/{buyer.device_id}/trades").json()
    assert listing["trades"][0]["state"] == "reported"
    result = accepted(bench.report(buyer, trade_id, "buyer", 1000))["result"]
    assert result["trade_state"] == "settled"
    settlement = result["settlement"]
    assert (settlement["settled_wh"], settlement["paid_milli_minor"], settlement["shortfall_wh"], settlement["shortfall_party"]) == (
        1000, 2_000_000, 0, None)
    assert money(bench, buyer) == (CREDIT - 2_000_000, 0)
    assert money(bench, seller) == (CREDIT + 2_000_000, 0)
    trade = bench.get(f"/v1/trades/{trade_id}").json()
    api.TradeDetail.model_validate(trade)
    assert [(r["role"], r["device_id"], r["energy_wh"]) for r in trade["reports"]] == [
        ("seller", seller.device_id, 1000), ("buyer", buyer.device_id, 1000)]
    stats = bench.stats()
    assert (stats["reported_trades"], stats["settled_trades"], stats["delivered_wh"], stats["shortfall_wh"]) == (1, 1, 1000, 0)
    assert stats["balance_milli_minor"] + stats["locked_milli_minor"] == 2 * CREDIT  # money is conserved

    # The board re-signs a report after its first one expired: same (trade, role), new nonce.
    again = accepted(bench.report(seller, trade_id, "seller", 900))["result"]
    assert again["already_reported"] is True and again["energy_wh"] == 1000
    assert money(bench, seller) == (CREDIT + 2_000_000, 0)


@pytest.mark.parametrize(
    "seller_wh, buyer_wh, settled, party",
    [(600, 1000, 600, "seller"), (1000, 700, 700, "buyer"), (500, 500, 500, "seller"), (1200, 1000, 1000, None)],
)
def test_short_report_charges_the_lower_party(bench, seller_wh, buyer_wh, settled, party):
    seller, buyer, trade_id = make_trade(bench)
    bench.clock.set_s(MARKET + 1800 + 5)
    accepted(bench.report(seller, trade_id, "seller", seller_wh))
    settlement = accepted(bench.report(buyer, trade_id, "buyer", buyer_wh, status="failed" if buyer_wh < 1000 else "delivered"))["result"]["settlement"]
    assert settlement["settled_wh"] == settled and settlement["shortfall_wh"] == 1000 - settled
    assert settlement["shortfall_party"] == party
    assert settlement["shortfall_device_id"] == {"seller": seller.device_id, "buyer": buyer.device_id, None: None}[party]
    assert money(bench, seller) == (CREDIT + settled * 2000, 0)
    assert money(bench, buyer) == (CREDIT - settled * 2000, 0)


def test_report_rules(bench):
    seller, buyer, trade_id = make_trade(bench)
    outsider = make_key(12)
    bench.register(outsider)
    bench.clock.set_s(MARKET + 1800)  # the slot has ended: reports are accepted from now on
    rejected(bench.report(outsider, trade_id, "seller", 1000), "not_a_party", 422)
    rejected(bench.report(buyer, trade_id, "seller", 1000), "wrong_role", 422)
    rejected(bench.report(seller, 999, "seller", 1000), "unknown_trade", 422)
    rejected(bench.report(seller, trade_id, "seller", 1000, market=MARKET - 1800), "unknown_trade", 422)


def test_deadline_sweep_settles_with_silent_party_charged(bench):
    seller, buyer, trade_id = make_trade(bench)
    other_seller, other_buyer = make_key(20), make_key(21)
    bench.register(other_seller), bench.register(other_buyer)
    accepted(bench.order(other_seller, "sell", 500, 3000))
    silent_trade = accepted(bench.order(other_buyer, "buy", 500, 3000))["result"]["trades"][0]["trade_id"]
    slot_end = MARKET + 1800
    bench.clock.set_s(slot_end + 10)
    accepted(bench.report(seller, trade_id, "seller", 1000))  # the buyer stays silent
    bench.clock.set_s(slot_end + DEADLINE_S - 1)
    assert bench.get(f"/v1/trades/{trade_id}").json()["state"] == "reported"
    bench.clock.set_s(slot_end + DEADLINE_S)
    trade = bench.get(f"/v1/trades/{trade_id}").json()
    assert trade["state"] == "settled"
    s = trade["settlement"]
    assert (s["reason"], s["seller_wh"], s["buyer_wh"], s["settled_wh"], s["shortfall_wh"], s["shortfall_party"]) == (
        "deadline", 1000, 0, 0, 1000, "buyer")
    assert money(bench, buyer) == (CREDIT, 0) and money(bench, seller) == (CREDIT, 0)
    # nobody reported: the seller (who owed the delivery) is charged
    s2 = bench.get(f"/v1/trades/{silent_trade}").json()["settlement"]
    assert (s2["settled_wh"], s2["shortfall_wh"], s2["shortfall_party"]) == (0, 500, "seller")
    # a report arriving after the sweep is refused; the earlier report is still "already reported"
    rejected(bench.report(buyer, trade_id, "buyer", 1000), "trade_settled", 422)
    assert accepted(bench.report(seller, trade_id, "seller", 1000))["result"]["already_reported"] is True
    stats = bench.stats()
    assert (stats["settled_trades"], stats["reported_trades"], stats["shortfall_wh"]) == (2, 0, 1500)
    assert stats["locked_milli_minor"] == 0


def test_device_trades_cursor(bench):
    seller, buyer, first = make_trade(bench, wh=200)
    accepted(bench.order(seller, "sell", 300, 2000))
    second = accepted(bench.order(buyer, "buy", 300, 2000))["result"]["trades"][0]["trade_id"]
    listing = bench.get(f"/v1/devices/{seller.device_id}/trades").json()
    api.DeviceTradesOut.model_validate(listing)
    assert [t["trade_id"] for t in listing["trades"]] == [first, second] and listing["cursor"] == second
    t = listing["trades"][0]
    assert (t["side"], t["energy_wh"], t["price_per_kwh_minor"], t["order_nonce"], t["counterparty"], t["state"]) == (
        "sell", 200, 2000, 1, buyer.device_id, "contracted")
    assert bench.get(f"/v1/devices/{buyer.device_id}/trades", params={"after": first}).json()["trades"][0]["side"] == "buy"
    empty = bench.get(f"/v1/devices/{seller.device_id}/trades", params={"after": second}).json()
    assert empty == {"trades": [], "cursor": second}
    rejected(bench.get("/v1/devices/nobody/trades"), "malformed", 400)
    rejected(bench.get(f"/v1/devices/{'0' * 40}/trades"), "not_found", 404)


# ----------------------------------------------------------------------- persistence, hostility

def test_restart_loses_nothing(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    db = tmp_path / "ledger.sqlite3"
    seller, buyer = make_key(1), make_key(2)
    with running_ledger(settings_for(db, clock)) as running:
        bench = Bench(running.url, clock, running.app)
        bench.register(seller), bench.register(buyer)
        accepted(bench.order(seller, "sell", 500, 2000))
        accepted(bench.order(seller, "sell", 500, 2100))
        replay = bench.message(buyer, "order", market_id=MARKET, side="buy", energy_wh=700, price_per_kwh_minor=2100)
        first = accepted(bench.post(replay))
        book, stats = bench.book(), bench.stats()
    with running_ledger(settings_for(db, clock)) as running:
        bench2 = Bench(running.url, clock, running.app)
        assert bench2.book() == book and bench2.stats() == stats
        again = accepted(bench2.post(replay))
        assert again["duplicate"] is True and again["result"] == first["result"]
        assert bench2.account(buyer)["max_nonce"] == 1
        # time priority survives: the remaining 300 Wh at 2100 is next
        result = accepted(bench2.send(buyer, "order", nonce=2, market_id=MARKET, side="buy", energy_wh=300, price_per_kwh_minor=2100))
        assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in result["result"]["trades"]] == [(300, 2100)]


HOSTILE_MESSAGE_BODIES = [
    b"", b"null", b"[]", b"42", b"\"text\"", b"{", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000,
    b'{"payload": 1, "signature": "00"}', b'{"payload": "x", "signature": 12}', b'{"payload": "x"}',
    b'{"payload": "{}", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "{\\"device_id\\": 5}", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "not json", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "[1,2]", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "\xc3\xa9", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "{\\"a\\": 1.5}", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "{\\"a\\": NaN}", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "x", "signature": "zz"}', b'{"payload": 1e400}',
    b'{"payload": "{\\"device_id\\": \\"\\\\ud800\\"}", "signature": "' + b"0" * 128 + b'"}',  # lone surrogate
    b'{"payload": "{\\"device_id\\": \\"' + b"A" * 40 + b'\\"}", "signature": "' + b"0" * 128 + b'"}',
    b'{"payload": "' + b"a" * 20000 + b'", "signature": ""}',
]


def test_hostile_bodies_get_clear_4xx_never_500(bench):
    key = make_key(1)
    bench.register(key)
    for body in HOSTILE_MESSAGE_BODIES:
        r = bench.http.post(bench.url + "/v1/messages", data=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
        answer = r.json()
        assert answer["status"] == "rejected" and answer["code"] and answer["detail"], answer
    # a message from a registered device with a non-canonical payload (valid signature): malformed
    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=1, issued_at=bench.clock.ms // 1000,
                        ttl_s=60, market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    spaced = json.dumps(fields, sort_keys=True).encode()
    signature = key.sign_digest(hashlib.sha256(spaced).digest())
    body = rejected(bench.post({"payload": spaced.decode(), "signature": signature.hex()}), "malformed", 400)
    assert "canonical" in body["detail"]
    hostile_registrations = [
        b"", b"[]", b"{}", b'{"public_key": 5}', b'{"public_key": "zz"}', b'{"public_key": "' + b"00" * 33 + b'"}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "credit_milli_minor": 1.5}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "credit_milli_minor": "5"}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "credit_milli_minor": -1}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "credit_milli_minor": 99999999999999999999999999}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "name": "\\u0000"}',
        b'{"public_key": "' + key.public_key.hex().encode() + b'", "extra": 1}',
    ]
    for body in hostile_registrations:
        r = bench.http.post(bench.url + "/v1/devices", data=body, timeout=10)
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
        assert r.json()["code"] == "malformed", r.text
    for path in ["/v1/markets/abc/book", "/v1/markets/-1800/book", f"/v1/markets/{2**70}/book", "/v1/markets/7/book",
                 "/v1/trades/0", f"/v1/trades/{2**64}", "/v1/trades/999", "/v1/devices/x", "/nope",
                 "/v1/devices/%ED%A0%80", "/v1/devices/%00/trades", "/v1/devices/%FF/messages",
                 f"/v1/devices/{key.device_id}/trades?after=-1", f"/v1/devices/{key.device_id}/trades?after=x",
                 f"/v1/devices/{key.device_id}/orders?market_id={2**64}"]:
        r = bench.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert r.json()["status"] == "rejected", r.text
    assert bench.http.delete(bench.url + "/v1/stats", timeout=10).status_code == 405
    assert bench.stats()["messages"] == 0  # nothing malformed is stored, not even the verified non-canonical one
    assert bench.account(key)["max_nonce"] == 0


def test_operator_token_guards_registration(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    with running_ledger(settings_for(tmp_path / "l.sqlite3", clock, operator_token="s3cret-token")) as running:
        key = make_key(1)
        body = {"public_key": key.public_key.hex(), "name": "h"}
        r = requests.post(running.url + "/v1/devices", json=body, timeout=10)
        rejected(r, "unauthorized", 401)
        assert "s3cret-token" not in r.text
        r = requests.post(running.url + "/v1/devices", json=body, headers={"Authorization": "Bearer wrong"}, timeout=10)
        rejected(r, "unauthorized", 401)
        r = requests.post(running.url + "/v1/devices", json=body, headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
        assert r.status_code == 200 and r.json()["created"] is True
        api.RegisterOut.model_validate(r.json())
        r2 = requests.post(running.url + "/v1/devices", json={**body, "credit_milli_minor": 5},
                           headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
        assert r2.status_code == 200 and r2.json()["created"] is False
        assert r2.json()["device_id"] == r.json()["device_id"] == key.device_id
        assert r2.json()["balance_milli_minor"] == CREDIT  # idempotent: not re-credited
        assert "s3cret-token" not in repr(running.app.state.settings)


def test_last_market_bounds_the_market_day(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    with running_ledger(settings_for(tmp_path / "l.sqlite3", clock, last_market_id=MARKET)) as running:
        bench = Bench(running.url, clock, running.app)
        key = make_key(1)
        bench.register(key)
        assert bench.get("/v1/info").json()["last_market_id"] == MARKET
        accepted(bench.order(key, "sell", 100, 2000, market=MARKET))
        body = rejected(bench.order(key, "sell", 100, 2000, market=MARKET + 1800), "unknown_market", 422)
        assert str(MARKET) in body["detail"]


def test_time_info_and_stats(bench):
    time_ms = bench.get("/v1/time").json()
    api.TimeOut.model_validate(time_ms)
    assert time_ms == {"time_ms": (T0 + 100) * 1000}
    info = bench.get("/v1/info").json()
    api.InfoOut.model_validate(info)
    assert info["ledger_id"] == LEDGER_ID and info["lot_wh"] == 100 and info["price_max_per_kwh_minor"] == 4000
    assert info["last_market_id"] is None
    assert bench.stats()["devices"] == 0


def test_openapi_document_is_current():
    from host_tools.bench_ledger.cli import openapi_document

    committed = json.loads((REPO / "docs" / "ledger-api.json").read_text())
    assert committed == openapi_document(), "docs/ledger-api.json is stale: regenerate with `dgc-host ledger openapi > docs/ledger-api.json`"


# ------------------------------------------------------------------------------------- CLI

def run_cli(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools.bench_ledger.cli", "ledger", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def test_cli_serve_register_order_book_and_sigterm(tmp_path):
    db = tmp_path / "cli.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.bench_ledger.cli", "ledger", "serve", "--db", str(db), "--port", "0",
         "--ledger-id", "cli-ledger", "--operator-token", "tok",
         # the wall clock runs here: 30-min slots keep "--market next" open for the whole test
         "--slot-seconds", "1800", "--markets-ahead", "48", "--gate-closure-seconds", "900",
         "--clock-offset-ms", "60000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ledger listening on http://127.0.0.1:") and line.strip().endswith("ledger_id=cli-ledger"), line
        url = line.split()[3]
        assert requests.get(url + "/v1/info", timeout=5).json()["ledger_id"] == "cli-ledger"
        skew_ms = requests.get(url + "/v1/time", timeout=5).json()["time_ms"] - time.time() * 1000
        assert 55_000 < skew_ms < 65_000  # --clock-offset-ms runs the ledger's clock ahead
        key_file = tmp_path / "board.key"
        key = generate_key_file(key_file)
        r = run_cli("register", "--url", url, "--public-key", key.public_key.hex(), "--name", "bench")
        assert r.returncode == 1 and "unauthorized" in r.stderr
        r = run_cli("register", "--url", url, "--public-key", key.public_key.hex(), "--name", "bench",
                    env={"DGC_LEDGER_OPERATOR_TOKEN": "tok"})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["device_id"] == key.device_id
        r = run_cli("order", "--url", url, "--key-file", str(key_file), "--ledger-id", "cli-ledger", "--market", "next",
                    "--side", "sell", "--energy-wh", "200", "--price", "2000")
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["status"] == "accepted" and answer["nonce"] == 1
        market_id = answer["result"]["market_id"]
        r = run_cli("order", "--url", url, "--key-file", str(key_file), "--ledger-id", "cli-ledger", "--market-id",
                    str(market_id), "--side", "sell", "--energy-wh", "250", "--price", "2000")
        assert r.returncode == 1 and "not_whole_lots" in r.stderr and "expected a multiple of 100" in r.stderr
        r = run_cli("book", "--url", url, "--market-id", str(market_id), "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["asks"][0]["remaining_wh"] == 200
        r = run_cli("cancel", "--url", url, "--key-file", str(key_file), "--ledger-id", "cli-ledger",
                    "--market-id", str(market_id), "--order-nonce", "1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"]["cancelled_wh"] == 200
        assert key_file.read_text().split()[1] not in r.stdout + r.stderr  # the secret never shows
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=10)
        finally:
            proc.kill() if proc.poll() is None else None
            proc.stdout.close(), proc.stderr.close()
    assert rc == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["order", "--url", "http://127.0.0.1:9", "--key-file", "k", "--ledger-id", "x", "--market-id", "1800",
          "--side", "hold", "--energy-wh", "100", "--price", "1"], "--side"),
        (["order", "--url", "http://127.0.0.1:9", "--key-file", "k", "--ledger-id", "x", "--market-id", "1800",
          "--side", "buy", "--energy-wh", "-5", "--price", "1"], "expected a positive integer"),
        (["book", "--url", "ftp://x", "--market-id", "1800"], "expected an http:// or https:// URL"),
        (["register", "--url", "http://127.0.0.1:9", "--public-key", "abc"], "expected a secp256k1 public key"),
        (["serve", "--port", "70000"], "expected a port"),
        (["serve", "--clock-offset-ms", "soon"], "expected an integer number of milliseconds"),
        (["order", "--url", "http://127.0.0.1:9", "--key-file", "/nonexistent/key", "--ledger-id", "x",
          "--market-id", "1800", "--side", "buy", "--energy-wh", "100", "--price", "1"], "no key file"),
        (["serve", "--config", "/nonexistent.toml"], "expected an existing board config file"),
        (["serve", "--last-market", "1801", "--port", "0", "--db", ":memory:"], "expected a slot start"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args, expected):
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_cli_unreachable_ledger_exits_1():
    r = run_cli("book", "--url", "http://127.0.0.1:9", "--market-id", "1800")
    assert r.returncode == 1 and "cannot reach the ledger" in r.stderr


def _raw_exchange(port: int, requests_bytes: list[bytes]) -> list[tuple[int, dict, bytes]]:
    """Send raw HTTP/1.1 requests on one connection, one at a time; (status, headers, body) each."""
    import socket

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for raw in requests_bytes:
            sock.sendall(raw)
            status = int(stream.readline().split()[1])
            headers = {}
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            out.append((status, headers, stream.read(int(headers.get("content-length", 0)))))
    return out


def test_the_parser_fast_path_answers_exactly_as_uvicorns_path(bench):
    """fast_http answers plain keep-alive POST /v1/messages from the parser; anything else (here:
    Connection: close, or a proxy header) takes uvicorn's ASGI path. Both must give the same
    status, body and headers (but the date) for the same request - including refusals and a resend."""
    key = make_key(1)
    bench.register(key)
    port = int(bench.url.rsplit(":", 1)[1])
    good = bench.message(key, "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000).to_wire()
    forged = {**good, "signature": "0" * 127 + "1"}
    stranger = bench.message(make_key(9), "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    wrong_ledger = bench.message(key, "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000,
                                 ledger_id="elsewhere").to_wire()
    bodies = [json.dumps(good).encode(), json.dumps(good).encode(),  # accepted, then the stored answer to a resend
              json.dumps(forged).encode(), json.dumps(stranger.to_wire()).encode(), json.dumps(wrong_ledger).encode(),
              b"{not json", b'{"payload": 1.5, "signature": "00"}', b"", b"[" * 50]

    def request(body: bytes, extra: str) -> bytes:
        return (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    served_fast = []
    original = bench.app.fast_post
    bench.app.fast_post = lambda *args: (served_fast.append(args[0]), original(*args))[1]
    fast = _raw_exchange(port, [request(b, "") for b in bodies])
    assert served_fast == bodies  # every one of these took the parser's fast path ...
    slow = [_raw_exchange(port, [request(b, "Connection: close\r\n")])[0] for b in bodies[1:]]
    proxied = [_raw_exchange(port, [request(b, "X-Forwarded-For: 127.0.0.1\r\n")])[0] for b in bodies[1:]]
    assert served_fast == bodies  # ... and none of these
    assert fast[0][0] == 200 and json.loads(fast[0][2])["duplicate"] is False
    for (f_status, f_headers, f_body), via in zip(fast[1:], zip(slow, proxied)):
        for s_status, s_headers, s_body in via:
            assert (f_status, f_body) == (s_status, s_body)
            drop = {"date", "connection"}
            assert {k: v for k, v in f_headers.items() if k not in drop} == {k: v for k, v in s_headers.items() if k not in drop}
    assert json.loads(fast[1][2])["duplicate"] is True
    assert [status for status, _, _ in fast[2:]] == [401, 401, 422, 400, 400, 400, 400]
