"""The journal's orders, fills and trades (issue 7 a, i): real SQLite files, no mocks."""

from __future__ import annotations

import pytest

from firmware.journal import Journal
from firmware.ledger.base import TradeRecord
from tests.trading_helpers import ack, device_key, place_order

MARKET = 1_800_000


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.sqlite3", clock_ms=lambda: 1_000_000_000)
    yield j
    j.close()


@pytest.fixture
def key():
    return device_key()


def trade(trade_id: int, order_nonce: int, energy_wh: int, *, price: int = 2500, side: str = "buy",
          market_id: int = MARKET) -> TradeRecord:
    return TradeRecord(trade_id=trade_id, market_id=market_id, side=side, energy_wh=energy_wh, price_per_kwh_minor=price,
                       order_nonce=order_nonce, counterparty="c0ffee" * 6, state="contracted")


def order(journal, nonce):
    return next(o for o in journal.orders_in_market(MARKET) if o.nonce == nonce)


# --- a: an immediate partial fill, then the trade poll lists the same fill ---------------------


def test_an_immediate_partial_fill_listed_again_by_the_trade_poll_counts_once(journal, key):
    message = place_order(journal, key, market_id=MARKET, side="buy", energy_wh=1000, price_per_kwh_minor=2600)
    nonce = message.fields["nonce"]
    ack(journal, message, filled_wh=300)  # the order crossed a resting sell at once
    assert (order(journal, nonce).filled_wh, order(journal, nonce).state) == (300, "open")

    journal.record_trades([trade(1, nonce, 300)], cursor=1)  # the same 300 Wh, as the trade poll lists it
    o = order(journal, nonce)
    assert o.filled_wh == 300, "the fill was counted twice"
    assert o.state == "open" and o.remaining_wh == 700
    assert journal.traded_wh(MARKET, "buy") == 300
    assert [d.energy_wh for d in journal.deliveries(states=("scheduled",))] == [300]

    # The rest stays live and cancellable...
    assert nonce in [o.nonce for o in journal.open_orders()]
    # ...and can still trade: 700 Wh more fill it, exactly.
    journal.record_trades([trade(2, nonce, 700)], cursor=2)
    assert (order(journal, nonce).filled_wh, order(journal, nonce).state) == (1000, "filled")


def test_the_rest_of_a_partly_filled_order_can_be_cancelled(journal, key):
    from firmware.messages import new_fields

    message = place_order(journal, key, market_id=MARKET, side="buy", energy_wh=1000, price_per_kwh_minor=2600)
    nonce = message.fields["nonce"]
    ack(journal, message, filled_wh=300)
    journal.record_trades([trade(1, nonce, 300)], cursor=1)
    journal.enqueue_cancel(nonce, lambda n: new_fields("cancel", ledger_id="dgc-test", device_id=key.device_id, nonce=n,
                                                       issued_at=1_000_000, ttl_s=600, market_id=MARKET, order_nonce=nonce), key)
    assert order(journal, nonce).state == "cancelling"


def test_a_trade_polled_before_the_orders_ack_still_counts_once(journal, key):
    message = place_order(journal, key, market_id=MARKET, side="sell", energy_wh=500, price_per_kwh_minor=1900)
    nonce = message.fields["nonce"]
    journal.record_trades([trade(1, nonce, 500, side="sell", price=2000)], cursor=1)
    ack(journal, message, filled_wh=500)  # the ack arrives after the poll (a resend after a lost answer)
    o = order(journal, nonce)
    assert (o.filled_wh, o.state) == (500, "filled")


# --- i: a trade the board did not make never schedules a delivery ------------------------------


@pytest.mark.parametrize("case", ["unknown nonce", "other market", "other side", "worse price", "too much",
                                  "rejected order"])
def test_a_trade_that_matches_no_order_of_this_board_schedules_nothing(journal, key, case):
    message = place_order(journal, key, market_id=MARKET, side="buy", energy_wh=1000, price_per_kwh_minor=2600)
    nonce = message.fields["nonce"]
    listed = {
        "unknown nonce": trade(9, nonce + 40, 100),
        "other market": trade(9, nonce, 100, market_id=MARKET + 1800),
        "other side": trade(9, nonce, 100, side="sell"),
        "worse price": trade(9, nonce, 100, price=2601),
        "too much": trade(9, nonce, 1001),
        "rejected order": trade(9, nonce, 100),
    }[case]
    if case == "rejected order":
        entry = journal.pending_outbox()[0]
        journal.settle_outbox(entry, accepted=False, answer={"status": "rejected", "code": "price_out_of_band"})
    new_ids = journal.record_trades([listed], cursor=9)
    assert new_ids == []
    assert journal.deliveries(states=("scheduled", "running", "metered", "reported")) == []
    assert journal.trade_count() == 0 and journal.traded_wh(MARKET, "buy") == 0
    refused = journal.refused_trades()
    assert [r["trade_id"] for r in refused] == [9] and refused[0]["reason"]
    assert order(journal, nonce).filled_wh == 0
    assert journal.trade_cursor() == 9  # the poll moves on; the refusal is journalled, not retried forever


def test_a_refused_trade_listed_again_is_reported_once(journal, key):
    forged = trade(5, 77, 100)
    first = journal.record_trades_checked([forged], cursor=5)
    again = journal.record_trades_checked([forged], cursor=5)
    assert [t.trade_id for t, _ in first.refused] == [5] and first.new_ids == []
    assert again.refused == [] and again.new_ids == []


def test_two_trades_together_beyond_the_order_the_second_is_refused(journal, key):
    message = place_order(journal, key, market_id=MARKET, side="buy", energy_wh=500, price_per_kwh_minor=2600)
    nonce = message.fields["nonce"]
    result = journal.record_trades_checked([trade(1, nonce, 400), trade(2, nonce, 200)], cursor=2)
    assert result.new_ids == [1]
    assert [(t.trade_id, "exceeds" in reason) for t, reason in result.refused] == [(2, True)]
    assert order(journal, nonce).filled_wh == 400
