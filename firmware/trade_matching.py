"""Does a trade the ledger lists match an order this board signed? (issue 7 i)

Why a rule of its own: a trade is what makes the router move a household's energy. The ledger
(or a relay in front of it, which the primary source distrusts) could list a trade the board
never made — a forged one, one for another market, at a worse price, or for more than the order
had left. Before a trade may schedule a delivery it must match one of this board's own orders:

- the order with the trade's ``order_nonce`` exists in this board's journal, and the ledger did
  not reject it;
- same market and same side;
- a price no worse than the order's limit (a buy pays at most its limit, a sell gets at least
  its floor);
- a quantity from 1 Wh up to what the order has left, counting only the trades already
  matched to it (an order's immediate fill reported in the ledger's acknowledgement is the
  same energy as the trades that list it, so it is not subtracted a second time: issue 7 a).

Anything else is refused: the caller journals it, raises an alarm, and never tells the router.
Pure: no I/O, no clock; the journal calls it inside the transaction that records the trade.
"""

from __future__ import annotations

from dataclasses import dataclass

SIDES = ("buy", "sell")


@dataclass(frozen=True)
class OwnOrder:
    """One of this board's orders as the journal knows it."""

    nonce: int
    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int
    state: str
    matched_wh: int  # energy of the trades already matched to this order

    @property
    def remaining_wh(self) -> int:
        return self.energy_wh - self.matched_wh


@dataclass(frozen=True)
class ListedTrade:
    """What the ledger says was traded (the fields the rule looks at)."""

    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int
    order_nonce: int


def price_acceptable(side: str, trade_price: int, limit: int) -> bool:
    """A buy pays at most its limit; a sell receives at least its floor."""
    return trade_price <= limit if side == "buy" else trade_price >= limit


def trade_refusal(trade: ListedTrade, order: OwnOrder | None) -> str | None:
    """None when ``trade`` matches ``order`` (the board's order with the trade's nonce, or None if
    the board has no such order); otherwise one line saying why it does not."""
    if trade.side not in SIDES:
        return f"side {trade.side!r} is not buy or sell"
    if order is None:
        return f"no order of this board has nonce {trade.order_nonce}"
    if order.nonce != trade.order_nonce:
        return f"order nonce {trade.order_nonce} is not order {order.nonce}"
    if order.state == "rejected":
        return f"order {order.nonce} was rejected by the ledger: it cannot trade"
    if trade.market_id != order.market_id:
        return f"market {trade.market_id} is not order {order.nonce}'s market {order.market_id}"
    if trade.side != order.side:
        return f"side {trade.side} is not order {order.nonce}'s side {order.side}"
    if not price_acceptable(order.side, trade.price_per_kwh_minor, order.price_per_kwh_minor):
        bound = "above its limit" if order.side == "buy" else "below its floor"
        return (f"price {trade.price_per_kwh_minor} is {bound} {order.price_per_kwh_minor} "
                f"(order {order.nonce}, {order.side})")
    if trade.energy_wh <= 0:
        return f"quantity {trade.energy_wh} Wh is not positive"
    if trade.energy_wh > order.remaining_wh:
        return (f"quantity {trade.energy_wh} Wh exceeds order {order.nonce}'s remaining {order.remaining_wh} Wh "
                f"({order.energy_wh} Wh ordered, {order.matched_wh} Wh already traded)")
    return None
