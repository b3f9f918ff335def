"""Sealing the record under load (LedgerStore): blocks are seq ranges, sealed a whole block at a time.

Why this matters for the throughput goal: sealing used to rewrite every sealed entry's row
(block_height, leaf_index) and happened once per seal interval, so a busy ledger sealed ~6,000
entries in one go under the store lock (~150 ms: every request in flight waited). Now a block
is one row naming its seq range, and a busy ledger seals each whole block of BLOCK_MAX_ENTRIES
as soon as it is full. These tests hold the record to its promises across that change: every
entry in exactly one signed block, chained, with proofs that verify for sealed and just-sealed
entries, after a restart too, and `dgc-host ledger verify --db` agrees. Real SQLite files, no HTTP.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import coincurve

from firmware.keystore import DeviceKey
from firmware.ledger import record
from firmware.market import MarketRules
from firmware.messages import new_fields, sign_message
from host_tools.bench_ledger.store import BLOCK_MAX_ENTRIES, LedgerStore

RULES = MarketRules(slot_seconds=1800, markets_ahead=4, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
NOW_S = 1_800_000_000 - 1_800_000_000 % 1800 + 60
MARKET = NOW_S - 60 + 2 * 1800
AUTHORITY = DeviceKey(coincurve.PrivateKey(hashlib.sha256(b"seal authority").digest()))
KEYS = [DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"seal {i}".encode()).digest())) for i in range(4)]
REPO = Path(__file__).resolve().parents[1]


def open_store(path) -> LedgerStore:
    # a seal interval far beyond the test: only the count trigger (and explicit seals) seal
    store = LedgerStore(path, RULES, 3600, ledger_id="seal", max_open_orders=10_000, authority=AUTHORITY,
                        seal_interval_ms=10**9)
    for i, key in enumerate(KEYS):
        store.register_device(key.public_key.hex(), f"d{i}", 10**12, NOW_S * 1000, sell_capacity_wh=10**6)
    return store


def resting_orders(store: LedgerStore, count: int, first_nonce: int = 1) -> list:
    items = []
    for n in range(count):
        key = KEYS[n % len(KEYS)]
        fields = new_fields("order", ledger_id="seal", device_id=key.device_id, nonce=first_nonce + n // len(KEYS),
                            issued_at=NOW_S, ttl_s=3600, market_id=MARKET, side="sell", energy_wh=100,
                            price_per_kwh_minor=3000 + n % 500)
        message = sign_message(fields, key)
        items.append((fields, message.payload, message.signature))
    return items


def check_blocks(store: LedgerStore, expected_entries: int) -> list[dict]:
    blocks, count = store.blocks(0, 1000, NOW_S * 1000, with_entries=True)
    assert count == len(blocks)
    previous = record.GENESIS_HASH
    seen = 0
    for height, block in enumerate(blocks):
        header = record.BlockHeader.from_obj(block)
        assert header.height == height and header.prev_block_hash == previous
        assert header.entry_count == len(block["entries"]) <= BLOCK_MAX_ENTRIES
        leaf_hashes = [record.leaf_hash(leaf.encode("ascii")) for leaf in block["entries"]]
        assert record.merkle_root(leaf_hashes).hex() == header.entries_root
        assert coincurve.PublicKey(AUTHORITY.public_key).verify(
            bytes(coincurve.ecdsa.cdata_to_der(coincurve.ecdsa.deserialize_compact(bytes.fromhex(block["signature"])))),
            bytes.fromhex(header.block_hash), hasher=None)
        previous, seen = header.block_hash, seen + header.entry_count
    assert seen == expected_entries
    assert store.record_completeness() == []
    return blocks


def test_a_busy_ledger_seals_each_whole_block_as_it_fills(tmp_path):
    store = open_store(tmp_path / "l.sqlite3")
    items = resting_orders(store, BLOCK_MAX_ENTRIES + 300)
    for i in range(0, len(items), 50):
        store.submit_batch(items[i:i + 50], NOW_S * 1000)
    store.submit_batch([], NOW_S * 1000)  # the next batch's sweep sees the full block
    rows = store._all("SELECT first_seq, entry_count FROM log_blocks ORDER BY height")
    assert [tuple(r) for r in rows] == [(1, BLOCK_MAX_ENTRIES)]  # one whole block; the rest waits for its interval
    # a proof of a sealed entry and of a pending one (which seals the rest first)
    for key, nonce in ((KEYS[0], 1), (KEYS[1], (BLOCK_MAX_ENTRIES + 290) // len(KEYS))):
        fields = next(f for f, _, _ in items if f["device_id"] == key.device_id and f["nonce"] == nonce)
        message = next((p, s) for f, p, s in items if f is fields)
        proof = record.InclusionProof.from_obj(store.message_proof(key.device_id, nonce, NOW_S * 1000))
        assert proof.leaf == record.message_leaf(*message)
        proof.verify(AUTHORITY.public_key, ledger_id="seal")
    check_blocks(store, len(items))
    store.close()


def test_blocks_and_proofs_hold_after_a_restart_and_ledger_verify_agrees(tmp_path):
    path = tmp_path / "l.sqlite3"
    store = open_store(path)
    items = resting_orders(store, BLOCK_MAX_ENTRIES + 10)
    store.submit_batch(items[:BLOCK_MAX_ENTRIES + 5], NOW_S * 1000)
    store.submit_batch(items[BLOCK_MAX_ENTRIES + 5:], NOW_S * 1000)  # seals block 0; 10 entries stay pending
    store.close()
    store = open_store(path)  # restart: the pending entries are found and sealed at the first chance
    assert store._sealed_through_seq == BLOCK_MAX_ENTRIES
    more = resting_orders(store, 8, first_nonce=10_000)
    store.submit_batch(more, NOW_S * 1000)
    blocks = check_blocks(store, len(items) + len(more))
    assert [b["entry_count"] for b in blocks] == [BLOCK_MAX_ENTRIES, 10, 8]  # the 10 left over sealed at the first batch
    store.close()
    done = subprocess.run([sys.executable, "-m", "host_tools.cli", "ledger", "verify", "--db", str(path),
                           "--authority-key", AUTHORITY.public_key.hex()], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"blocks=3 entries={len(items) + len(more)} ok" in done.stdout
    assert json.loads(blocks[1]["entries"][0])["kind"] == "message"


def test_a_database_from_before_log_seq_keeps_its_proofs_and_loses_two_indexes(tmp_path):
    """messages.log_seq replaced the (device_id, nonce) index on log_entries, and the (state,
    market_id) index serves look-ups by market: a database written before both (the columns and
    indexes as they were, rebuilt here with SQLite's own DDL) is migrated at open - every accepted
    message's proof still verifies, and neither index is written again."""
    import sqlite3

    path = tmp_path / "l.sqlite3"
    store = open_store(path)
    items = resting_orders(store, 40)
    store.submit_batch(items, NOW_S * 1000)
    store.close()
    conn = sqlite3.connect(path)  # the schema as it was: no log_seq, both indexes
    conn.execute("ALTER TABLE messages DROP COLUMN log_seq")
    conn.execute("CREATE INDEX log_message ON log_entries (device_id, nonce)")
    conn.execute("CREATE INDEX orders_market ON orders (market_id, state)")
    conn.commit()
    conn.close()
    store = open_store(path)
    indexes = {r[0] for r in store._all("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "log_message" not in indexes and "orders_market" not in indexes and "orders_open" in indexes
    assert store._one("SELECT COUNT(*) FROM messages WHERE log_seq IS NULL")[0] == 0
    store.submit_batch(resting_orders(store, 8, first_nonce=10_000), NOW_S * 1000)
    for fields, payload, signature in items[::7] + resting_orders(store, 8, first_nonce=10_000)[::3]:
        proof = record.InclusionProof.from_obj(store.message_proof(fields["device_id"], fields["nonce"], NOW_S * 1000))
        assert proof.leaf == record.message_leaf(payload, signature)
        proof.verify(AUTHORITY.public_key, ledger_id="seal")
    assert store.message_proof(KEYS[0].device_id, 999_999, NOW_S * 1000) is None
    check_blocks(store, len(items) + 8)
    plans = [" ".join(str(c) for c in row) for sql in (
        "SELECT 1 FROM orders WHERE state IN ('open', 'filled', 'cancelled', 'expired') AND market_id = 1 AND nonce = 1",
        "SELECT market_id FROM orders WHERE state IN ('open', 'filled', 'cancelled', 'expired') AND market_id BETWEEN 1 AND 2")
        for row in store._all("EXPLAIN QUERY PLAN " + sql)]
    assert all("orders_open" in plan for plan in plans), plans  # by index, never a scan of every order
    store.close()
