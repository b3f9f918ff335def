"""The real daemons against bench houses whose interchange meter counts only the net (issue 7 m).

A real bidirectional interchange meter sees only the net flow: an export and an import running
at the same time cancel on its registers. ``net_only = true`` on the interchange [[meter]] makes
the bench house count so (host_tools/emulators/bench_house.py NetInterchange) and the daemon
allocate on the net (firmware/slot_metering.py). Nothing is mocked: bench houses, `dgc run`
daemons and the bench ledger over real HTTP, 12-s slots (hil_tests/daemons.py). The verdict
compares what each board reported with what its router says it moved (the router's own END
lines in the bench log).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from host_tools.neighbourhood import Neighbourhood

from .daemons import SHORT_CADENCE, SHORT_MARKET, assert_no_crash, journal, seller_and_buyer
from .test_daemon import ROUTER_TOLERANCE_WH, router_log

pytestmark = pytest.mark.rig_features("house-emulator")

TRADING_SLOTS = 4


def test_net_only_interchange_meters_report_what_the_routers_moved(tmp_path: Path) -> None:
    slot_s = SHORT_MARKET["slot_seconds"]
    hood = Neighbourhood(tmp_path / "hood", seller_and_buyer(), market_overrides=SHORT_MARKET,
                         cadence_overrides=SHORT_CADENCE, last_market_slots=TRADING_SLOTS + 4,
                         ledger_args=["--report-deadline-seconds", "600"],
                         meter_overrides={"interchange": {"net_only": True}})
    with hood:
        hood.start()
        for house in hood.houses.values():
            # the bench house really nets: its ready line says which interchange it emulates
            assert any("bench house ready" in line and "interchange=net" in line for line in house.emulator.lines), \
                house.emulator.lines[-5:]
            assert "net_only = true" in house.config_path.read_text()
        end_of_day = hood.last_market + slot_s

        def day_settled() -> bool:
            stats = hood.stats()
            return time.time() > end_of_day + 2 and stats["trades"] > 0 and stats["settled_trades"] == stats["trades"]

        assert hood.wait_until(day_settled, timeout_s=end_of_day - time.time() + 4 * slot_s, poll_s=0.5), hood.stats()
        for house in hood.houses.values():
            assert_no_crash(house)
        for house in hood.houses.values():
            assert house.daemon.stop() == 0

        ledger = sqlite3.connect(hood.workdir / "ledger.sqlite3", timeout=10)
        ledger.row_factory = sqlite3.Row
        try:
            trades = {r["trade_id"]: dict(r) for r in ledger.execute("SELECT * FROM trades")}
            reports = {(r["trade_id"], r["role"]): dict(r) for r in ledger.execute("SELECT * FROM delivery_reports")}
        finally:
            ledger.close()
        assert trades, "no trade in the market day"
        moved = {name: router_log(house)[1] for name, house in hood.houses.items()}
        mismatches, delivered = [], 0
        for trade_id, trade in sorted(trades.items()):
            for role in ("seller", "buyer"):
                report = reports.get((trade_id, role))
                assert report is not None, f"trade {trade_id}: no {role} report"
                router_wh = moved[role].get(trade_id, 0.0)
                if abs(report["energy_wh"] - router_wh) > ROUTER_TOLERANCE_WH:
                    mismatches.append(f"trade {trade_id}: {role} reported {report['energy_wh']} Wh "
                                      f"({report['status']}), its router moved {router_wh:.3f} Wh")
                delivered += report["status"] == "delivered"
        print(f"net-only meters: trades={len(trades)} delivered_reports={delivered} "
              f"moved={ {k: round(sum(v.values()), 1) for k, v in moved.items()} }")
        assert not mismatches, "\n".join(mismatches)
        assert delivered > 0, "no report said delivered: the net-metered path was not exercised"
        for house in hood.houses.values():
            db = journal(house)
            try:
                states = {r["trade_id"]: r["state"] for r in db.execute("SELECT trade_id, state FROM deliveries")}
            finally:
                db.close()
            assert set(states.values()) <= {"reported"}, states
