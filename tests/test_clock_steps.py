"""A board clock that steps between two clock-guard checks (sim findings F2, F5, F3b).

The guard measures the skew only every ``clock_check_seconds``; an NTP step (or a Pi without an
RTC) in between used to go unnoticed until the next check, and every job meanwhile acted on the
wrong time: a transfer started 10 minutes early (F2), a running slot looked ended and was
metered and STOPped mid-slot (F5), readings stamped 10 minutes in the future poisoned the
timeline once the clock was corrected (F3b). Every job now compares the board's clock with the
monotonic clock first and fails closed until the next successful check.

The world (tests/delivery_world.py) is the real Controller and Journal; only the board's clock is
offset from the true time the router, the meters' physics and the ledger run on.
"""

from __future__ import annotations

import dataclasses

from tests.delivery_world import SLOT_S, T0, Meters, Trade, World

M = T0
N = T0 + SLOT_S


class SteppedMeters(Meters):
    """The meters stamp a reading with the board's clock, as the real driver does."""

    board_offset_s: float = 0.0

    def read(self, name):
        reading = super().read(name)
        return dataclasses.replace(reading, taken_at_ms=reading.taken_at_ms + int(self.board_offset_s * 1000))


def _board_clock(w: World):
    return lambda: w.clock[0] + w.offset[0]


def make_world(tmp_path) -> World:
    """A World whose board clock is true time + w.offset[0]; ctx.monotonic runs on true time."""
    w = World(tmp_path)
    w.offset = [0.0]
    meters = SteppedMeters(w.clock, w.router)
    w.meters = meters
    w._build_plain = w._build

    def build():
        c = w._build_plain()
        c.ctx.clock = _board_clock(w)
        c.ctx.meters = meters
        c.journal._clock_ms = lambda: int(_board_clock(w)() * 1000)
        c.ctx.monotonic = lambda: w.clock[0] + 1_000.0  # an arbitrary origin
        return c

    w._build = build
    w.controller = build()
    w.controller.check_clock()
    assert w.controller.health.clock_ok
    return w


def step(w: World, seconds: float) -> None:
    w.offset[0] += seconds
    w.meters.board_offset_s = w.offset[0]


def test_a_forward_step_before_the_slot_never_starts_the_transfer_early(tmp_path):
    """F2 (seeds 206, 347): +600 s between checks made the next slot look begun, so its START
    went out 380-420 s before the slot (energy counted in the slot before)."""
    w = make_world(tmp_path)
    w.trades(Trade(1, N, "sell", 100))
    w.run_until(M + 10)
    step(w, SLOT_S)  # the board now believes slot N has begun
    w.run_until(M + 20)
    assert w.router.starts == []
    assert any("clock stepped" in e for e in w.events("alarm.clock"))


def test_a_forward_step_mid_slot_neither_meters_nor_stops_the_running_transfer(tmp_path):
    """F5 (seeds 163, 1151): by a clock 600 s ahead the running slot looked ended: the
    transfer was metered and STOPped mid-slot and the report refused not_yet_valid."""
    w = make_world(tmp_path)
    w.trades(Trade(1, M, "sell", 100))
    w.run_until(M + 10)
    assert w.router.starts == [1]
    step(w, SLOT_S)
    w.run_until(M + 30)
    assert 1 not in w.router.ended or w.router.ended[1][0] != "stop", w.router.ended
    assert w.journal.delivery(1).state == "running"
    assert w.ledger.reports() == {}


def test_readings_are_not_stamped_by_a_stepped_clock(tmp_path):
    """F3b: readings journalled with stamps 600 s in the future sat after every later good one,
    so once NTP corrected the clock each new reading was 'before the last good one' and the
    slot's edge was bracketed by the future-stamped ones (an under-report)."""
    w = make_world(tmp_path)
    w.run_until(M + 10)
    step(w, SLOT_S)
    w.run_until(M + 20)
    true_ms = int(w.clock[0] * 1000)
    stamps = [ms for (ms,) in w.journal._db.execute("SELECT taken_at_ms FROM readings")]
    assert stamps and max(stamps) <= true_ms, max(stamps) - true_ms
