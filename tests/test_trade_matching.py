"""The rule that keeps a trade the board did not make from moving energy (issue 7 i), as properties."""

from __future__ import annotations

import dataclasses

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from firmware.trade_matching import ListedTrade, OwnOrder, price_acceptable, trade_refusal

SIDES = st.sampled_from(["buy", "sell"])
LIVE_STATES = st.sampled_from(["sending", "open", "cancelling", "filled", "cancelled"])


@st.composite
def orders(draw, states=LIVE_STATES):
    energy = draw(st.integers(1, 20_000))
    return OwnOrder(nonce=draw(st.integers(1, 10**6)), market_id=draw(st.integers(0, 10**6)) * 1800, side=draw(SIDES),
                    energy_wh=energy, price_per_kwh_minor=draw(st.integers(1, 10_000)), state=draw(states),
                    matched_wh=draw(st.integers(0, energy)))


@st.composite
def matching(draw):
    """An order with room left and a trade that matches it."""
    order = draw(orders())
    assume(order.remaining_wh > 0)
    limit = order.price_per_kwh_minor
    price = draw(st.integers(1, limit)) if order.side == "buy" else draw(st.integers(limit, limit + 10_000))
    trade = ListedTrade(order.market_id, order.side, draw(st.integers(1, order.remaining_wh)), price, order.nonce)
    return order, trade


@settings(max_examples=500)
@given(matching())
def test_a_trade_within_an_orders_terms_is_accepted(pair):
    order, trade = pair
    assert trade_refusal(trade, order) is None


@settings(max_examples=500)
@given(matching(), st.data())
def test_any_single_departure_from_the_order_is_refused(pair, data):
    order, trade = pair
    change = data.draw(st.sampled_from(["market", "side", "nonce", "price", "quantity", "zero", "rejected", "unknown"]))
    if change == "market":
        trade = dataclasses.replace(trade, market_id=trade.market_id + data.draw(st.sampled_from([-1800, 1800, 1])))
    elif change == "side":
        trade = dataclasses.replace(trade, side="sell" if trade.side == "buy" else "buy")
    elif change == "nonce":
        trade = dataclasses.replace(trade, order_nonce=trade.order_nonce + data.draw(st.integers(1, 100)))
    elif change == "price":
        worse = data.draw(st.integers(1, 5_000))
        limit = order.price_per_kwh_minor
        if order.side == "buy":
            trade = dataclasses.replace(trade, price_per_kwh_minor=limit + worse)
        else:
            assume(limit - worse >= 0)
            trade = dataclasses.replace(trade, price_per_kwh_minor=limit - worse)
    elif change == "quantity":
        trade = dataclasses.replace(trade, energy_wh=order.remaining_wh + data.draw(st.integers(1, 10_000)))
    elif change == "zero":
        trade = dataclasses.replace(trade, energy_wh=-data.draw(st.integers(0, 100)))
    elif change == "rejected":
        order = dataclasses.replace(order, state="rejected")
    else:
        order = None
    reason = trade_refusal(trade, order)
    assert reason is not None and "\n" not in reason


@settings(max_examples=300)
@given(orders(), st.lists(st.tuples(st.integers(-10, 8_000), st.integers(1, 20_000)), max_size=30))
def test_accepted_trades_never_exceed_the_order(order, attempts):
    """Whatever the ledger lists, the energy the board accepts against one order is at most the order."""
    order = dataclasses.replace(order, matched_wh=0)
    accepted = 0
    for quantity, price in attempts:
        trade = ListedTrade(order.market_id, order.side, quantity, price, order.nonce)
        if trade_refusal(trade, order) is None:
            assert price_acceptable(order.side, price, order.price_per_kwh_minor)
            accepted += quantity
            order = dataclasses.replace(order, matched_wh=order.matched_wh + quantity)
    assert 0 <= accepted <= order.energy_wh


def test_reasons_name_what_was_wrong():
    order = OwnOrder(nonce=7, market_id=1800, side="buy", energy_wh=500, price_per_kwh_minor=2600, state="open", matched_wh=200)
    ok = ListedTrade(1800, "buy", 300, 2500, 7)
    assert trade_refusal(ok, order) is None
    assert "no order of this board has nonce 9" == trade_refusal(dataclasses.replace(ok, order_nonce=9), None)
    assert "above its limit 2600" in trade_refusal(dataclasses.replace(ok, price_per_kwh_minor=2601), order)
    assert "exceeds order 7's remaining 300 Wh" in trade_refusal(dataclasses.replace(ok, energy_wh=301), order)
    assert "market 3600" in trade_refusal(dataclasses.replace(ok, market_id=3600), order)
    sell = dataclasses.replace(order, side="sell", price_per_kwh_minor=1900)
    assert "below its floor 1900" in trade_refusal(ListedTrade(1800, "sell", 100, 1899, 7), sell)
    assert trade_refusal(ListedTrade(1800, "sell", 100, 2500, 7), sell) is None  # a better price is fine
