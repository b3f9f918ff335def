"""Issue 10 part 4 over real HTTP: every accepted message and every trade is in the ledger's
hash-chained record, sealed in blocks signed by its authority key; a board checks its own
messages and its trades against the pinned key (firmware.ledger.rest + record), and
`dgc-host ledger verify` checks a whole log - and each catches a ledger that rewrote history."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import coincurve
import hashlib
import pytest

from firmware.keystore import DeviceKey
from firmware.ledger import record
from firmware.ledger.base import LedgerRejected
from firmware.ledger.rest import RestLedger
from host_tools.bench_ledger.server import running_ledger

from .test_ledger_http import LEDGER_ID, MARKET, REPO, T0, TOKEN, Bench, Clock, accepted, make_key, settings_for

AUTHORITY = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"ledger authority for tests").digest()))


@pytest.fixture
def bench(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    with running_ledger(settings_for(tmp_path / "ledger.sqlite3", clock, authority_key=AUTHORITY)) as running:
        yield Bench(running.url, clock, running.app)


def board(bench: Bench, key: DeviceKey) -> RestLedger:
    return RestLedger(bench.url, timeout_ms=5000, retries=0, backoff_ms=10, signer=key, ledger_id=LEDGER_ID,
                      clock_ms=lambda: bench.clock.ms)


def host_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host_tools.cli", "ledger", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_the_board_verifies_its_messages_and_trades_against_the_pinned_key(bench, tmp_path):
    seller, buyer = make_key(1), make_key(2)
    bench.register(seller), bench.register(buyer)
    assert bench.get("/v1/info").json()["authority_public_key"] == AUTHORITY.public_key.hex()
    sell = bench.message(seller, "order", market_id=MARKET, side="sell", energy_wh=500, price_per_kwh_minor=2000)
    accepted(bench.post(sell))
    buy = bench.message(buyer, "order", market_id=MARKET, side="buy", energy_wh=300, price_per_kwh_minor=2500)
    accepted(bench.post(buy))
    as_seller, as_buyer = board(bench, seller), board(bench, buyer)
    proof = as_seller.verify_message_recorded(sell, AUTHORITY.public_key)
    assert proof.header.ledger_id == LEDGER_ID
    as_buyer.verify_message_recorded(buy, AUTHORITY.public_key)
    (trade,), _ = as_buyer.trades_since(buyer.device_id, 0)
    as_buyer.verify_trade_recorded(trade, buyer.device_id, AUTHORITY.public_key)
    (seller_view,), _ = as_seller.trades_since(seller.device_id, 0)
    as_seller.verify_trade_recorded(seller_view, seller.device_id, AUTHORITY.public_key)

    # a trade the ledger reports differently from its record is refused
    inflated = type(trade)(**{**trade.__dict__, "energy_wh": 3000})
    with pytest.raises(record.RecordError, match="differs"):
        as_buyer.verify_trade_recorded(inflated, buyer.device_id, AUTHORITY.public_key)
    # a message never accepted has no proof; another device cannot fetch mine
    never = bench.message(seller, "order", market_id=MARKET, side="sell", energy_wh=150, price_per_kwh_minor=2000)
    bench.post(never)  # rejected (not whole lots): stored, but not in the record
    with pytest.raises(LedgerRejected, match="not_found"):
        as_seller.verify_message_recorded(never, AUTHORITY.public_key)
    with pytest.raises(LedgerRejected):
        as_buyer.message_proof(seller.device_id, 1)
    # a ledger that swapped its key is caught by the pinned one
    impostor = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"impostor").digest()))
    with pytest.raises(record.RecordError, match="pinned authority"):
        as_seller.verify_message_recorded(sell, impostor.public_key)

    blocks = bench.get("/v1/log/blocks").json()  # the operator's view carries the entries
    assert record.verify_chain(blocks["blocks"], AUTHORITY.public_key, ledger_id=LEDGER_ID) == 3  # 2 messages + 1 trade
    import requests
    public = requests.get(bench.url + "/v1/log/blocks", timeout=10).json()["blocks"]
    assert public and all("entries" not in b for b in public)  # the public sees signed headers, not households' orders


def test_ledger_verify_checks_a_whole_log_and_catches_a_rewrite(bench, tmp_path):
    seller, buyer = make_key(1), make_key(2)
    bench.register(seller), bench.register(buyer)
    for i in range(5):
        accepted(bench.order(seller, "sell", 100, 2000 + i))
        accepted(bench.order(buyer, "buy", 100, 2100))
        bench.get("/v1/log/blocks")  # seals what is pending: several blocks
    accepted(bench.order(seller, "sell", 200, 2500))  # left unsealed on purpose
    db = str(bench.app.state.settings.db_path)
    key = AUTHORITY.public_key.hex()
    r = host_cli("verify", "--url", bench.url, "--authority-key", key, "--operator-token", TOKEN)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("ledger verify: blocks=") and r.stdout.strip().endswith(" ok"), r
    r = host_cli("verify", "--db", db, "--authority-key", key)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(" ok")
    r = host_cli("verify", "--url", bench.url, "--authority-key", make_key(9).public_key.hex(), "--operator-token", TOKEN)
    assert r.returncode == 1 and "FAILED" in r.stdout and "authority" in r.stdout

    # the ledger's operator quietly lowers a trade in the table: the record no longer agrees
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE trades SET energy_wh = 50 WHERE trade_id = 1")
    r = host_cli("verify", "--db", db, "--authority-key", key)
    assert r.returncode == 1 and "trade 1" in r.stdout, r.stdout
    # ... and rewrites the record to match: the signed root no longer does
    with sqlite3.connect(db) as conn:
        leaf = conn.execute("SELECT leaf FROM log_entries WHERE kind = 'trade' AND trade_id = 1").fetchone()[0]
        conn.execute("UPDATE log_entries SET leaf = ? WHERE kind = 'trade' AND trade_id = 1",
                     (leaf.replace('"energy_wh":100', '"energy_wh":50'),))
    r = host_cli("verify", "--db", db, "--authority-key", key)
    assert r.returncode == 1 and "entries_root" in r.stdout, r.stdout
