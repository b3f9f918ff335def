"""The board on the rig: the real `dgc run` daemon brought up by the rig's strategy against the
rig's own devices and ledger, so these daemon tests run unchanged on the emulators and on a real
bench (``--rig my-bench.toml``: the bench PC runs the DGC against the bench's meters and router).

Nothing is mocked: on the default rig the meters and the router are the CPython emulators on
socat ptys, on a bench the real devices; the ledger is a bench ledger on 127.0.0.1 the rig starts.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from hil_tests.rig.strategies import StrategyError

from .daemons import SHORT_CADENCE, SHORT_MARKET

pytestmark = pytest.mark.daemon


def test_the_board_strategy_walks_off_flashed_provisioned_trading_and_back(hil_rig):
    """``transition("trading")`` takes the board through every state in order, each step checked
    (the config accepted, the device registered at the ledger, the daemon up with its meters
    read); going back to "provisioned" stops the daemon cleanly on the way; an unknown state
    is refused naming the states there are. Back up again, the board is the same device (key, journal)."""
    hil_rig.configure(market=SHORT_MARKET, cadence=SHORT_CADENCE)
    board = hil_rig.board()
    board.transition("trading")
    assert [state for state, *_ in board.history] == ["off", "flashed", "provisioned", "trading"]
    assert board.state == "trading" and board.daemon.running
    device = requests.get(f"{hil_rig.ledger_url()}/v1/devices/{board.device_id}", timeout=5,
                          headers={"Authorization": f"Bearer {hil_rig.operator_token()}"})
    assert device.status_code == 200, device.text
    board.wait_for_line(r"DGR \S+ \(fw [^)]*, protocol 1\) session [0-9a-f]{8}", timeout_s=15)  # the router's HELLO
    pid = board.daemon.process.pid
    board.transition("provisioned")
    assert board.state == "provisioned" and board.daemon is None
    assert [state for state, *_ in board.history][-3:] == ["off", "flashed", "provisioned"]
    with pytest.raises(StrategyError, match=r"unknown state 'booted'; expected one of off, flashed, provisioned, trading"):
        board.transition("booted")
    board.transition("trading")  # the same key and journal: the board comes back as itself
    assert board.daemon.process.pid != pid
    status = json.loads(board.status_json())
    assert status["device_id"] == board.device_id and set(status["meters"]) == {m.name for m in hil_rig.meter_bus().meters}


def test_clock_skew_stops_bidding_with_an_alarm(hil_rig):
    """A ledger whose clock is 10 s ahead of the board's (bound 2 s): the daemon raises
    alarm.clock and places no order at all, through the slot of history it needs before a
    first bid and a whole slot (a bid round, two reviews) after it (12-s slots)."""
    hil_rig.configure(market=SHORT_MARKET, cadence=SHORT_CADENCE, ledger_args=["--clock-offset-ms", "10000"])
    board = hil_rig.board()
    board.transition("trading")
    board.wait_for_line(r"alarm\.clock skew_ms=(9\d{3}|10\d{3})", timeout_s=20)
    slot_s = SHORT_MARKET["slot_seconds"]
    first_complete_slot_end = (int(time.time()) // slot_s + 2) * slot_s
    board.wait_for_line(r"bid\.skipped reason=\"(clock skew|skew -?\d+ ms)", timeout_s=2 * slot_s)  # the wording varies
    # one bid round (bid_seconds = slot) and two reviews (every 5 s) after bidding could start
    time.sleep(max(0.0, first_complete_slot_end - time.time()) + slot_s)
    stats = requests.get(f"{hil_rig.ledger_url()}/v1/stats", timeout=5).json()
    assert stats["orders"] == 0, stats
    assert not any(" order.signed" in line for line in board.daemon.lines)
