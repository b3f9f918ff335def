"""The market views (issue 11 part 3) over real HTTP against the real bench ledger.

A uvicorn server on 127.0.0.1 (free port) with the real store, real signed messages from real
keys; only the ledger's clock is injected, so a market passes through every state without
sleeping. The CLI commands run as `dgc-host ledger ...` processes against that server.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import coincurve
import pytest
import requests
from hypothesis import given, strategies as st

from firmware.keystore import DeviceKey
from firmware.market import MarketRules
from firmware.messages import new_fields, sign_message
from host_tools.bench_ledger import views
from host_tools.bench_ledger.app import LedgerSettings
from host_tools.bench_ledger.server import running_ledger
from host_tools.bench_ledger.views_api import MARKET_STATES, MarketsOut, SummaryOut, market_state

REPO = Path(__file__).resolve().parents[1]
LEDGER_ID = "views-test"
TOKEN = "views-test-operator-token"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_800_000_000  # a slot boundary
RULES = MarketRules(slot_seconds=1800, markets_ahead=48, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
MARKET = T0 + 3 * 1800
DEADLINE_S = 600


class Clock:
    def __init__(self, s: int) -> None:
        self.ms = s * 1000

    def __call__(self) -> int:
        return self.ms

    def set_s(self, s: int) -> None:
        self.ms = s * 1000


def make_key(n: int) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"views device {n}".encode()).digest()))


class Ledger:
    def __init__(self, url: str, clock: Clock) -> None:
        self.url, self.clock = url, clock
        self.nonces: dict[str, int] = {}

    def register(self, key: DeviceKey, name: str) -> None:
        r = requests.post(self.url + "/v1/devices", json={"public_key": key.public_key.hex(), "name": name},
                          headers=OPERATOR, timeout=10)
        assert r.status_code == 200, r.text

    def send(self, key: DeviceKey, kind: str, **body) -> dict:
        nonce = self.nonces[key.device_id] = self.nonces.get(key.device_id, 0) + 1
        fields = new_fields(kind, ledger_id=LEDGER_ID, device_id=key.device_id, nonce=nonce,
                            issued_at=self.clock.ms // 1000, ttl_s=60, **body)
        r = requests.post(self.url + "/v1/messages", json=sign_message(fields, key).to_wire(), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def order(self, key: DeviceKey, side: str, wh: int, price: int, market: int = MARKET) -> dict:
        return self.send(key, "order", market_id=market, side=side, energy_wh=wh, price_per_kwh_minor=price)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def markets(self, **params) -> dict:
        r = self.get("/v1/markets", params=params)
        assert r.status_code == 200, r.text
        MarketsOut.model_validate(r.json())
        return r.json()


@pytest.fixture
def ledger(tmp_path):
    clock = Clock(T0 + 100)
    settings = LedgerSettings(db_path=tmp_path / "ledger.sqlite3", ledger_id=LEDGER_ID, rules=RULES, operator_token=TOKEN,
                              report_deadline_seconds=DEADLINE_S, clock=clock)
    with running_ledger(settings) as running:
        yield Ledger(running.url, clock)


def dgc_host(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools.cli", "ledger", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, **(env or {})})


def market_row(body: dict, market_id: int) -> dict:
    return next(m for m in body["markets"] if m["market_id"] == market_id)


def trade_in_market(ledger: Ledger) -> tuple[DeviceKey, DeviceKey, int]:
    seller, buyer = make_key(1), make_key(2)
    ledger.register(seller, "house-a")
    ledger.register(buyer, "house-b")
    ledger.order(seller, "sell", 500, 2000)
    answer = ledger.order(buyer, "buy", 300, 2500)
    trade_id = answer["result"]["trades"][0]["trade_id"]
    ledger.order(buyer, "buy", 200, 1500)  # rests: a bid left in the book
    return seller, buyer, trade_id


def test_a_market_goes_open_gate_closed_delivering_reporting_settled(ledger):
    seller, buyer, trade_id = trade_in_market(ledger)
    body = ledger.markets()
    assert body["current_market_id"] == T0 and body["next_market_id"] == T0 + 1800
    row = market_row(body, MARKET)
    assert row["state"] == "open"
    assert (row["orders"], row["open_orders"], row["open_bid_wh"], row["open_ask_wh"]) == (3, 2, 200, 200)
    assert (row["trades"], row["traded_wh"], row["delivered_wh"]) == (1, 300, 0)
    assert (row["price_low_per_kwh_minor"], row["price_high_per_kwh_minor"]) == (2000, 2000)
    assert market_row(body, T0)["state"] == "delivering" and market_row(body, T0)["trades"] == 0  # always listed
    assert "device_id" not in str(body)  # public: aggregates only

    ledger.clock.set_s(MARKET - 900)  # the gate shuts: resting orders expire
    row = market_row(ledger.markets(), MARKET)
    assert (row["state"], row["open_orders"], row["open_bid_wh"]) == ("gate_closed", 0, 0)
    ledger.clock.set_s(MARKET + 10)
    assert market_row(ledger.markets(), MARKET)["state"] == "delivering"
    ledger.clock.set_s(MARKET + 1800 + 5)
    assert market_row(ledger.markets(), MARKET)["state"] == "reporting"
    ledger.send(seller, "delivery_report", trade_id=trade_id, market_id=MARKET, role="seller", energy_wh=300, status="delivered")
    ledger.send(buyer, "delivery_report", trade_id=trade_id, market_id=MARKET, role="buyer", energy_wh=250, status="delivered")
    row = market_row(ledger.markets(), MARKET)
    assert (row["state"], row["settled_trades"], row["delivered_wh"], row["shortfall_wh"]) == ("settled", 1, 250, 50)
    assert row["paid_milli_minor"] == 250 * 2000

    r = dgc_host("markets", "--url", ledger.url)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith(views.utc(MARKET)))
    assert views.utc(MARKET) == "2027-01-15 09:30:00Z"
    cells = line.split()
    assert "settled" in cells and "300" in cells and "250" in cells and "2000" in cells
    r = dgc_host("markets", "--url", ledger.url, "--json")
    assert r.returncode == 0 and '"state": "settled"' in r.stdout


def test_markets_range_and_limit(ledger):
    key = make_key(3)
    ledger.register(key, "house-c")
    for i in range(4):
        ledger.order(key, "sell", 100, 2000, market=MARKET + i * 1800)
    body = ledger.markets(**{"from": MARKET + 1800, "to": MARKET + 2 * 1800})
    assert [m["market_id"] for m in body["markets"]] == [MARKET + 1800, MARKET + 2 * 1800]
    body = ledger.markets(limit=2)
    assert [m["market_id"] for m in body["markets"]] == [MARKET + 2 * 1800, MARKET + 3 * 1800]  # the newest kept
    r = ledger.get("/v1/markets", params={"limit": 0})
    assert r.status_code == 400 and r.json()["code"] == "malformed" and "limit" in r.json()["detail"]


def test_book_and_trades_by_next_current_or_id_table_and_json(ledger, tmp_path):
    seller, buyer, _ = trade_in_market(ledger)
    # 'next' is the nearest open market by the ledger's clock (T0 + 1800), which is empty ...
    r = dgc_host("book", "--url", ledger.url, "--market", "next")
    assert r.returncode == 0, r.stderr
    assert views.utc(T0 + 1800) in r.stdout and "(empty book)" in r.stdout
    # ... the market by id shows its levels, asks above bids
    r = dgc_host("book", "--url", ledger.url, "--market-id", str(MARKET))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "gate open" in lines[0]
    assert [l.split()[:3] for l in lines[3:]] == [["ask", "2000", "200"], ["bid", "1500", "200"]]
    r = dgc_host("book", "--url", ledger.url, "--market-id", str(MARKET), "--json")
    assert r.returncode == 0 and '"remaining_wh": 200' in r.stdout

    ledger.clock.set_s(MARKET + 60)  # now MARKET is being delivered: 'current'
    r = dgc_host("trades", "--url", ledger.url, "--market", "current")
    assert r.returncode == 1 and "unauthorized" in r.stderr  # operator only
    r = dgc_host("trades", "--url", ledger.url, "--market", "current", env={"DGC_LEDGER_OPERATOR_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[3].split()
    assert row[:6] == ["1", "house-a", "house-b", "300", "2000", "contracted"]  # names, not ids
    r = dgc_host("trades", "--url", ledger.url, "--market", "current", "--json", "--operator-token", TOKEN)
    assert r.returncode == 0 and f'"market_id": {MARKET}' in r.stdout and seller.device_id in r.stdout

    r = dgc_host("book", "--url", ledger.url, "--market", "soon")
    assert r.returncode == 2 and "expected a market id (slot start, UTC epoch seconds), 'next' or 'current'" in r.stderr


def test_next_when_no_market_is_open_exits_1_with_a_reason(tmp_path):
    clock = Clock(T0 + 100)
    settings = LedgerSettings(db_path=":memory:", ledger_id=LEDGER_ID, rules=RULES, operator_token=TOKEN, clock=clock,
                              last_market_id=T0 + 1800)
    with running_ledger(settings) as running:
        clock.set_s(T0 + 1800 - 900)  # the last market's gate has shut: the day is over
        r = dgc_host("book", "--url", running.url, "--market", "next")
    assert r.returncode == 1 and "no market is open for orders" in r.stderr


def test_summary_per_device_energy_money_shortfall_open_orders(ledger):
    seller, buyer, trade_id = trade_in_market(ledger)
    r = ledger.get("/v1/summary")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"  # it names households: operator only
    ledger.clock.set_s(MARKET + 1800 + 5)
    ledger.send(seller, "delivery_report", trade_id=trade_id, market_id=MARKET, role="seller", energy_wh=200, status="failed")
    ledger.send(buyer, "delivery_report", trade_id=trade_id, market_id=MARKET, role="buyer", energy_wh=200, status="delivered")
    later = make_key(4)
    ledger.register(later, "house-d")
    ledger.order(later, "buy", 400, 1800, market=MARKET + 3 * 1800)
    r = ledger.get("/v1/summary", headers=OPERATOR)
    assert r.status_code == 200, r.text
    SummaryOut.model_validate(r.json())
    by_name = {d["name"]: d for d in r.json()["devices"]}
    a, b, d = by_name["house-a"], by_name["house-b"], by_name["house-d"]
    assert (a["sold_wh"], a["delivered_wh"], a["received_milli_minor"], a["shortfall_wh"]) == (300, 200, 200 * 2000, 100)
    assert (b["bought_wh"], b["received_wh"], b["paid_milli_minor"], b["shortfall_wh"]) == (300, 200, 200 * 2000, 0)
    assert (a["open_orders"], b["open_orders"], d["open_orders"], d["open_order_wh"]) == (0, 0, 1, 400)  # gate shut on MARKET

    r = dgc_host("summary", "--url", ledger.url)
    assert r.returncode == 1 and "unauthorized" in r.stderr
    r = dgc_host("summary", "--url", ledger.url, "--operator-token", TOKEN)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert rows["house-a"][1:] == ["0", "300", "0", "200", "0.000", "400.000", "100", "0"]
    assert rows["house-b"][1:] == ["300", "0", "200", "0", "400.000", "0.000", "0", "0"]
    assert rows["total"][1:] == ["300", "300", "200", "200", "400.000", "400.000", "100", "1"]


@given(market=st.integers(0, 10**6).map(lambda n: n * 1800), offsets=st.lists(st.integers(-48 * 1800, 3 * 1800), min_size=2),
       unsettled=st.integers(0, 3))
def test_market_state_only_moves_forward_in_time(market, offsets, unsettled):
    """As time passes a market's state never goes back (not_trading/open -> gate_closed -> delivering -> after)."""
    order = {"not_trading": 0, "open": 0, "gate_closed": 1, "delivering": 2, "reporting": 3, "settled": 3}
    seen = [market_state(RULES, market, max(0, market + o), unsettled_trades=unsettled, last_market_id=None)
            for o in sorted(offsets)]
    assert all(s in MARKET_STATES for s in seen)
    assert [order[s] for s in seen] == sorted(order[s] for s in seen)


def test_money_is_exact():
    assert views.money(0) == "0.000" and views.money(12_345) == "12.345" and views.money(-5) == "-0.005"


def test_the_demo_closing_table_is_the_ledger_summary_per_house(tmp_path):
    """The demo prints this table above its summary: line: a real neighbourhood (ledger process, bench
    houses, registration by the demo's own code), two houses trading by hand instead of daemons."""
    from host_tools.demo import per_house_table
    from host_tools.neighbourhood import Neighbourhood, default_houses

    with Neighbourhood(tmp_path / "hood", default_houses(2)) as hood:
        hood.start(start_daemons=False)
        names = list(hood.houses)
        ledger_id = hood.base_config["ledger"]["ledger_id"]
        # one market for both orders, two slots past the next one: both land in it even across a slot edge
        market = requests.get(hood.ledger_url + "/v1/markets", timeout=10).json()["next_market_id"] + 2 * hood.slot_seconds
        for name, side, price in ((names[0], "sell", 2000), (names[1], "buy", 2100)):
            r = dgc_host("order", "--url", hood.ledger_url, "--key-file", str(hood.houses[name].directory / "device.key"),
                         "--ledger-id", ledger_id, "--market-id", str(market), "--side", side, "--energy-wh", "100",
                         "--price", str(price))
            assert r.returncode == 0, r.stderr
        table = per_house_table(hood)
    lines = table.splitlines()
    assert lines[0].split() == ["house", "bought_wh", "sold_wh", "received_wh", "delivered_wh", "paid", "received",
                                "shortfall_wh", "open_orders"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows[names[0]][:2] == ["0", "100"] and rows[names[1]][:2] == ["100", "0"]  # traded at the seller's 2000
    assert rows["total"] == ["100", "100", "0", "0", "0.000", "0.000", "0", "0"]


def test_the_live_api_page_lists_the_views(ledger):
    """docs/walkthrough.md points people at the ledger's /docs page: it is served, and documents the views."""
    page = ledger.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text
    paths = ledger.get("/openapi.json").json()["paths"]
    assert {"/v1/markets", "/v1/summary", "/v1/markets/{market_id}/book"} <= set(paths)
