"""The trading side of the daemon's jobs — outbox, trade poll, clock guard, ledger link — driven
through the real Controller and a real journal on a temporary SQLite file (issue 7 g, h, i, j, n, p).

Mocked, because they are outside the system under test: the ledger (a scripted in-process
double answering what a real ledger would: accept, reject, be unreachable), the meters and the
router (never used by these jobs beyond construction). Time is a virtual clock.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from firmware.config import load_config
from firmware.journal import Journal
from firmware.ledger.base import LedgerRejected, LedgerUnavailable, Refusal, SubmitResult, TradeRecord
from firmware.scheduler.controller import Controller
from firmware.scheduler.events import EventLog
from tests.trading_helpers import device_key, place_order

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000  # a slot edge of the sim board's 30-s slots
LEDGER_ID = "dgc-bench"


_FIELD = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_line(line: str) -> dict:
    """An event line's name and fields (a local reader, so this file also runs against the code
    before firmware.scheduler.events.parse_line existed)."""
    _stamp, _board, event, *rest = line.split(" ", 3)
    fields = {}
    for key, raw in _FIELD.findall(rest[0] if rest else ""):
        try:
            fields[key] = json.loads(raw) if raw.startswith('"') else raw
        except ValueError:
            fields[key] = raw.strip('"')
    return {"event": event, "fields": fields}


class FakeLedger:
    """A scripted ledger. ``submit_rule(fields) -> SubmitResult | Exception`` decides each answer."""

    def __init__(self, clock):
        self.clock = clock
        self.down = False
        self.submitted: list[int] = []
        self.submit_rule = lambda fields: SubmitResult("accepted", False, None, "", {"filled_wh": 0})
        self.trades: list[TradeRecord] = []
        self.read_refusal: LedgerRejected | None = None
        self.offset_ms = 0
        self.calls = 0

    def _call(self):
        self.calls += 1
        if self.down:
            raise LedgerUnavailable("ledger GET /v1/x failed after 3 attempt(s): connection refused")

    def submit(self, message):
        self.submitted.append(message.fields["nonce"])
        if len(self.submitted) > 400:  # a runaway outbox: stop it, and let the test's assertions say so
            raise LedgerUnavailable("the test's ledger gave up answering after 400 submits")
        self._call()
        answer = self.submit_rule(message.fields)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def trades_since(self, device_id, cursor):
        self._call()
        if self.read_refusal is not None:
            raise self.read_refusal
        new = [t for t in self.trades if t.trade_id > cursor]
        return new, max([cursor] + [t.trade_id for t in new])

    def device_account(self, device_id):
        self._call()
        if self.read_refusal is not None:
            raise self.read_refusal
        return {"max_nonce": 0, "name": "house"}

    def server_time_ms(self):
        self._call()
        return int(self.clock[0] * 1000) + self.offset_ms


class Nothing:
    """Meters and router: not used by the trading jobs."""

    names = ("house", "interchange")

    def heartbeat(self):  # the router greeted at start-up (issue 7 o): answered, nothing else
        return None

    def __getattr__(self, name):
        raise AssertionError(f"the trading jobs must not touch the devices ({name})")

    def close(self):
        pass


class Board:
    def __init__(self, tmp_path: Path):
        self.clock = [float(T0)]
        self.config = load_config(REPO / "board_configs" / "sim.toml")
        self.ledger = FakeLedger(self.clock)
        self.key = device_key(3)
        self.log = io.StringIO()
        self.journal = Journal(tmp_path / "journal.sqlite3", clock_ms=lambda: int(self.clock[0] * 1000))
        self.controller = Controller(self.config, journal=self.journal, key=self.key, meters=Nothing(), dgr=Nothing(),
                                     ledger=self.ledger, events=EventLog("house", self.log), clock=lambda: self.clock[0])

    def events(self, name: str | None = None) -> list[dict]:
        lines = [parse_line(line) for line in self.log.getvalue().splitlines()]
        return [e for e in lines if name is None or e["event"] == name]

    def order(self, *, market_offset: int = 3, side: str = "buy", energy_wh: int = 500, price: int = 2500, ttl_s: int = 60):
        return place_order(self.journal, self.key, market_id=T0 + market_offset * 30, side=side, energy_wh=energy_wh,
                           price_per_kwh_minor=price, issued_at=int(self.clock[0]), ttl_s=ttl_s, ledger_id=LEDGER_ID)

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds


@pytest.fixture
def board(tmp_path):
    b = Board(tmp_path)
    yield b
    b.journal.close()


def _outbox_states(journal: Journal) -> dict[int, str]:
    with journal._lock:
        return dict(journal._db.execute("SELECT nonce, state FROM outbox").fetchall())


# --- j: one message failing transiently does not block the rest; expired ones are dropped -------


def test_a_message_that_keeps_failing_does_not_block_the_rest(board):
    first, second, third = (board.order(market_offset=k) for k in (3, 4, 5))
    stuck = first.fields["nonce"]
    board.ledger.submit_rule = lambda f: (LedgerUnavailable("HTTP 503 for this message") if f["nonce"] == stuck
                                          else SubmitResult("accepted", False, None, "", {"filled_wh": 0}))
    board.controller.flush_outbox()
    states = _outbox_states(board.journal)
    assert states[second.fields["nonce"]] == "acked" and states[third.fields["nonce"]] == "acked"
    assert states[stuck] == "pending"
    # The stuck message waits its own back-off: an immediate flush does not hammer it.
    attempts = board.ledger.submitted.count(stuck)
    board.advance(1)
    board.controller.flush_outbox()
    assert board.ledger.submitted.count(stuck) == attempts


def test_an_expired_message_is_dropped_and_recorded(board):
    message = board.order(ttl_s=60)
    nonce = message.fields["nonce"]
    board.ledger.down = True
    board.controller.flush_outbox()
    board.advance(61)
    board.ledger.down = False
    board.ledger.submitted.clear()
    board.controller.flush_outbox()
    assert nonce not in board.ledger.submitted  # never sent after it expired
    assert _outbox_states(board.journal)[nonce] == "expired"
    assert [e["fields"]["nonce"] for e in board.events("outbox.expired")] == [str(nonce)]
    assert board.journal.pending_count() == 0


# --- n: an expired report is signed again a bounded number of times, with back-off --------------


def _reported_delivery(board: Board) -> int:
    """A trade of this board's order, its delivery refused (0 Wh) and reported."""
    return _report_refused_delivery(board, _acked_sale(board))


def _acked_sale(board: Board):
    """A 100-Wh sell order of this board, accepted by the ledger."""
    order = board.order(market_offset=1, side="sell", energy_wh=100, price=1900)
    board.ledger.submit_rule = lambda f: SubmitResult("accepted", False, None, "", {"filled_wh": 0})
    board.controller.flush_outbox()
    return order


def _report_refused_delivery(board: Board, order) -> int:
    """Trade 41 of ``order``, its delivery refused (0 Wh) and its report signed (not sent)."""
    trade = TradeRecord(41, T0 + 30, "sell", 100, 2000, order.fields["nonce"], "ab" * 20, "contracted")
    board.journal.record_trades([trade], cursor=41)
    journal = board.journal
    if hasattr(journal, "transition"):  # the delivery state machine (issue 7 part 1)
        journal.transition(41, "refused", "test: the router refused")
        journal.transition(41, "metered", "test")
        board.controller.deliveries.report(journal.delivery(41))
    else:  # the journal before it, to show the test failing on the old code
        journal.mark_failed_start(41, "test: the router refused")
        journal.mark_metered(41, None, 0, "failed", None)
        board.controller._report(next(d for d in journal.deliveries(states=("metered",)) if d.trade_id == 41))
    return 41


@pytest.mark.parametrize("code", ["expired", "not_yet_valid"])
def test_a_report_rejected_as_expired_is_signed_again_a_bounded_number_of_times(board, code):
    trade_id = _reported_delivery(board)
    board.ledger.submit_rule = lambda f: (SubmitResult("rejected", False, code, "the report's time is out of range", {}, Refusal.RESIGN)
                                          if f["type"] == "delivery_report" else SubmitResult("accepted", False, None, "", {}))
    board.ledger.submitted.clear()
    for _ in range(1800):  # an hour of the sim board's 2-s outbox cadence
        board.controller.flush_outbox()
        board.advance(2)
    signed = len(board.events("report.signed"))
    assert 2 <= signed <= 6, f"{signed} reports signed for one trade"
    assert len(board.ledger.submitted) <= 6
    assert len(board.events("alarm.report_unsent")) == 1
    assert board.journal.report_signatures(trade_id) == signed


def test_re_signed_reports_wait_longer_each_time(board):
    _reported_delivery(board)
    board.ledger.submit_rule = lambda f: (SubmitResult("rejected", False, "expired", "too old", {}, Refusal.RESIGN)
                                          if f["type"] == "delivery_report" else SubmitResult("accepted", False, None, "", {}))
    sent_at = []
    for _ in range(900):
        before = len(board.ledger.submitted)
        board.controller.flush_outbox()
        if len(board.ledger.submitted) > before:
            sent_at.append(board.clock[0])
        board.advance(2)
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert len(gaps) >= 3 and all(later >= earlier * 1.5 for earlier, later in zip(gaps, gaps[1:])), gaps


# --- i: the trade poll never lets a trade the board did not make reach the router ---------------


def test_the_poll_refuses_a_forged_trade_alarms_once_and_schedules_nothing(board):
    order = board.order(market_offset=2, side="buy", energy_wh=500, price=2500)
    board.controller.flush_outbox()
    good = TradeRecord(7, T0 + 60, "buy", 300, 2400, order.fields["nonce"], "cd" * 20, "contracted")
    forged = TradeRecord(8, T0 + 60, "sell", 2000, 1000, order.fields["nonce"], "ef" * 20, "contracted")
    board.ledger.trades = [good, forged]
    board.controller.poll_trades()
    board.controller.poll_trades()
    scheduled = [d.trade_id for d in board.journal.deliveries(states=("scheduled",))]
    assert scheduled == [7]
    alarms = board.events("alarm.trade_refused")
    assert [a["fields"]["trade"] for a in alarms] == ["8"]
    assert "side sell is not order" in alarms[0]["fields"]["reason"]


# --- h: a permanent refusal of the device neither crashes nor loops; it alarms once -------------


def test_an_unregistered_device_at_start_up_and_in_polling_alarms_once_and_retries_slowly(board):
    board.ledger.read_refusal = LedgerRejected("unknown_device", "no device is registered with this id", Refusal.DEVICE_UNKNOWN)
    board.controller.recover()  # must not raise
    calls = board.ledger.calls
    for _ in range(60):  # two minutes of 2-s trade polls
        board.controller.poll_trades()
        board.controller.flush_outbox()
        board.advance(2)
    assert len(board.events("alarm.ledger_refused")) == 1
    assert board.ledger.calls - calls <= 3, "the refused device kept asking"
    from firmware.scheduler.status import JobMonitor, StatusService

    status = StatusService(board.controller, JobMonitor()).status()
    assert "unknown_device" in status["ledger"]["refusal"]
    # Registered at last: the slow retry notices, and the alarm is lifted once.
    board.ledger.read_refusal = None
    board.advance(300)
    board.controller.poll_trades()
    assert len(board.events("ledger.device_accepted")) == 1
    assert StatusService(board.controller, JobMonitor()).status()["ledger"]["refusal"] is None


# --- p: a ledger outage is in the event log once, and in dgc status -----------------------------


def test_an_outage_is_logged_once_as_ledger_unavailable_and_shown_in_status(board):
    from firmware.scheduler.status import JobMonitor, StatusService, format_status

    board.order()
    board.ledger.down = True
    for _ in range(52):  # 105 s of 2-s polls and outbox runs, 10-s clock checks
        board.controller.poll_trades()
        board.controller.flush_outbox()
        if int(board.clock[0]) % 10 == 0:
            board.controller.check_clock()
        board.advance(2)
    assert len(board.events("ledger.unavailable")) == 1
    status = StatusService(board.controller, JobMonitor()).status()
    assert status["ledger"]["reachable"] is False
    assert status["ledger"]["down_since"] == T0 and "connection refused" in status["ledger"]["detail"]
    assert any("ledger unreachable since" in line for line in format_status(status))
    board.ledger.down = False
    board.controller.poll_trades()
    board.controller.flush_outbox()
    assert len(board.events("ledger.back")) == 1
    assert StatusService(board.controller, JobMonitor()).status()["ledger"]["reachable"] is True


# --- g: the clock guard ------------------------------------------------------------------------


def test_the_clock_guard_fails_closed_when_the_ledgers_time_is_unknown_beyond_the_grace(board):
    grace = board.config.ledger.clock_grace_seconds
    board.controller.check_clock()
    assert board.controller.health.clock_ok
    board.ledger.down = True
    board.advance(grace - 5)
    board.controller.check_clock()
    assert board.controller.health.clock_ok  # within the grace, the board trusts its own clock
    board.advance(10)
    board.controller.check_clock()
    assert not board.controller.health.clock_ok
    assert len([e for e in board.events("alarm.clock") if e["fields"].get("reason") == "ledger time unknown"]) == 1
    board.ledger.down = False
    board.controller.check_clock()
    assert board.controller.health.clock_ok
    assert board.events("clock.ok")


class SlowLedger(FakeLedger):
    """Each attempt's answer takes 1.5 s of virtual time; the adapter retries twice with back-off."""

    def __init__(self, clock, fail_first: int):
        super().__init__(clock)
        self.fail_first = fail_first

    def server_time_ms(self):  # what the old clock guard called: retries inside, time passes
        for _ in range(self.fail_first):
            self.clock[0] += 2.0 + 0.2  # a timed-out attempt and the back-off before the next
        self.clock[0] += 0.75
        server = int(self.clock[0] * 1000)
        self.clock[0] += 0.75
        return server


def test_the_skew_is_measured_on_one_attempts_round_trip(tmp_path):
    board = Board(tmp_path)
    board.ledger = SlowLedger(board.clock, fail_first=2)
    board.controller = Controller(board.config, journal=board.journal, key=board.key, meters=Nothing(), dgr=Nothing(),
                                  ledger=board.ledger, events=EventLog("house", board.log), clock=lambda: board.clock[0])
    from firmware.ledger.rest import TimeSample

    def one_attempt():
        sent = int(board.clock[0] * 1000)
        board.clock[0] += 0.01
        server = int(board.clock[0] * 1000)
        board.clock[0] += 0.01
        return TimeSample(server_ms=server, sent_ms=sent, received_ms=int(board.clock[0] * 1000))

    board.ledger.server_time_sample = one_attempt
    board.controller.check_clock()
    # Measured over one 20-ms round trip: the two retries before it do not count.
    assert abs(board.controller.health.clock_skew_ms) <= 10
    assert board.controller.health.clock_ok
    board.journal.close()


# --- part 6: no order for a market the ledger will never open ----------------------------------


def test_no_market_after_the_ledgers_last_market_is_bid_for(board):
    last = T0 + 3 * 30
    board.ledger.info = lambda: {"ledger_id": LEDGER_ID, "last_market_id": last}
    markets = board.controller.trading.open_markets(T0)
    assert markets and max(markets) == last
    assert markets == [m for m in board.config.market.open_markets(T0) if m <= last]
    board.controller.trading.open_markets(T0 + 30)
    assert len(board.events("ledger.last_market")) == 1


def test_an_unbounded_ledger_leaves_every_open_market(board):
    board.ledger.info = lambda: {"ledger_id": LEDGER_ID, "last_market_id": None}
    assert board.controller.trading.open_markets(T0) == board.config.market.open_markets(T0)


# --- sim finding F2: a clock step between two clock checks -------------------------------------


def test_a_clock_step_between_checks_stops_bidding_until_the_next_check(board):
    mono = [500.0]
    board.controller.ctx.monotonic = lambda: mono[0]
    board.controller.check_clock()
    assert board.controller.health.clock_ok
    board.advance(4)
    mono[0] += 4
    board.controller.flush_outbox()
    assert board.controller.health.clock_ok  # moved together: no step
    board.advance(-600)  # an NTP step back by 10 minutes
    board.ledger.offset_ms = 600_000  # the ledger's clock did not step
    mono[0] += 2
    board.controller.flush_outbox()
    assert not board.controller.health.clock_ok
    alarm = [e for e in board.events("alarm.clock") if e["fields"].get("reason") == "clock stepped"]
    assert len(alarm) == 1 and int(alarm[0]["fields"]["step_ms"]) < -590_000
    board.controller.trading.bid()
    assert board.events("bid.skipped") and "stepped" in board.events("bid.skipped")[-1]["fields"]["reason"]
    board.controller.check_clock()  # measured again: the skew is real now, so still not ok
    assert not board.controller.health.clock_ok


# --- the trading call site (issue 8's forecast and policy, F's modules) ------------------------


@pytest.mark.parametrize("strategy, method", [("tariff", "robust"), ("baseline", "baseline")])
def test_bid_signs_orders_from_the_journals_readings(tmp_path, strategy, method):
    """A house importing ~1 kWh a slot for a while: the bid job forecasts from the journal and signs
    buy orders within the price band, with either the tariff or the baseline strategy."""
    import dataclasses

    board = Board(tmp_path)
    config = board.config
    config = dataclasses.replace(config, policy=dataclasses.replace(config.policy, strategy=strategy),
                                 forecast=dataclasses.replace(config.forecast, method=method))
    board.controller = Controller(config, journal=board.journal, key=board.key, meters=Nothing(), dgr=Nothing(),
                                  ledger=board.ledger, events=EventLog("house", board.log), clock=lambda: board.clock[0])
    _importing_house(board, T0)  # a reading every 2 s, 1200 Wh per 30-s slot imported
    board.controller.trading.bid()
    signed = board.events("order.signed")
    assert signed, board.log.getvalue()[-2000:]
    rules = config.market
    for event in signed:
        f = event["fields"]
        assert f["side"] == "buy"
        assert rules.price_min_per_kwh_minor <= int(f["price"]) <= rules.price_max_per_kwh_minor
        assert int(f["energy_wh"]) % rules.lot_wh == 0
    board.journal.close()


# --- o: a restart's recovery never waits on the outbox ----------------------------------------


def test_the_recovery_sends_nothing_and_leaves_the_outbox_to_its_job(board):
    """On a chain each message waits for its block: a restarted seller's 34 pending messages
    held its start-up for 34 s, slot edges and all (hil_tests/test_daemon_restart.py has the
    router's side of it). The recovery sends none of them; the outbox job, run at once after
    it by the daemon, does."""
    pending = [board.order(market_offset=k).fields["nonce"] for k in (3, 4, 5)]
    board.controller.recover()
    assert board.ledger.submitted == []
    board.controller.flush_outbox()
    assert board.ledger.submitted == pending


# --- backpressure: the bid signs nothing new while the outbox is behind ------------------------


def _importing_house(board: Board, until_s: int) -> None:
    """~1.2 kWh a slot imported (a reading every 2 s) for 40 slots up to ``until_s``, the clock
    then a second later, so the bid job has fresh readings and orders to sign."""
    imported = 0
    for t in range(T0 - 40 * 30, until_s + 1, 2):
        board.journal.add_reading("house", t * 1000, imported, 0, 2400)
        imported += 80
    board.clock[0] = float(until_s + 1)


def test_the_bid_signs_nothing_new_while_the_outbox_is_behind(board):
    """A 1-s-block chain takes one message a second; a bid with price curves signed ~1.5 a
    second, so the backlog outgrew the messages' life and 146 of a seller's 371 messages expired
    unsent (EVM SIGKILL test). While the oldest message not sent yet has waited more than a quarter
    of its life, the bid and review jobs sign nothing and say so once; they sign again as soon
    as the outbox has caught up."""
    ttl = board.config.ledger.message_ttl_seconds
    behind = board.order(market_offset=20, ttl_s=ttl)  # signed, due, not sent yet: the outbox is busy
    _importing_house(board, T0 + ttl // 4 + 1)
    board.controller.trading.bid()
    assert board.events("order.signed") == []
    deferred = board.events("bid.deferred")
    assert len(deferred) == 1, board.log.getvalue()[-2000:]
    assert deferred[0]["fields"]["reason"] == "outbox behind"
    assert int(deferred[0]["fields"]["oldest_s"]) > ttl // 4
    # The deferred bid still sent what was queued (a no-op while the outbox job is sending).
    assert _outbox_states(board.journal)[behind.fields["nonce"]] == "acked"
    board.controller.trading.bid()
    assert board.events("order.signed"), board.log.getvalue()[-2000:]
    assert len(board.events("bid.resumed")) == 1 and len(board.events("bid.deferred")) == 1


def test_a_message_in_its_own_back_off_does_not_hold_the_bid(board):
    """One message the ledger keeps refusing transiently waits its own back-off (issue 7 j); it is
    not the outbox falling behind, so the bid goes on signing."""
    ttl = board.config.ledger.message_ttl_seconds
    stuck = board.order(market_offset=20, ttl_s=ttl).fields["nonce"]
    board.ledger.submit_rule = lambda f: (LedgerUnavailable("HTTP 503 for this message") if f["nonce"] == stuck
                                          else SubmitResult("accepted", False, None, "", {"filled_wh": 0}))
    board.controller.flush_outbox()
    _importing_house(board, T0 + ttl // 4 + 1)
    assert _outbox_states(board.journal)[stuck] == "pending"
    board.controller.trading.bid()
    assert board.events("order.signed") and not board.events("bid.deferred")


def test_on_a_slow_ledger_the_bid_keeps_its_queue_within_what_the_outbox_sends_in_time(board):
    """One answer a second (a 1-s-block chain): the outbox measures it, and the bid signs nothing
    while more is queued than goes out in a quarter of a message's life (15 of the sim board's
    60 s); on a ledger that answers at once it signs again. Without the measure a restarted
    seller with 49 queued messages signed 27 more in one bid, and 40 expired unsent."""
    mono = [0.0]
    board.controller.ctx.monotonic = lambda: mono[0]
    ttl = board.config.ledger.message_ttl_seconds
    queued = [board.order(market_offset=20 + k, ttl_s=ttl).fields["nonce"] for k in range(30)]
    sent = []

    def one_block(fields):  # two answers at one a second, then the node stops answering
        if len(sent) == 2:
            return LedgerUnavailable("the node did not answer")
        sent.append(fields["nonce"])
        board.advance(1)
        mono[0] += 1
        return SubmitResult("accepted", False, None, "", {"filled_wh": 0})

    board.ledger.submit_rule = one_block
    board.controller.flush_outbox()
    assert sent == queued[:2] and board.controller.health.outbox_send_ms == 1000
    _importing_house(board, int(board.clock[0]) + 1)
    mono[0] = board.clock[0] - T0
    board.controller.trading.bid()
    assert board.events("order.signed") == [], board.log.getvalue()[-2000:]
    (deferred,) = board.events("bid.deferred")
    assert int(deferred["fields"]["queued"]) > ttl // 4 and deferred["fields"]["send_ms"] == "1000"
    board.ledger.submit_rule = lambda f: SubmitResult("accepted", False, None, "", {"filled_wh": 0})
    board.advance(2)
    _importing_house(board, int(board.clock[0]))
    mono[0] = board.clock[0] - T0
    board.controller.flush_outbox()  # answered at once: the measure falls
    assert board.controller.health.outbox_send_ms < 100
    board.controller.trading.bid()
    assert board.events("order.signed") and len(board.events("bid.resumed")) == 1


def test_resent_duplicates_after_a_restart_are_not_taken_for_a_fast_ledger(board):
    """After a restart the outbox resends what had already landed, and a chain answers those at
    once (duplicate); they say nothing of how fast a new message gets in. Until one does, a board
    with a queue signs nothing more: a restarted seller that took its duplicates for a fast chain
    queued 36 messages at one a block, and two expired on a loaded machine."""
    mono = [0.0]
    board.controller.ctx.monotonic = lambda: mono[0]
    ttl = board.config.ledger.message_ttl_seconds
    queued = [board.order(market_offset=20 + k, ttl_s=ttl).fields["nonce"] for k in range(30)]
    answered = []

    def resent(fields):  # six already landed, then the node stops answering
        if len(answered) == 6:
            return LedgerUnavailable("the node did not answer")
        answered.append(fields["nonce"])
        return SubmitResult("accepted", True, None, "", {"filled_wh": 0})

    board.ledger.submit_rule = resent
    board.controller.flush_outbox()
    assert answered == queued[:6]
    assert board.controller.health.outbox_send_ms is None
    _importing_house(board, int(board.clock[0]) + 2)
    mono[0] = board.clock[0] - T0
    board.controller.trading.bid()
    assert board.events("order.signed") == [], board.log.getvalue()[-2000:]
    (deferred,) = board.events("bid.deferred")
    assert deferred["fields"]["send_ms"] == "-" and int(deferred["fields"]["queued"]) == 21


# --- reports first: a report signed at a slot edge does not wait behind the queued orders -------


def test_a_report_is_sent_before_the_orders_queued_ahead_of_it(board):
    """On a chain each message waits for its block: a report signed behind 15 queued orders waited
    ~15 blocks (session 5's note). Now the outbox sends the due reports first; the orders and
    cancels keep their own order (a cancel still never overtakes its order)."""
    sell = _acked_sale(board)
    queued = [board.order(market_offset=k).fields["nonce"] for k in (3, 4, 5)]
    _report_refused_delivery(board, sell)
    journal = board.journal
    report = int(board.events("report.signed")[-1]["fields"]["nonce"])
    assert report > max(queued)  # signed after them
    board.ledger.submitted.clear()
    board.controller.flush_outbox()
    assert board.ledger.submitted == [report, *queued]
    assert journal.pending_count() == 0
