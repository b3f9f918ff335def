"""The bench ledger with its store in a writer process (``LedgerSettings.writer_process``, the
default of ``dgc-host ledger serve``), over real HTTP: the same answers as the one-process ledger
- exactly-once and duplicates, refusals before any cryptography, revocation, rate limits, the
signed record - across a restart, and a clear 500 (nothing applied, no hang) if the writer dies.

The ledger's clock is the host clock moved to the test's epoch (an ``OffsetClock``): a test clock
object would live in this process only, which is why a writer process refuses one."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from firmware.ledger import record
from host_tools.bench_ledger.app import LedgerSettings, OffsetClock
from host_tools.bench_ledger.limits import RateLimit
from host_tools.bench_ledger.server import running_ledger
from host_tools.bench_ledger.writer_process import RemoteStore

from .test_ledger_http import LEDGER_ID, MARKET, OPERATOR, RULES, T0, Bench, Clock, make_key, settings_for

TTL_S = 3000  # the ledger's clock runs in real time from T0 + 100 s: messages stay valid for the whole test


def process_settings(db, **kw) -> LedgerSettings:
    start_ms = (T0 + 100) * 1000
    return settings_for(db, OffsetClock(start_ms - time.time_ns() // 1_000_000), writer_process=True, **kw)


def bench_for(running) -> Bench:
    return Bench(running.url, Clock((T0 + 100) * 1000), running.app)


def test_a_test_clock_is_refused_with_a_writer_process(tmp_path):
    with pytest.raises(ValueError, match="writer_process: expected the host clock or an OffsetClock"):
        settings_for(tmp_path / "l.sqlite3", Clock(T0 * 1000), writer_process=True)


def test_writer_process_keeps_every_rule_over_http(tmp_path):
    seller, buyer, stranger = make_key(1), make_key(2), make_key(3)
    with running_ledger(process_settings(tmp_path / "ledger.sqlite3", device_rate=RateLimit(per_second=1, burst=6))) as running:
        store = running.app.state.store
        assert isinstance(store, RemoteStore) and store.pid != os.getpid()
        os.kill(store.pid, 0)  # a live process of its own
        bench = bench_for(running)
        bench.register(seller)
        bench.register(buyer)

        sell = bench.message(seller, "order", ttl_s=TTL_S, market_id=MARKET, side="sell", energy_wh=500, price_per_kwh_minor=2000)
        assert bench.post(sell).status_code == 200
        buy = bench.message(buyer, "order", ttl_s=TTL_S, market_id=MARKET, side="buy", energy_wh=300, price_per_kwh_minor=2100)
        first = bench.post(buy)
        assert first.status_code == 200, first.text
        trades = first.json()["result"]["trades"]
        assert [(t["energy_wh"], t["price_per_kwh_minor"]) for t in trades] == [(300, 2000)]

        again = bench.post(buy)  # the same bytes: the stored answer, nothing applied twice
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert again.json()["result"] == first.json()["result"]
        conflict = bench.message(buyer, "order", nonce=1, ttl_s=TTL_S,
                                 market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2100)
        r = bench.post(conflict)
        assert r.status_code == 409 and r.json()["code"] == "nonce_conflict"
        assert bench.book()["asks"] == [{"price_per_kwh_minor": 2000, "remaining_wh": 200, "orders": 1}]
        assert bench.stats()["trades"] == 1

        r = bench.post(bench.message(stranger, "order", ttl_s=TTL_S, market_id=MARKET, side="buy", energy_wh=100,
                                     price_per_kwh_minor=2100))
        assert r.status_code == 401 and r.json()["code"] == "unknown_device"
        forged = bench.message(seller, "order", ttl_s=TTL_S, market_id=MARKET, side="sell", energy_wh=100,
                               price_per_kwh_minor=2000).to_wire()
        forged["signature"] = forged["signature"][:-2] + ("00" if forged["signature"][-2:] != "00" else "01")
        r = bench.post(forged)
        assert r.status_code == 401 and r.json()["code"] == "bad_signature"

        codes = [bench.order(buyer, "buy", 100, 1500, ttl_s=TTL_S).status_code for _ in range(12)]
        assert 429 in codes and codes[0] == 200  # 1 per second, burst 6: the device's limit holds

        revoked = requests.post(f"{running.url}/v1/devices/{seller.device_id}/revoke", headers=OPERATOR, timeout=10)
        assert revoked.status_code == 200 and revoked.json()["cancelled_orders"] == 1
        r = bench.order(seller, "sell", 100, 2000, ttl_s=TTL_S)
        assert r.status_code == 403 and r.json()["code"] == "revoked"
        assert bench.book()["asks"] == []

        messages = bench.get(f"/v1/devices/{buyer.device_id}/messages").json()["messages"]
        nonces = [m["nonce"] for m in messages]
        assert len(nonces) == len(set(nonces)) and 1 in nonces  # each stored once

        info = bench.get("/v1/info").json()
        blocks = bench.get("/v1/log/blocks").json()["blocks"]
        assert record.verify_chain(blocks, bytes.fromhex(info["authority_public_key"]), ledger_id=LEDGER_ID) == sum(b["entry_count"] for b in blocks) >= 6
        assert store.record_completeness() == []
        assert bytes.fromhex(info["authority_public_key"]) == store.authority_public_key
    with pytest.raises(ProcessLookupError):  # the writer stopped with the ledger
        for _ in range(100):
            os.kill(store.pid, 0)
            time.sleep(0.05)


def test_writer_process_restart_rebuilds_the_book_and_keeps_duplicates(tmp_path):
    db = tmp_path / "ledger.sqlite3"
    seller = make_key(11)
    with running_ledger(process_settings(db)) as running:
        bench = bench_for(running)
        bench.register(seller)
        sell = bench.message(seller, "order", ttl_s=TTL_S, market_id=MARKET, side="sell", energy_wh=400, price_per_kwh_minor=2500)
        first = bench.post(sell)
        assert first.status_code == 200
    with running_ledger(process_settings(db)) as running:
        bench = bench_for(running)
        assert bench.book()["asks"] == [{"price_per_kwh_minor": 2500, "remaining_wh": 400, "orders": 1}]
        again = bench.post(sell)
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert again.json()["result"] == first.json()["result"]
        r = bench.post(bench.message(make_key(12), "order", ttl_s=TTL_S, market_id=MARKET, side="buy", energy_wh=100,
                                     price_per_kwh_minor=2500))
        assert r.status_code == 401 and r.json()["code"] == "unknown_device"  # keys came over at start; this one never was


def test_a_dead_writer_is_a_clear_500_and_no_hang(tmp_path):
    key = make_key(21)
    with running_ledger(process_settings(tmp_path / "ledger.sqlite3")) as running:
        bench = bench_for(running)
        bench.register(key)
        os.kill(running.app.state.store.pid, signal.SIGKILL)
        r = bench.order(key, "sell", 100, 2000, ttl_s=TTL_S)
        assert r.status_code == 500 and r.json()["code"] == "internal" and "not applied" in r.json()["detail"]
        assert bench.get("/v1/time").status_code == 200  # the HTTP side still answers what needs no store
