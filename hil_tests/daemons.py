"""What the real-daemon tests share: the two-house neighbourhood, short market slots, waiting
for a daemon's event line, and read-only views of a board's journal and the ledger's database.

Why short slots: every real-daemon test waits for whole market slots (history, gate closure,
delivery, metering, reporting), so the slot length sets the suite's run time. 12-s slots are
the shortest that keep the bench honest with board_configs/sim.toml as it is:

* the meters' plausibility bound (``max_power_w = 2000000`` counter-W) must stay above what the
  bench moves: the bench router's rating scales with 1800 / slot_seconds (10 kW real, so 1.5 MW
  at 12 s; 2.25 MW at 8 s would trip the bound), and the house model's 4 kW PV peak becomes 600 kW;
* a delivery needs ``MIN_START_SECONDS`` (2 s) left in its slot to start, and is sized to finish
  in the first 95 % of it: 12 s leaves room for a restart of a few seconds in between;
* the gate (4 s before delivery) leaves two trade polls (every 2 s) to learn the trade before
  the slot starts, and the measure cadence (2 s) gives six readings per slot;
* the bid cadence follows the slot (one full bid per slot, as on a real board); the review
  (every 5 s, 30 s ahead) keeps working unchanged.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from host_tools.neighbourhood import HouseSpec, ManagedProcess

SHORT_SLOT_SECONDS = 12
SHORT_MARKET = {"slot_seconds": SHORT_SLOT_SECONDS, "gate_closure_seconds": 4}
SHORT_CADENCE = {"bid_seconds": SHORT_SLOT_SECONDS}


def seller_and_buyer() -> list[HouseSpec]:
    """A PV house that sells and a house without PV that buys: every slot has a trade."""
    return [
        HouseSpec("seller", pv_peak_w=4000, battery_capacity_wh=0, load_peak_w=900),
        HouseSpec("buyer", pv_peak_w=0, battery_capacity_wh=0, load_peak_w=2400),
    ]


def wait_for_line(process: ManagedProcess, pattern: str, timeout_s: float, *, after: int = 0) -> re.Match:
    """The first line matching ``pattern`` among the process's lines from index ``after`` on
    (``after = len(process.lines)`` before an action: only what the action caused)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    seen = after
    while True:
        lines = process.lines
        for line in lines[seen:]:
            match = regex.search(line)
            if match:
                return match
        seen = max(seen, len(lines))
        assert process.running, f"{process.name} exited:\n" + "\n".join(process.lines[-20:])
        assert time.monotonic() < deadline, f"{process.name}: no line matching {pattern!r} within {timeout_s} s"
        time.sleep(0.05)


def read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection (the daemon or the ledger may still be writing): rows as dicts."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def journal(house) -> sqlite3.Connection:
    return read_only(house.directory / "state" / "journal.sqlite3")


def journal_messages(house) -> list[sqlite3.Row]:
    """Every message the board ever signed (outbox rows, oldest nonce first)."""
    db = journal(house)
    try:
        return db.execute("SELECT * FROM outbox ORDER BY nonce").fetchall()
    finally:
        db.close()


def assert_no_crash(house) -> None:
    daemon = house.daemon
    assert daemon.running, f"{house.spec.name} daemon died:\n" + "\n".join(daemon.lines[-20:])
    tracebacks = [i for i, line in enumerate(daemon.lines) if "Traceback" in line]
    assert not tracebacks, "\n".join(daemon.lines[tracebacks[0]:tracebacks[0] + 30])


def wait_for_delivery_with_room(hood, house: str, room_s: float, status_of) -> tuple[int, int, dict]:
    """(trade_id, market_id, router status) of the house's first delivery that starts with
    more than the router's watchdog timeout plus ``room_s`` left in its slot, so that a fault
    the test injects can trip the watchdog before the transfer would end by itself (it is sized
    to 95 % of the slot); a start that came late on a loaded machine waits for the next slot.
    ``status_of(trade_id)`` reads the router's status once the delivery has started."""
    daemon = hood.houses[house].daemon
    mark = 0
    while True:
        started = wait_for_line(daemon, r" delivery\.started trade=(\d+) market=(\d+)", timeout_s=8 * hood.slot_seconds,
                                after=mark)
        trade_id, market_id = int(started.group(1)), int(started.group(2))
        mark = len(daemon.lines)
        status = status_of(trade_id)
        if market_id + hood.slot_seconds - time.time() > status["hb_timeout_ms"] / 1000 + room_s:
            return trade_id, market_id, status
