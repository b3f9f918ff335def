"""Group commit without a savepoint per message (LedgerStore.submit_batch, the lean batch).

The lean batch writes a batch's stored outcomes and record entries with one executemany each and
takes no savepoint per message; it is only correct because a rejected message changes nothing but
its outcome row, and because anything unexpected makes the store redo the batch with savepoints.
These tests hold it to that: the same answers and the same state as one message at a time
(property), a resend inside one batch, an unexpected error in one message, and a rejection raised
after a write. Real SQLite files (WAL), no HTTP (the HTTP path is hil_tests/test_ledger_*.py).
"""

from __future__ import annotations

import hashlib

import coincurve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.keystore import DeviceKey
from firmware.market import MarketRules
from firmware.messages import new_fields, sign_message
from host_tools.bench_ledger.store import LedgerStore, Rejection

RULES = MarketRules(slot_seconds=1800, markets_ahead=4, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
NOW_S = 1_800_000_000 - 1_800_000_000 % 1800 + 60
MARKET = NOW_S - 60 + 2 * 1800
KEYS = [DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"batch {i}".encode()).digest())) for i in range(4)]


def store_at(path, credit: int = 10**12) -> LedgerStore:
    store = LedgerStore(path, RULES, 3600, ledger_id="batch", max_open_orders=1000)
    for i, key in enumerate(KEYS):
        store.register_device(key.public_key.hex(), f"d{i}", credit, NOW_S * 1000, sell_capacity_wh=10**6)
    return store


def item(key: DeviceKey, nonce: int, kind: str, **body):
    fields = new_fields(kind, ledger_id="batch", device_id=key.device_id, nonce=nonce, issued_at=NOW_S, ttl_s=3600, **body)
    message = sign_message(fields, key)
    return fields, message.payload, message.signature


def state(store: LedgerStore) -> dict:
    conn = store._conn  # reading the tables directly: the test compares whole states
    tables = {}
    for table, order in (("messages", "device_id, nonce"), ("orders", "device_id, nonce"), ("trades", "trade_id"),
                         ("devices", "device_id"), ("log_entries", "seq")):
        tables[table] = [tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}")]
    tables["book"] = store.book(MARKET)
    return tables


def outcomes(results) -> list:
    return [(type(r).__name__, str(r)) if isinstance(r, BaseException) else (r.http_status, r.body) for r in results]


message_spec = st.tuples(st.integers(0, len(KEYS) - 1), st.sampled_from(["buy", "sell", "cancel", "resend"]),
                         st.integers(10, 40), st.integers(1, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(message_spec, min_size=1, max_size=40), cut=st.integers(1, 8),
       credit=st.sampled_from([10**12, 3_000_000, 1_000_000]))
def test_a_lean_batch_answers_and_stores_what_one_message_at_a_time_does(tmp_path_factory, specs, cut, credit):
    # a small credit makes buys run out of money inside a batch: the batch's copy of each device's
    # row (LedgerStore._prefetch_devices) must follow the locks its earlier messages took
    nonces = [0] * len(KEYS)
    items, sent = [], []
    for who, what, price, lots in specs:
        key = KEYS[who]
        if what == "resend" and sent:
            items.append(sent[len(sent) // 2])  # the same bytes again, possibly in the same batch
            continue
        nonces[who] += 1
        if what == "cancel":
            it = item(key, nonces[who], "cancel", market_id=MARKET, order_nonce=max(1, nonces[who] - 1))
        else:
            it = item(key, nonces[who], "order", market_id=MARKET, side="buy" if what != "sell" else "sell",
                      energy_wh=100 * lots, price_per_kwh_minor=price * 100)
        items.append(it)
        sent.append(it)
    base = tmp_path_factory.mktemp("batch")
    one = store_at(base / "one.sqlite3", credit)
    many = store_at(base / "many.sqlite3", credit)
    try:
        singles = [one.submit_batch([it], NOW_S * 1000)[0] for it in items]
        batched = []
        for start in range(0, len(items), cut):
            batched += many.submit_batch(items[start:start + cut], NOW_S * 1000)
        assert outcomes(batched) == outcomes(singles)
        assert state(many) == state(one)
        assert many.record_completeness() == []
    finally:
        one.close()
        many.close()


def test_a_resend_in_the_same_batch_gets_the_stored_answer_and_a_reused_nonce_a_conflict(tmp_path):
    store = store_at(tmp_path / "l.sqlite3")
    first = item(KEYS[0], 1, "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    other = item(KEYS[0], 1, "order", market_id=MARKET, side="sell", energy_wh=200, price_per_kwh_minor=2000)
    a, b, c = store.submit_batch([first, first, other], NOW_S * 1000)
    assert a.http_status == 200 and a.body["duplicate"] is False
    assert b.http_status == 200 and b.body == {**a.body, "duplicate": True}
    assert c.body["code"] == "nonce_conflict"
    assert store.stats()["orders"] == 1 and store.stats()["messages"] == 1
    store.close()


def test_an_unexpected_error_in_one_message_undoes_that_message_alone(tmp_path, monkeypatch):
    store = store_at(tmp_path / "l.sqlite3")
    sell = item(KEYS[0], 1, "order", market_id=MARKET, side="sell", energy_wh=100, price_per_kwh_minor=2000)
    bad = item(KEYS[1], 1, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2500)
    buy = item(KEYS[2], 1, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2100)
    apply_order = type(store)._apply_order

    def failing(self, fields, now_ms):
        result = apply_order(self, fields, now_ms)  # its writes happen, then it fails: they must be undone
        if fields["device_id"] == KEYS[1].device_id:
            raise RuntimeError("disk on fire")
        return result

    monkeypatch.setattr(type(store), "_apply_order", failing)
    results = store.submit_batch([sell, bad, buy], NOW_S * 1000)
    assert isinstance(results[1], RuntimeError)
    assert results[0].http_status == 200
    assert results[2].http_status == 200 and len(results[2].body["result"]["trades"]) == 1  # it met the sell, not `bad`
    assert store.device_orders(KEYS[1].device_id, None) == []
    account = store.account(KEYS[1].device_id)
    assert account["locked_milli_minor"] == 0 and account["max_nonce"] == 0  # nothing of it stored: a resend applies it
    assert store.record_completeness() == []
    monkeypatch.setattr(type(store), "_apply_order", apply_order)
    again = store.submit_batch([bad], NOW_S * 1000)[0]
    assert again.http_status == 200 and again.body["duplicate"] is False
    assert store.book(MARKET) == LedgerStore(tmp_path / "l.sqlite3", RULES, 3600, ledger_id="batch").book(MARKET)
    store.close()


def test_a_rejection_raised_after_a_write_is_undone_by_a_savepoint(tmp_path, monkeypatch):
    """Every rule is checked before the first write today; should one ever be checked after a
    write, the lean batch must not keep that write (it redoes the batch with savepoints)."""
    store = store_at(tmp_path / "l.sqlite3")
    ok = item(KEYS[0], 1, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2000)
    late = item(KEYS[1], 1, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2000)
    adjust = type(store)._adjust

    def adjust_then_refuse(self, device_id, balance_delta=0, locked_delta=0):
        adjust(self, device_id, balance_delta, locked_delta)
        if device_id == KEYS[1].device_id:
            raise Rejection("insufficient_funds", "refused after the lock was written")

    monkeypatch.setattr(type(store), "_adjust", adjust_then_refuse)
    first, second = store.submit_batch([ok, late], NOW_S * 1000)
    assert first.http_status == 200
    assert second.body["code"] == "insufficient_funds"
    assert store.account(KEYS[1].device_id)["locked_milli_minor"] == 0  # the lock written before the refusal is gone
    assert store.account(KEYS[0].device_id)["locked_milli_minor"] == 100 * 2000
    assert store.account(KEYS[1].device_id)["max_nonce"] == 1  # the refusal is stored (a resend gets it again)
    assert store.record_completeness() == []
    store.close()


def test_two_buys_of_one_device_in_one_batch_share_its_balance(tmp_path):
    """Each buy alone is affordable, both together are not: in one lean batch the second is
    refused insufficient_funds, exactly as when they come one at a time (the batch's copy of the
    device row follows the first buy's lock)."""
    store = store_at(tmp_path / "l.sqlite3", credit=300_000)  # 100 Wh x 2000 locks 200,000
    first = item(KEYS[0], 1, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2000)
    second = item(KEYS[0], 2, "order", market_id=MARKET, side="buy", energy_wh=100, price_per_kwh_minor=2000)
    a, b = store.submit_batch([first, second], NOW_S * 1000)
    assert a.http_status == 200 and b.http_status == 422 and b.body["code"] == "insufficient_funds"
    assert store.account(KEYS[0].device_id)["balance_milli_minor"] == 100_000
    store.close()
