"""Issue 10 part 4 (board side) and part 5 (bid jitter): a trade moves energy only once the
ledger proves it is in its authority-signed record; the bid job's per-device offset.

Driven through the real Controller and a real journal (tests/test_trading_jobs.py's harness).
Mocked, because it is outside the system under test: the ledger adapter's ``confirm_trade``
(scripted to answer as RestLedger.verify_trade_recorded does: proof ok, RecordError,
LedgerRejected('not_found'), LedgerUnavailable). The proof itself is checked over real HTTP in
hil_tests/test_ledger_record.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from firmware import jitter
from firmware.config import ConfigError, load_config, parse_config
from firmware.ledger.base import LedgerRejected, LedgerUnavailable, Refusal, TradeRecord
from firmware.ledger.record import RecordError
from tests.test_trading_jobs import REPO, T0, Board

PINNED = "02" + "ab" * 32


class Confirming:
    """The scripted record check: ``answers[trade_id]`` is None (proven) or an exception."""

    def __init__(self, board: Board):
        self.answers: dict[int, BaseException | None] = {}
        self.asked: list[tuple[int, str, bytes | None]] = []
        board.ledger.confirm_trade = self.confirm

    def confirm(self, trade, device_id, key):
        self.asked.append((trade.trade_id, device_id, key))
        answer = self.answers.get(trade.trade_id)
        if answer is not None:
            raise answer


def pin(board: Board, key: str = PINNED, kind: str | None = None) -> None:
    cfg = board.config
    cfg = dataclasses.replace(cfg, ledger=dataclasses.replace(cfg.ledger, authority_public_key=key))
    if kind:
        cfg = dataclasses.replace(cfg, board=dataclasses.replace(cfg.board, kind=kind))
    board.controller.ctx.config = cfg


@pytest.fixture
def board(tmp_path):
    b = Board(tmp_path)
    yield b
    b.journal.close()


def _trades(board: Board, *ids: int) -> list[TradeRecord]:
    order = board.order(market_offset=3, side="buy", energy_wh=1000, price=2500)
    board.controller.flush_outbox()
    return [TradeRecord(i, T0 + 90, "buy", 100, 2400, order.fields["nonce"], "cd" * 20, "contracted") for i in ids]


def _scheduled(board: Board) -> list[int]:
    return sorted(d.trade_id for d in board.journal.deliveries(states=("scheduled",)))


def test_a_trade_not_in_the_signed_record_is_refused_journalled_alarmed_and_never_scheduled(board):
    pin(board)
    check = Confirming(board)
    board.ledger.trades = _trades(board, 7, 8, 9)
    check.answers[8] = RecordError("proof of trade 8: the recorded trade differs from the one reported to the board")
    check.answers[9] = LedgerRejected("not_found", "no such trade in the record", Refusal.NOT_FOUND)
    board.controller.poll_trades()
    board.controller.poll_trades()
    assert _scheduled(board) == [7]
    assert {(r["trade_id"], r["reason"].split(" (")[0].split(":")[0]) for r in board.journal.refused_trades()} == {
        (8, "the ledger's signed record contradicts the trade"), (9, "not in the ledger's signed record")}
    assert sorted(a["fields"]["trade"] for a in board.events("alarm.trade_refused")) == ["8", "9"]
    assert all(key == bytes.fromhex(PINNED) and dev == board.key.device_id for _, dev, key in check.asked)
    assert sorted(t for t, _, _ in check.asked) == [7, 8, 9]  # each asked once: known trades are not re-checked


def test_an_unavailable_record_leaves_the_trade_waiting_unscheduled_and_it_is_retried(board):
    pin(board)
    check = Confirming(board)
    board.ledger.trades = _trades(board, 7, 8)
    check.answers[7] = LedgerUnavailable("ledger GET /v1/trades/7/proof failed: connection refused")
    board.controller.poll_trades()
    assert _scheduled(board) == [8]
    assert board.journal.trade_cursor() == 0  # not past the waiting trade: it is not lost
    assert [e["fields"]["trade"] for e in board.events("trade.unconfirmed")] == ["7"]
    board.controller.poll_trades()  # still down: waits, told once
    assert _scheduled(board) == [8] and len(board.events("trade.unconfirmed")) == 1
    check.answers[7] = None
    board.controller.poll_trades()
    assert _scheduled(board) == [7, 8]
    assert board.journal.trade_cursor() == 8
    assert board.journal.refused_trades() == []


def test_a_field_board_without_a_pinned_key_refuses_every_trade_and_says_so_once(board):
    pin(board, key="", kind="rpi4-sdm630")
    Confirming(board)
    board.ledger.trades = _trades(board, 7, 8)
    board.controller.poll_trades()
    board.controller.poll_trades()
    assert _scheduled(board) == []
    assert {r["trade_id"] for r in board.journal.refused_trades()} == {7, 8}
    assert len(board.events("alarm.ledger_unpinned")) == 1


def test_a_sim_board_without_a_pinned_key_trades_unchecked_with_one_alarm(board):
    Confirming(board)
    board.ledger.trades = _trades(board, 7, 8)
    board.controller.poll_trades()
    assert _scheduled(board) == [7, 8]
    assert len(board.events("alarm.ledger_unpinned")) == 1


def test_the_pinned_key_is_checked_in_the_config():
    text = (REPO / "board_configs" / "sim.toml").read_text()
    ok = parse_config(text.replace("[ledger]\n", f'[ledger]\nauthority_public_key = "{PINNED}"\n', 1), REPO / "x.toml")
    assert ok.ledger.authority_public_key == PINNED
    with pytest.raises(ConfigError, match="authority_public_key"):
        parse_config(text.replace("[ledger]\n", '[ledger]\nauthority_public_key = "04abc"\n', 1), REPO / "x.toml")


# --- issue 10 part 5: per-device bid jitter ------------------------------------------------------


def test_bid_jitter_is_deterministic_bounded_and_spreads_a_thousand_houses():
    ids = [f"{i:064x}" for i in range(1000)]
    offsets = [jitter.bid_offset_ms(d, 1800, 60) for d in ids]
    assert offsets == [jitter.bid_offset_ms(d, 1800, 60) for d in ids]
    assert all(0 <= o <= 60_000 for o in offsets)
    per_second: dict[int, int] = {}
    for o in offsets:
        per_second[o // 1000] = per_second.get(o // 1000, 0) + 1
    assert len(per_second) >= 60 and max(per_second.values()) <= 40  # ~16 a second, not 1,000
    assert all(jitter.bid_offset_ms(d, 30, 60) <= 15_000 for d in ids)  # at most half the interval
    assert jitter.bid_offset_ms(ids[0], 1800, 0) == 0
    anchor = jitter.bid_anchor_s(T0 + 1000.5, 1800, 12_345)
    assert anchor <= T0 + 1000.5 < anchor + 1800 and round((anchor - 12.345) % 1800, 6) in (0, 1800)


def test_the_jitter_bound_is_a_config_key():
    config = load_config(REPO / "board_configs" / "sim.toml")
    assert config.cadence.bid_jitter_seconds == 60


# --- own accepted messages are checked as included ----------------------------------------------


def test_accepted_messages_are_checked_in_the_record_after_the_sends_and_a_missing_one_alarms(board):
    pin(board)
    asked: list[int] = []
    missing = {2}
    down = [False]

    def confirm_message(message, key):
        assert key == bytes.fromhex(PINNED)
        if down[0]:
            raise LedgerUnavailable("ledger GET proof: connection refused")
        asked.append(message.fields["nonce"])
        if message.fields["nonce"] in missing:
            raise LedgerRejected("not_found", "no such message in the record", Refusal.NOT_FOUND)

    board.ledger.confirm_message = confirm_message
    nonces = [board.order(market_offset=3 + i).fields["nonce"] for i in range(6)]
    down[0] = True
    board.controller.flush_outbox()  # all six accepted; the record cannot be asked: they wait
    assert asked == [] and board.controller.outbox.record_check.pending() == 6
    down[0] = False
    board.controller.flush_outbox()  # bounded: at most CHECKS_PER_RUN per run
    assert len(asked) == 4
    board.controller.flush_outbox()
    assert sorted(asked) == sorted(nonces)
    alarms = board.events("alarm.message_unrecorded")
    assert [a["fields"]["nonce"] for a in alarms] == ["2"]
    assert board.controller.outbox.record_check.pending() == 0


def test_without_a_pinned_key_no_message_check_is_queued(board):
    board.ledger.confirm_message = lambda message, key: pytest.fail("asked without a pinned key")
    board.order()
    board.controller.flush_outbox()
    assert board.controller.outbox.record_check.pending() == 0


# --- in the deterministic simulation: a ledger that lies about its trades moves no energy -------


def test_in_the_sim_a_trade_inflated_by_the_ledger_is_refused_and_moves_no_energy():
    """The same lie as tests/test_sim_checkers.py's delivered_le_contracted scenario (the trade
    poll says one lot more than the ledger recorded), with the record check left on: no board
    delivers or reports more than contracted; the lie is refused instead. (The boards then never
    close their real trades - the sim's trade_closed invariant says so - which is the point.)"""
    from dataclasses import replace

    from host_tools.sim import ledger as sim_ledger
    from tests.test_sim_checkers import violations

    def inflate(world):
        original = sim_ledger.SimLedgerClient.trades_since

        def inflated(self, device_id, cursor):
            trades, new_cursor = original(self, device_id, cursor)
            return [replace(t, energy_wh=t.energy_wh + 100) for t in trades], new_cursor

        world.restore.append(lambda: setattr(sim_ledger.SimLedgerClient, "trades_since", original))
        sim_ledger.SimLedgerClient.trades_since = inflated
        world.trace_enabled = True

    found, result = violations(inflate)
    assert "delivered_le_contracted" not in found and "slot_energy" not in found, found
    refusals = [line for line in result.trace if "alarm.trade_refused" in line and "signed record contradicts" in line]
    assert refusals, result.trace[-20:]


@pytest.mark.parametrize("kind, key, signs", [("rpi4-sdm630", "", False), ("rpi4-sdm630", PINNED, True), ("sim", "", True)])
def test_a_field_board_without_a_pinned_key_signs_no_orders(board, kind, key, signs):
    """It would refuse every trade, so it must not contract any: the bid signs nothing."""
    Confirming(board)
    pin(board, key=key, kind=kind)
    imported = 0
    for t in range(T0 - 40 * 30, T0 + 1, 2):  # a house importing 1200 Wh a 30-s slot
        board.journal.add_reading("house", t * 1000, imported, 0, 2400)
        imported += 80
    board.clock[0] = float(T0 + 1)
    board.controller.trading.bid()
    assert bool(board.events("order.signed")) == signs, board.log.getvalue()[-1500:]
    assert len(board.events("alarm.ledger_unpinned")) == (0 if key else 1)


from hypothesis import given, strategies as st  # noqa: E402


@given(st.text(min_size=1, max_size=80), st.integers(1, 86_400), st.integers(0, 3600), st.floats(0, 4e9))
def test_the_bid_offset_is_bounded_and_the_grid_anchor_precedes_now(device_id, bid_s, bound_s, now_s):
    offset = jitter.bid_offset_ms(device_id, bid_s, bound_s)
    assert 0 <= offset <= min(bound_s, bid_s // 2) * 1000
    assert offset == jitter.bid_offset_ms(device_id, bid_s, bound_s)
    anchor = jitter.bid_anchor_s(now_s, bid_s, offset)
    assert anchor <= now_s + 1e-6 and now_s - anchor < bid_s + 1e-6
