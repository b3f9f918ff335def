"""Issue 10 part 4, the board's side over real HTTP: the daemon's trade poll and outbox (the real
Controller, journal and RestLedger) against the real bench ledger. A trade schedules a delivery
only when its inclusion proof verifies under the pinned authority key; a board pinned to another
key refuses it (journalled, alarmed, no delivery); accepted own messages are checked too.
Nothing is mocked but the meters and the router, which these jobs never use."""

from __future__ import annotations

import dataclasses
import io

import coincurve
import pytest

from firmware.config import load_config
from firmware.journal import Journal
from firmware.scheduler.controller import Controller
from firmware.scheduler.events import EventLog
from host_tools.bench_ledger.server import running_ledger
from tests.test_trading_jobs import Nothing, parse_line
from tests.trading_helpers import place_order

from .test_ledger_http import LEDGER_ID, MARKET, REPO, T0, Bench, Clock, accepted, make_key, settings_for
from .test_ledger_record import AUTHORITY, board as rest_board


@pytest.fixture
def bench(tmp_path):
    clock = Clock((T0 + 100) * 1000)
    with running_ledger(settings_for(tmp_path / "ledger.sqlite3", clock, authority_key=AUTHORITY)) as running:
        yield Bench(running.url, clock, running.app)


def buyer_board(bench: Bench, tmp_path, key, pinned_hex: str):
    config = load_config(REPO / "board_configs" / "sim.toml")
    config = dataclasses.replace(config, ledger=dataclasses.replace(config.ledger, ledger_id=LEDGER_ID,
                                                                    authority_public_key=pinned_hex))
    log = io.StringIO()
    journal = Journal(tmp_path / "journal.sqlite3", clock_ms=lambda: bench.clock.ms)
    controller = Controller(config, journal=journal, key=key, meters=Nothing(), dgr=Nothing(), ledger=rest_board(bench, key),
                            events=EventLog("buyer", log), clock=lambda: bench.clock.ms / 1000)
    events = lambda name: [e for e in map(parse_line, log.getvalue().splitlines()) if e["event"] == name]  # noqa: E731
    return controller, journal, events


@pytest.mark.parametrize("pinned", ["authority", "another key"])
def test_a_trade_moves_energy_only_when_proven_under_the_pinned_key(bench, tmp_path, pinned):
    seller, buyer = make_key(1), make_key(2)
    bench.register(seller), bench.register(buyer)
    accepted(bench.post(bench.message(seller, "order", market_id=MARKET, side="sell", energy_wh=500, price_per_kwh_minor=2000)))
    key_hex = AUTHORITY.public_key.hex() if pinned == "authority" else coincurve.PrivateKey().public_key.format().hex()
    controller, journal, events = buyer_board(bench, tmp_path, buyer, key_hex)
    try:
        place_order(journal, buyer, market_id=MARKET, side="buy", energy_wh=300, price_per_kwh_minor=2500,
                    issued_at=bench.clock.ms // 1000, ledger_id=LEDGER_ID)
        controller.flush_outbox()  # sends the order (it trades), then checks it in the record
        assert [e["event"] for e in events("order.acked")] == ["order.acked"]
        controller.poll_trades()
        scheduled = journal.deliveries(states=("scheduled",))
        if pinned == "authority":
            assert len(scheduled) == 1 and journal.refused_trades() == []
            assert events("alarm.message_unrecorded") == [] and controller.outbox.record_check.pending() == 0
        else:
            assert scheduled == []
            (refusal,) = journal.refused_trades()
            assert "signed record contradicts" in refusal["reason"] and "signature" in refusal["reason"], refusal
            assert len(events("alarm.trade_refused")) == 1
            assert len(events("alarm.message_unrecorded")) == 1  # its own order's proof fails under that key too
    finally:
        journal.close()
