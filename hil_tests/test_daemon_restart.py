"""The real `dgc run` daemon restarted while its ledger hangs: the router must not notice.

Found by the EVM SIGKILL test (hil_tests/test_daemon_evm.py) on a loaded machine: a restarted
seller resent its 34 pending messages, one per 1-s block, before its scheduler started, so for
34 s nothing fed the router's heartbeat watchdog. The router went safe, cut the running transfer
at 122 of 200 Wh, and the next slots' deliveries were missed. A ledger that hangs (a stalled
uplink: connections accepted, nothing answered) does the same on REST, each call waiting for
the board's ledger timeout. This test makes that happen on purpose: the bench ledger is stopped
with SIGSTOP (the kernel still accepts its connections) and the seller's daemon is SIGKILLed
and restarted mid-transfer. Nothing is mocked; the verdict is the router emulator's own record
of why the transfer ended.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from host_tools.neighbourhood import Neighbourhood

from .daemons import SHORT_CADENCE, SHORT_MARKET, assert_no_crash, seller_and_buyer, wait_for_delivery_with_room, wait_for_line

pytestmark = pytest.mark.rig_features("house-emulator")

# Long enough that the start-up's ledger calls (the account, the clock, the first message)
# outlast the router's watchdog (3 heartbeats of 2 s on the bench) several times over.
HUNG_LEDGER_TIMEOUT_MS = 8000


def test_a_restart_while_the_ledger_hangs_keeps_the_routers_transfer_running(tmp_path: Path) -> None:
    hood = Neighbourhood(tmp_path / "hood", seller_and_buyer(), market_overrides=SHORT_MARKET,
                         cadence_overrides=SHORT_CADENCE,
                         config_overrides={"ledger": {"timeout_ms": HUNG_LEDGER_TIMEOUT_MS}})
    with hood:
        hood.start()
        # Room for a kill, a restart (FIRST_FRAME_BOUND_S) and a watchdog timeout before the
        # transfer would end by itself.
        trade_id, market_id, status = wait_for_delivery_with_room(
            hood, "seller", 4, lambda trade: hood.bench_status("seller")["dgr"])
        hb_timeout_s = status["hb_timeout_ms"] / 1000
        assert any(t["trade_id"] == trade_id for t in status["transfers"]), status

        ledger_pid = hood.ledger.process.pid
        os.kill(ledger_pid, signal.SIGSTOP)
        try:
            hood.kill_daemon("seller")
            restart = threading.Thread(target=hood.start_daemon, args=("seller",), daemon=True)
            restart.start()

            def transfer_ended() -> bool:
                return any(e["trade_id"] == trade_id for e in hood.bench_status("seller")["dgr"]["ended"])

            assert hood.wait_until(transfer_ended, timeout_s=market_id + hood.slot_seconds + 5 - time.time(), poll_s=0.2)
            ended = next(e for e in hood.bench_status("seller")["dgr"]["ended"] if e["trade_id"] == trade_id)
            print(f"trade {trade_id}: ended ({ended['reason']}) after {ended['moved_wh']} of {ended['energy_wh']} Wh; "
                  f"router watchdog {hb_timeout_s} s, ledger stopped since the kill")
            assert ended["reason"] != "heartbeat", \
                f"the router's watchdog cut trade {trade_id} while the restarted daemon waited on the ledger: {ended}"
            assert hood.bench_status("seller")["dgr"]["mode"] != "safe"
        finally:
            os.kill(ledger_pid, signal.SIGCONT)
        restart.join(40)
        assert hood.houses["seller"].daemon.running
        # The ledger is back: the seller's report of that trade reaches it.
        wait_for_line(hood.houses["seller"].daemon, rf" report\.signed nonce=\d+ trade={trade_id} ", timeout_s=30)
        assert_no_crash(hood.houses["seller"])
