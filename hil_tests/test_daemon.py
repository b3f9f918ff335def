"""The real `dgc run` daemon against the bench ledger and a bench house, end to end.

Nothing is mocked: each house is a `dgc-host bench house` process (Modbus RTU meters and the DGR
emulator on socat virtual serial lines), each board a `dgc run` process with its own key and
journal, the ledger a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host_tools.neighbourhood import HouseSpec, Neighbourhood, REPO_ROOT


def seller_and_buyer() -> list[HouseSpec]:
    return [
        HouseSpec("seller", pv_peak_w=4000, battery_capacity_wh=0, load_peak_w=900),
        HouseSpec("buyer", pv_peak_w=0, battery_capacity_wh=0, load_peak_w=2400),
    ]


def journal_messages(house) -> list[tuple[int, str, str, str]]:
    """(nonce, kind, payload, state) of every message the board ever signed."""
    db = sqlite3.connect(house.directory / "state" / "journal.sqlite3")
    try:
        return db.execute("SELECT nonce, kind, payload, state FROM outbox ORDER BY nonce").fetchall()
    finally:
        db.close()


def ledger_messages(hood: Neighbourhood, device_id: str) -> list[dict]:
    return hood.get(f"/v1/devices/{device_id}/messages")["messages"]


def test_sigkilled_daemon_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Kill the seller's daemon with SIGKILL three times at random moments while it trades; after
    each restart it recovers from its journal. At the end, the ledger holds every message each
    board signed exactly once (same bytes), every trade has exactly one report from each side,
    and every trade is settled."""
    rng = random.Random(20261121)
    hood = Neighbourhood(tmp_path / "hood", seller_and_buyer(), last_market_slots=6)
    with hood:
        hood.start()
        end_of_day = hood.last_market + hood.slot_seconds
        kills = 0
        killed = {"seller": 0, "buyer": 0}
        while kills < 3:
            time.sleep(rng.uniform(12, 30))
            victim = rng.choice(["seller", "buyer"]) if kills else "seller"
            hood.kill_daemon(victim)
            kills += 1
            killed[victim] += 1
            time.sleep(rng.uniform(0.2, 2.0))
            hood.start_daemon(victim)
        assert time.time() < end_of_day, "the kills must happen while the market day is running"

        def all_settled() -> bool:
            stats = hood.stats()
            return time.time() > end_of_day + 2 and stats["trades"] > 0 and stats["settled_trades"] == stats["trades"]

        assert hood.wait_until(all_settled, timeout_s=end_of_day - time.time() + 90), hood.stats()
        # Let the outboxes drain what they signed last, then stop the daemons cleanly.
        time.sleep(4)
        for house in hood.houses.values():
            assert house.daemon.stop() == 0

        stats = hood.stats()
        for house in hood.houses.values():
            signed = journal_messages(house)
            assert signed, f"{house.spec.name} signed nothing"
            assert all(state in ("acked", "rejected") for *_, state in signed), f"{house.spec.name} has unsent messages"
            at_ledger = {m["nonce"]: m for m in ledger_messages(hood, house.device_id)}
            # Exactly once: the ledger's record is keyed by nonce, and carries the same bytes.
            assert set(at_ledger) == {nonce for nonce, *_ in signed}
            for nonce, kind, payload, _ in signed:
                assert at_ledger[nonce]["payload_sha256"] == hashlib.sha256(payload.encode()).hexdigest()
                assert at_ledger[nonce]["kind"] == kind
            assert house.daemon_starts == 1 + killed[house.spec.name]

        trades = hood.get(f"/v1/devices/{hood.houses['seller'].device_id}/trades?after=0")["trades"]
        assert len(trades) == stats["trades"] > 0
        for trade in trades:
            detail = hood.get(f"/v1/trades/{trade['trade_id']}")
            roles = sorted(r["role"] for r in detail["reports"])
            assert roles == ["buyer", "seller"], detail
            assert detail["state"] == "settled"
        assert killed["seller"] >= 1


def test_clock_skew_stops_bidding_with_an_alarm(tmp_path: Path) -> None:
    """A ledger whose clock is 10 s ahead of the board's (bound 2 s): the daemon raises
    alarm.clock and places no order at all."""
    hood = Neighbourhood(tmp_path / "hood", seller_and_buyer()[:1], ledger_args=["--clock-offset-ms", "10000"])
    with hood:
        hood.start()
        daemon = hood.houses["seller"].daemon
        daemon.wait_for_line(r"alarm\.clock skew_ms=(9\d{3}|10\d{3})", timeout_s=20)
        # Long enough for a full slot of history and several bid/review rounds.
        time.sleep(hood.slot_seconds * 2)
        assert any("bid.skipped" in line and "clock skew" in line for line in daemon.lines)
        assert hood.stats()["orders"] == 0
        assert not any(" order.signed" in line for line in daemon.lines)


def test_run_with_a_broken_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    text = (REPO_ROOT / "board_configs" / "sim.toml").read_text()
    broken = tmp_path / "board.toml"
    broken.write_text(text.replace("lot_wh = 100", "lot_wh = -5"))
    result = subprocess.run([sys.executable, "-m", "firmware.cli", "run", str(broken)], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(broken) in lines[0] and "[market] lot_wh" in lines[0] and "-5" in lines[0]
