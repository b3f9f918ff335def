"""The status service's health check (issue 7 part 4): what makes the daemon unhealthy (so the
systemd watchdog restarts it) and what does not (a dead ledger or a silent meter: a restart would
not fix them). Pure: JobMonitor with injected clocks; StatusService over a real journal file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.config import load_config
from firmware.journal import Journal
from firmware.scheduler.status import (
    EDGE_GRACE_SECONDS,
    MEASURE_OVERDUE_EXTRA_SECONDS,
    MEASURE_OVERDUE_PERIODS,
    JobMonitor,
    StatusService,
    format_status,
    status_line,
)

REPO = Path(__file__).resolve().parents[1]
SLOT = 30
MEASURE = 2
T0 = 1_800_000_000.0  # a slot edge


class Clocks:
    def __init__(self, wall: float = T0 + 1, mono: float = 1000.0):
        self.wall, self.mono = wall, mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def monitor(clocks: Clocks) -> JobMonitor:
    return JobMonitor(clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def run_job(m: JobMonitor, job: str, clocks: Clocks, *, takes: float = 0.0, fail: bool = False) -> None:
    def body():
        clocks.advance(takes)
        if fail:
            raise RuntimeError("meter exploded")

    try:
        m.wrap(job, body)()
    except RuntimeError:
        pass


def problems(m: JobMonitor) -> list[str]:
    return m.problems(slot_seconds=SLOT, measure_seconds=MEASURE)


def test_a_fresh_daemon_is_healthy():
    clocks = Clocks()
    m = monitor(clocks)
    m.wrap("measure", lambda: None)
    m.wrap("slot_edge", lambda: None)
    assert problems(m) == []


def test_measure_overdue_makes_it_unhealthy_exactly_after_the_limit():
    clocks = Clocks()
    m = monitor(clocks)
    run_job(m, "measure", clocks)
    limit = MEASURE_OVERDUE_PERIODS * MEASURE + MEASURE_OVERDUE_EXTRA_SECONDS
    clocks.advance(limit)
    assert not [p for p in problems(m) if "measure" in p]
    clocks.advance(0.5)
    assert [p for p in problems(m) if p.startswith("measure job overdue")]
    run_job(m, "measure", clocks)  # the pool runs again: healthy again
    assert not [p for p in problems(m) if "measure" in p]


def test_a_failing_measure_job_still_counts_as_running():
    """A meter that throws is the world's fault, not the daemon's: the job finished, so no restart."""
    clocks = Clocks()
    m = monitor(clocks)
    for _ in range(20):
        run_job(m, "measure", clocks, fail=True)
        clocks.advance(MEASURE)
    assert problems(m) == []
    assert m.snapshot()["measure"]["errors"] == 20 and "meter exploded" in m.snapshot()["measure"]["last_error"]


def test_a_missed_slot_edge_is_unhealthy():
    clocks = Clocks(wall=T0 + 1)
    m = monitor(clocks)
    m.wrap("slot_edge", lambda: None)
    clocks.advance(SLOT + EDGE_GRACE_SECONDS + 1)  # the edge at T0 + 30 passed, no run
    assert any("missed the slot edge" in p for p in problems(m))


def test_a_late_slot_edge_is_unhealthy_and_an_on_time_one_is_not():
    clocks = Clocks(wall=T0 + 1)
    m = monitor(clocks)
    clocks.advance(SLOT - 1)  # at the edge T0 + 30
    run_job(m, "slot_edge", clocks)
    clocks.advance(EDGE_GRACE_SECONDS + 1)
    assert problems(m) == []
    clocks.wall = T0 + 2 * SLOT + EDGE_GRACE_SECONDS + 2  # the next edge, run 12 s late
    clocks.mono += SLOT
    run_job(m, "slot_edge", clocks)
    assert any("after the slot edge" in p for p in problems(m))


def test_a_slot_edge_job_stuck_for_half_a_slot_is_unhealthy():
    clocks = Clocks()
    m = monitor(clocks)
    seen = []

    def stuck():
        clocks.advance(SLOT / 2 + 1)
        seen.extend(problems(m))

    m.wrap("slot_edge", stuck)()
    assert any("slot_edge job running for" in p for p in seen)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.1, max_value=MEASURE * 2.0), min_size=1, max_size=50))
def test_measure_runs_at_most_the_limit_apart_never_make_it_unhealthy(gaps):
    clocks = Clocks()
    m = monitor(clocks)
    for gap in gaps:
        run_job(m, "measure", clocks)
        clocks.advance(gap)
        assert not [p for p in problems(m) if "measure" in p]


# --- StatusService over a real journal: the journal's writability and what is NOT unhealthy ----


class Controller:
    """What StatusService reads: config, health, journal, key (a real journal on a temp file)."""

    def __init__(self, tmp_path: Path):
        from firmware.scheduler.context import Health

        self.config = load_config(REPO / "board_configs" / "sim.toml")
        self.journal = Journal(tmp_path / "journal.sqlite3")
        self.health = Health()

        class Key:
            device_id = "d" * 40

        self.key = Key()


@pytest.fixture
def controller(tmp_path):
    c = Controller(tmp_path)
    yield c
    try:
        c.journal.close()
    except Exception:
        pass


def test_a_dead_ledger_and_silent_meters_are_reported_but_healthy(controller):
    controller.health.ledger_reachable = False
    controller.health.ledger_down_since_ms = int(T0 * 1000)
    controller.health.ledger_detail = "connection refused"
    controller.health.meters_ok = {"house": False, "interchange": False}
    service = StatusService(controller, JobMonitor())
    verdict = service.check_health()
    assert verdict.healthy and verdict.problems == []
    status = service.status()
    assert status["healthy"] and status["ledger"]["reachable"] is False
    assert "ledger unreachable since" in status_line(status)
    assert any("connection refused" in line for line in format_status(status))


def test_a_journal_that_cannot_commit_is_unhealthy(controller):
    service = StatusService(controller, JobMonitor())
    assert service.check_health().healthy

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    controller.journal.check_writable = refuse
    verdict = service.check_health()
    assert not verdict.healthy
    assert verdict.problems == ["journal not writable: OperationalError: attempt to write a readonly database"]
    assert status_line(service.status()).startswith("UNHEALTHY (journal not writable")


def test_a_refused_device_is_in_the_status_line_and_stays_healthy(controller):
    controller.health.ledger_refusal = "revoked: device was revoked by the operator"
    service = StatusService(controller, JobMonitor())
    assert service.check_health().healthy
    line = status_line(service.status())
    assert "REFUSES THIS DEVICE (revoked" in line


def test_the_status_page_says_whether_the_ledger_authority_is_pinned(controller):
    """An operator sees the pin (a public key, shortened) or its absence, and what the absence does."""
    import dataclasses

    key = "02" + "ab" * 31 + "cd"
    service = StatusService(controller, JobMonitor())
    lines = format_status(service.status())
    assert any(line.startswith("record authority NOT pinned: this sim board trades without checking") for line in lines)

    cfg = controller.config
    controller.config = dataclasses.replace(cfg, board=dataclasses.replace(cfg.board, kind="rpi4-sdm630"))
    lines = format_status(service.status())
    assert any(line.startswith("record authority NOT pinned: every trade is refused and no order is signed")
               for line in lines)

    controller.config = dataclasses.replace(cfg, ledger=dataclasses.replace(cfg.ledger, authority_public_key=key))
    status = service.status()
    assert status["ledger"]["authority_public_key"] == key
    assert f"record authority pinned: {key[:10]}...{key[-6:]} (a trade moves energy only once proven in its signed record)" \
        in format_status(status)
