"""Group commit keeps exactly-once (issue 10 part 5), against the real ledger process over HTTP:
many devices send concurrently, every message twice on two connections at once, and the ledger
is killed with SIGKILL in the middle. After a restart every message is resent: each was applied
once, every answer given before the kill survived it, the in-memory books agree with the
database, and the signed record is complete (`dgc-host ledger verify --db`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from firmware.keystore import load_key_file
from firmware.messages import new_fields, sign_message

from .test_ledger_http import REPO, make_key

LISTENING = re.compile(r"ledger listening on http://127\.0\.0\.1:(\d+)")
TOKEN = "group-commit-token"


def start(db: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "ledger", "serve", "--db", str(db), "--port", "0", "--ledger-id", "gc",
         "--slot-seconds", "1800", "--markets-ahead", "48", "--lot-wh", "100", "--gate-closure-seconds", "900",
         "--price-min-per-kwh-minor", "1000", "--price-max-per-kwh-minor", "4000", "--client-rate", "0",
         "--device-rate", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "DGC_LEDGER_OPERATOR_TOKEN": TOKEN})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = LISTENING.search(line or "")
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the ledger did not start")


def request(method: str, path: str, body=None, token: str | None = None) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(data)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def exchange(port: int, raws: list[bytes], answers: list, stop_after: float | None = None) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        for raw in raws:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            answers.append((int(head[9:12]), json.loads(await reader.readexactly(length))))
    except (OSError, asyncio.IncompleteReadError):
        pass  # the ledger was killed under us
    finally:
        writer.close()


def test_group_commit_is_exactly_once_through_a_sigkill(tmp_path):
    db = tmp_path / "ledger.sqlite3"
    keys = [make_key(500 + i) for i in range(24)]
    now = int(time.time())
    market = (now // 1800 + 2) * 1800
    wires = {}
    for i, key in enumerate(keys):
        for n in range(1, 16):
            side = "sell" if i % 2 else "buy"
            price = 2000 + (n % 5) * 10 if side == "sell" else 1990 + (n % 7) * 10
            fields = new_fields("order", ledger_id="gc", device_id=key.device_id, nonce=n, issued_at=now, ttl_s=3600,
                                market_id=market, side=side, energy_wh=100, price_per_kwh_minor=price)
            wires[(key.device_id, n)] = sign_message(fields, key).to_wire()
    proc, port = start(db)
    try:
        regs = [request("POST", "/v1/devices", {"public_key": k.public_key.hex(), "name": "k"}, TOKEN) for k in keys]
        answers: list = []
        asyncio.run(exchange(port, regs, answers))
        assert all(status == 200 for status, _ in answers)

        before_kill: list = []

        async def flood() -> None:
            per_key = [[request("POST", "/v1/messages", wires[(k.device_id, n)]) for n in range(1, 16)] for k in keys]
            tasks = [exchange(port, raws, before_kill) for raws in per_key] * 2  # every message twice, concurrently
            runner = asyncio.gather(*tasks)
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGKILL)  # mid-flood: some batches committed, some not
            await runner

        asyncio.run(flood())
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    acknowledged = {(b["nonce"], json.dumps(b.get("result"), sort_keys=True)) for status, b in before_kill if status == 200}

    proc, port = start(db)  # books rebuilt from SQLite; now every message again
    try:
        after: list = []

        async def resend() -> None:
            await asyncio.gather(*(exchange(port, [request("POST", "/v1/messages", wires[(k.device_id, n)]) for n in range(1, 16)], after)
                                   for k in keys))

        asyncio.run(resend())
        assert len(after) == len(wires) and all(status == 200 for status, _ in after), [a for a in after if a[0] != 200][:3]
        book = []
        asyncio.run(exchange(port, [request("GET", f"/v1/markets/{market}/book")], book))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT device_id || ':' || nonce) FROM messages").fetchone() == (len(wires),) * 2
        assert conn.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == len(wires)  # each applied once
        stored = {(r[0], r[1]) for r in conn.execute("SELECT device_id, nonce FROM messages WHERE http_status = 200")}
        open_wh = conn.execute("SELECT COALESCE(SUM(remaining_wh), 0) FROM orders WHERE state = 'open'").fetchone()[0]
        sold = conn.execute("SELECT COALESCE(SUM(energy_wh), 0) FROM trades").fetchone()[0]
    assert len(stored) == len(wires)
    # what was answered before the kill was durable and is answered the same way now (as a duplicate)
    resent = {(b["nonce"], json.dumps(b.get("result"), sort_keys=True)) for _, b in after}
    assert acknowledged <= resent
    assert acknowledged and sum(b["duplicate"] for _, b in after) >= len(acknowledged)  # committed before: duplicates now
    # the in-memory book (rebuilt at start, then changed by the resends) agrees with the database
    levels = book[0][1]
    assert sum(lv["remaining_wh"] for lv in levels["asks"] + levels["bids"]) == open_wh
    assert open_wh + 2 * sold == 100 * len(wires)  # every Wh offered is resting or was traded (both sides)
    authority = load_key_file(db.parent / "authority.key").public_key.hex()
    r = subprocess.run([sys.executable, "-m", "host_tools.cli", "ledger", "verify", "--db", str(db), "--authority-key", authority],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith(" ok"), r.stdout + r.stderr
