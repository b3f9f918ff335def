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


# ----------------------------------------------------------------------------- the message channel
# PipelinedCommitter (writer_process.py) driven directly on an event loop, against a real writer
# process: frames written without waiting for the answer to the one before, several frames in one
# transaction on the writer's side, each answer back to its own message.

def _remote(db) -> RemoteStore:
    from host_tools.bench_ledger.store import LedgerStore

    clock = process_settings(db).clock
    return RemoteStore(lambda: LedgerStore(db, RULES, 600, clock=clock, max_open_orders=10_000, ledger_id=LEDGER_ID))


def _signed(key, nonce: int, **body) -> tuple[dict, bytes, bytes]:
    from firmware.messages import new_fields, sign_message

    fields = new_fields("order", ledger_id=LEDGER_ID, device_id=key.device_id, nonce=nonce, issued_at=T0 + 100, ttl_s=TTL_S,
                        **body)
    message = sign_message(fields, key)
    return dict(fields), message.payload, message.signature


def _energy(i: int, nonce: int) -> int:
    return 100 * (1 + (7 * i + nonce) % 40)  # distinct enough to tell each answer's message apart


def _floods(keys, per_device: int) -> list[tuple[int, int, tuple]]:
    out = []
    for nonce in range(1, per_device + 1):
        for i, key in enumerate(keys):
            out.append((i, nonce, _signed(key, nonce, market_id=MARKET, side="buy", energy_wh=_energy(i, nonce),
                                          price_per_kwh_minor=1000 + i)))
    return out


def test_the_message_channel_answers_each_message_its_own_across_frames(tmp_path):
    import asyncio

    from host_tools.bench_ledger.writer_process import FRAME_MAX_ITEMS, PipelinedCommitter

    remote = _remote(tmp_path / "ledger.sqlite3")
    keys = [make_key(300 + i) for i in range(40)]
    try:
        for i, key in enumerate(keys):
            remote.register_device(key.public_key.hex(), f"d{i}", 10**12, (T0 + 100) * 1000)
        flood = _floods(keys, 15)  # 600 messages: 3 frames in the first turn (256 + 256 + 88)
        closed = _signed(keys[0], 999, market_id=T0, side="buy", energy_wh=100, price_per_kwh_minor=1000)  # gate shut
        committer = PipelinedCommitter(remote)

        async def run():
            await committer.open()
            loop = asyncio.get_running_loop()
            first = [loop.create_task(committer.submit(*item)) for _, _, item in flood]
            await asyncio.sleep(0)  # the tasks run in this turn: their messages go out as frames at its end
            again = [loop.create_task(committer.submit(*item)) for _, _, item in flood[:50]]  # resends, other frames
            refused = loop.create_task(committer.submit(*closed))
            answers = await asyncio.wait_for(asyncio.gather(*first), 60)
            duplicates = await asyncio.wait_for(asyncio.gather(*again), 60)
            refusal = await asyncio.wait_for(refused, 60)
            frames = committer.batches
            await committer.close()
            return answers, duplicates, refusal, frames

        answers, duplicates, refusal, frames = asyncio.run(run())
        assert frames >= 600 // FRAME_MAX_ITEMS + 1
        for (i, nonce, _), outcome in zip(flood, answers):
            body = outcome.body
            assert outcome.http_status == 200 and body["nonce"] == nonce and body["duplicate"] is False, body
            assert body["result"]["energy_wh"] == _energy(i, nonce) and body["result"]["state"] == "open"
        for first, again in zip(answers, duplicates):
            assert again.http_status == 200 and again.body["duplicate"] is True
            assert again.body["result"] == first.body["result"]
        assert refusal.http_status == 422 and refusal.body["code"] == "gate_closed"
        for key in keys:  # each message stored once
            nonces = [m["nonce"] for m in remote.device_messages(key.device_id, 0, 1000)]
            assert sorted(nonces) == (list(range(1, 16)) + ([999] if key is keys[0] else []))
        assert remote.record_completeness() == []
    finally:
        remote.close()


def test_a_writer_killed_under_a_flood_answers_everything_and_a_resend_is_exactly_once(tmp_path):
    import asyncio

    from host_tools.bench_ledger.store import LedgerStore, Outcome
    from host_tools.bench_ledger.writer_process import PipelinedCommitter, WriterGone

    db = tmp_path / "ledger.sqlite3"
    remote = _remote(db)
    keys = [make_key(400 + i) for i in range(30)]
    for i, key in enumerate(keys):
        remote.register_device(key.public_key.hex(), f"d{i}", 10**12, (T0 + 100) * 1000)
    flood = _floods(keys, 40)  # 1,200 messages, 30 per turn
    committer = PipelinedCommitter(remote)

    async def run():
        await committer.open()
        loop = asyncio.get_running_loop()
        tasks, killed = [], False
        for start in range(0, len(flood), 30):
            tasks += [loop.create_task(committer.submit(*item)) for _, _, item in flood[start:start + 30]]
            await asyncio.sleep(0.002)
            if not killed and sum(t.done() for t in tasks) >= 150:
                os.kill(remote.pid, signal.SIGKILL)  # answers given, frames in flight, and more to come
                killed = True
        assert killed
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)  # nothing hangs

    try:
        answers = asyncio.run(run())
    finally:
        remote.close()
    committed = [a for a in answers if isinstance(a, Outcome)]
    assert all(isinstance(a, (Outcome, WriterGone)) for a in answers)
    assert all(a.http_status == 200 for a in committed) and len(committed) >= 150
    assert any(isinstance(a, WriterGone) for a in answers)
    store = LedgerStore(db, RULES, 600, clock=process_settings(db).clock, max_open_orders=10_000, ledger_id=LEDGER_ID)
    try:
        again = store.submit_batch([item for _, _, item in flood])
        for before, after in zip(answers, again):
            assert after.http_status == 200
            if isinstance(before, Outcome):  # answered before the kill: committed, and a resend gets that answer
                assert after.body["duplicate"] is True and after.body["result"] == before.body["result"]
        for key in keys:
            nonces = [m["nonce"] for m in store.device_messages(key.device_id, 0, 1000)]
            assert sorted(nonces) == list(range(1, 41))  # each exactly once
        assert store.record_completeness() == []
    finally:
        store.close()
