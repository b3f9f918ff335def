"""The simulated peripherals behave as the protocol and physics say (they are the yardstick the
invariants measure the firmware with, so they get tests of their own)."""

from __future__ import annotations

import pytest

from firmware.drivers.dgr import DgrLinkError, DgrNak
from firmware.journal import Journal
from host_tools.sim.devices import (KillableConnection, KillHooks, RouterFaults, SimDgrClient, SimRouter,
                                    SimulatedKill)


class Observer:
    def __init__(self):
        self.started = []

    def transfer_started(self, router, tr, now):
        self.started.append((tr.trade_id, now))

    def start_refused(self, router, mode, now):
        pass


def make(faults=None, hb=120.0):
    clock = {"t": 1000.0}
    router = SimRouter("r", heartbeat_timeout_s=hb, max_power_w=10_000, max_transfers=4, faults=faults or RouterFaults(),
                       slot_seconds=1800, observer=Observer())

    def sync():
        router.advance(clock["t"])
        return clock["t"]

    def delay(s):
        clock["t"] += s

    client = SimDgrClient(router, session="0000abcd", retries=2, timeout_s=0.5, world_sync=sync, world_delay=delay,
                          hooks=KillHooks())
    return router, client, clock


def test_a_transfer_moves_its_energy_at_the_commanded_power_and_stops_at_its_target():
    router, client, clock = make(hb=10_000.0)
    client.start_transfer(7, "export", 1000, 4600, 500)
    clock["t"] = 1000 + 900  # half an hour at 1 kW would be 250 Wh at 900 s
    client.heartbeat()
    assert router.moved_by_trade[7] == pytest.approx(250.0)
    clock["t"] = 1000 + 3000
    client.heartbeat()
    assert router.moved_by_trade[7] == pytest.approx(500.0)  # target reached at 1800 s, then stopped
    assert 7 not in router.transfers
    assert client.transfer_end(7).args["reason"] == "target"
    assert sum(router.moved_by_slot.values()) == pytest.approx(500.0)


def test_energy_is_attributed_to_the_slot_it_moved_in():
    router, client, clock = make(hb=10_000.0)
    clock["t"] = 1800 - 100.0
    client.start_transfer(1, "import", 3600, 1800 + 3600, 1000)
    clock["t"] = 1800 + 100.0
    client.heartbeat()
    assert router.moved_by_slot[(0, "import")] == pytest.approx(100.0)
    assert router.moved_by_slot[(1800, "import")] == pytest.approx(100.0)


def test_the_watchdog_makes_the_router_safe_when_frames_stop():
    faults = RouterFaults(link_down=[(1010.0, 5000.0)])
    router, client, clock = make(faults, hb=120.0)
    client.start_transfer(3, "export", 1000, 4600, 900)
    clock["t"] = 1011.0
    with pytest.raises(DgrLinkError):
        client.heartbeat()
    clock["t"] = 1200.0
    router.advance(clock["t"])
    assert router.mode() == "safe" and not router.transfers
    assert router.moved_by_trade[3] == pytest.approx(1000 * 120 / 3600, rel=0.02)  # stopped at the watchdog


def test_a_lost_reply_is_not_executed_twice_and_a_safe_router_refuses_start():
    router, client, clock = make()
    router.pending_drop_reply = 1  # the START runs, its answer is lost, the driver resends the same frame
    client.start_transfer(5, "export", 1000, 4600, 100)
    assert [trade for trade, _ in router.observer.started] == [5]  # once, though an answer was lost
    client.safe_state()
    with pytest.raises(DgrNak) as refused:
        client.start_transfer(6, "export", 1000, 4600, 100)
    assert refused.value.code == 31


def test_a_kill_before_commit_rolls_the_transaction_back_and_after_commit_keeps_it(tmp_path):
    for phase, expected in (("before", 0), ("after", 1)):
        path = tmp_path / f"{phase}.sqlite3"
        journal = Journal(path, clock_ms=lambda: 1)
        raw = journal._db
        journal._db = KillableConnection(raw, KillHooks({1: phase}))
        with pytest.raises(SimulatedKill):
            journal.add_reading("house", 1000, 1, 2, 3)
        raw.close()  # the process died
        again = Journal(path, clock_ms=lambda: 1)
        assert len(again.readings("house", 0)) == expected
        again.close()
