"""Continuous double auction for one market (one delivery slot): pure, no I/O.

The rules are the primary source's (section 2.2, Table 1):

- **Price priority, then time priority.** Resting sell orders (asks) are served cheapest
  first, resting buy orders (bids) dearest first; among equal prices, the earliest order first.
  "Earliest" is the order's ``seq``: a strictly increasing number the ledger assigns on
  acceptance, so two orders accepted in the same millisecond still have a definite order.
- **An incoming order trades at the resting order's price**, whatever its own limit: a sell at
  19.5 against a resting 19.9 bid trades at 19.9; the price improvement goes to the incoming side.
- **Partial fills.** An incoming order takes as much as it can from each resting order it
  crosses, in priority order, until its limit stops it or it is used up; a resting order that
  is only partly taken keeps its place with the rest.
- **The remainder rests at its own limit price**, behind the orders already at that price.
- A device may have **several orders** in the same market, and may **cancel** an order's
  remaining quantity.

Self-trade decision (the paper is silent on it): an incoming order **skips** resting orders of
the *same device*. Those keep their place in the book untouched, and the incoming order may
trade with other devices' orders behind them (at worse prices, as long as its limit allows).
Why: a trade with oneself moves no energy and no money, yet it would consume the device's own
liquidity and produce a delivery obligation nobody can meet. Rejecting the incoming order
instead (another common rule) would make a board's bid fail just because an older order of its
own happens to sit at the top of the book; skipping is the least surprising for an unattended
bidder. The remainder of the incoming order may then rest on the opposite side of its own
order - a "crossed" pair between the same device, which never trades.

Quantities are integers of Wh and prices integers of minor currency units per kWh; the ledger
checks lots and bands before calling this module, and fills are always the minimum of two
whole-lot quantities, so they stay whole lots. This module never touches money: the ledger
derives payments from the fills.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

SIDES = ("buy", "sell")


class AuctionError(ValueError):
    """An order the book cannot hold (bad side, non-positive quantity, duplicate id). Says which field."""


@dataclass(frozen=True)
class BookOrder:
    """One order, resting or incoming. ``(device_id, order_nonce)`` identifies it."""

    device_id: str
    order_nonce: int
    side: str
    price_per_kwh_minor: int
    remaining_wh: int
    seq: int

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise AuctionError(f"side: expected one of {SIDES}, got {self.side!r}")
        if type(self.remaining_wh) is not int or self.remaining_wh <= 0:
            raise AuctionError(f"remaining_wh: expected a positive integer, got {self.remaining_wh!r}")
        if type(self.price_per_kwh_minor) is not int or self.price_per_kwh_minor <= 0:
            raise AuctionError(f"price_per_kwh_minor: expected a positive integer, got {self.price_per_kwh_minor!r}")
        if type(self.seq) is not int:
            raise AuctionError(f"seq: expected an integer, got {self.seq!r}")

    @property
    def key(self) -> tuple[str, int]:
        return (self.device_id, self.order_nonce)


@dataclass(frozen=True)
class Fill:
    """One trade between the incoming order and one resting (maker) order, at the maker's price."""

    maker: BookOrder  # the resting order as it was before this fill
    energy_wh: int
    price_per_kwh_minor: int

    @property
    def maker_remaining_wh(self) -> int:
        return self.maker.remaining_wh - self.energy_wh


@dataclass(frozen=True)
class MatchResult:
    """What happened to an incoming order: its fills in execution order and what is left of it."""

    fills: tuple[Fill, ...]
    filled_wh: int
    remaining_wh: int
    rested: BookOrder | None  # the remainder now resting in the book, if any


def _priority(order: BookOrder) -> tuple[int, int]:
    """Sort key: best price first (lowest ask, highest bid), then earliest seq."""
    price = order.price_per_kwh_minor if order.side == "sell" else -order.price_per_kwh_minor
    return (price, order.seq)


def _crosses(incoming: BookOrder, resting: BookOrder) -> bool:
    if incoming.side == "buy":
        return resting.price_per_kwh_minor <= incoming.price_per_kwh_minor
    return resting.price_per_kwh_minor >= incoming.price_per_kwh_minor


class OrderBook:
    """The resting orders of one market. Build it from stored orders, submit, read the result.

    An instance is cheap and meant to be short-lived: the ledger rebuilds it from its database
    for each order, so the database stays the only source of truth.
    """

    def __init__(self, resting: Iterable[BookOrder] = ()) -> None:
        self._orders: dict[tuple[str, int], BookOrder] = {}
        for order in resting:
            if order.key in self._orders:
                raise AuctionError(f"order {order.key}: already in the book")
            self._orders[order.key] = order

    def asks(self) -> list[BookOrder]:
        """Resting sells, best (lowest price, then earliest) first."""
        return sorted((o for o in self._orders.values() if o.side == "sell"), key=_priority)

    def bids(self) -> list[BookOrder]:
        """Resting buys, best (highest price, then earliest) first."""
        return sorted((o for o in self._orders.values() if o.side == "buy"), key=_priority)

    def get(self, device_id: str, order_nonce: int) -> BookOrder | None:
        return self._orders.get((device_id, order_nonce))

    def submit(self, incoming: BookOrder) -> MatchResult:
        """Match ``incoming`` against the opposite side, then rest any remainder at its limit."""
        if incoming.key in self._orders:
            raise AuctionError(f"order {incoming.key}: already in the book")
        if any(o.seq >= incoming.seq for o in self._orders.values()):
            raise AuctionError(f"seq: the incoming order's seq ({incoming.seq}) must be later than every resting order's")
        opposite = self.asks() if incoming.side == "buy" else self.bids()
        remaining = incoming.remaining_wh
        fills: list[Fill] = []
        for maker in opposite:
            if remaining == 0 or not _crosses(incoming, maker):
                break
            if maker.device_id == incoming.device_id:
                continue  # self-trade: skip, the own order keeps its place
            quantity = min(remaining, maker.remaining_wh)
            fills.append(Fill(maker=maker, energy_wh=quantity, price_per_kwh_minor=maker.price_per_kwh_minor))
            remaining -= quantity
            if quantity == maker.remaining_wh:
                del self._orders[maker.key]
            else:
                self._orders[maker.key] = replace(maker, remaining_wh=maker.remaining_wh - quantity)
        rested = None
        if remaining > 0:
            rested = replace(incoming, remaining_wh=remaining)
            self._orders[rested.key] = rested
        return MatchResult(
            fills=tuple(fills),
            filled_wh=incoming.remaining_wh - remaining,
            remaining_wh=remaining,
            rested=rested,
        )

    def cancel(self, device_id: str, order_nonce: int) -> BookOrder | None:
        """Remove a resting order; returns it (with the quantity removed) or None if not resting."""
        return self._orders.pop((device_id, order_nonce), None)
