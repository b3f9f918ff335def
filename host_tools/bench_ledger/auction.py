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

from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterable

SIDES = ("buy", "sell")


class AuctionError(ValueError):
    """An order the book cannot hold (bad side, non-positive quantity, duplicate id). Says which field."""


@dataclass(frozen=True, slots=True)  # slots: no __dict__ per resting order (memory, and half the objects for the GC)
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


class OrderBook:
    """The resting orders of one market: submit, cancel, read the sides in priority order.

    Kept per market in the ledger's memory (rebuilt from SQLite at start), so an order costs a
    walk over the price levels it crosses - not a rebuild and sort of the whole book, which made
    the ledger slower the fuller its book (issue 10). Each side is a map price -> FIFO of order
    keys (time priority within a price) plus a sorted list of its prices (price priority).
    """

    def __init__(self, resting: Iterable[BookOrder] = ()) -> None:
        self._orders: dict[tuple[str, int], BookOrder] = {}
        self._levels: dict[str, dict[int, deque[tuple[str, int]]]] = {"buy": {}, "sell": {}}
        self._prices: dict[str, list[int]] = {"buy": [], "sell": []}  # ascending
        self._max_seq: int | None = None
        self._open_by_device: dict[str, int] = {}  # device -> resting orders (the ledger's per-device cap)
        self._sell_wh_by_device: dict[str, int] = {}  # device -> Wh offered (the ledger's seller capacity)
        for order in sorted(resting, key=lambda o: o.seq):
            if order.key in self._orders:
                raise AuctionError(f"order {order.key}: already in the book")
            self._rest(order)

    def __len__(self) -> int:
        return len(self._orders)

    def _count(self, order: BookOrder, orders: int, sell_wh: int) -> None:
        device = order.device_id
        left = self._open_by_device.get(device, 0) + orders
        if left:
            self._open_by_device[device] = left
        else:
            self._open_by_device.pop(device, None)
        if order.side == "sell" and sell_wh:
            wh = self._sell_wh_by_device.get(device, 0) + sell_wh
            if wh:
                self._sell_wh_by_device[device] = wh
            else:
                self._sell_wh_by_device.pop(device, None)

    def open_orders_of(self, device_id: str) -> int:
        return self._open_by_device.get(device_id, 0)

    def offered_wh_of(self, device_id: str) -> int:
        """Wh the device offers (resting sells) in this market."""
        return self._sell_wh_by_device.get(device_id, 0)

    def _rest(self, order: BookOrder) -> None:
        self._count(order, +1, order.remaining_wh)
        self._orders[order.key] = order
        levels = self._levels[order.side]
        queue = levels.get(order.price_per_kwh_minor)
        if queue is None:
            queue = levels[order.price_per_kwh_minor] = deque()
            insort(self._prices[order.side], order.price_per_kwh_minor)
        queue.append(order.key)
        if self._max_seq is None or order.seq > self._max_seq:
            self._max_seq = order.seq

    def _drop_level(self, side: str, price: int) -> None:
        del self._levels[side][price]
        prices = self._prices[side]
        del prices[bisect_left(prices, price)]

    def _best_prices(self, side: str) -> list[int]:
        """Prices of a side, best first (a copy: matching may remove levels while walking)."""
        prices = self._prices[side]
        return prices[:] if side == "sell" else prices[::-1]

    def _side(self, side: str) -> list[BookOrder]:
        return [self._orders[key] for price in self._best_prices(side) for key in self._levels[side][price]]

    def asks(self) -> list[BookOrder]:
        """Resting sells, best (lowest price, then earliest) first."""
        return self._side("sell")

    def bids(self) -> list[BookOrder]:
        """Resting buys, best (highest price, then earliest) first."""
        return self._side("buy")

    def levels(self, side: str) -> list[tuple[int, int, int]]:
        """(price, total remaining Wh, order count) per price level of a side, best first."""
        out = []
        for price in self._best_prices(side):
            keys = self._levels[side][price]
            out.append((price, sum(self._orders[k].remaining_wh for k in keys), len(keys)))
        return out

    def get(self, device_id: str, order_nonce: int) -> BookOrder | None:
        return self._orders.get((device_id, order_nonce))

    def submit(self, incoming: BookOrder) -> MatchResult:
        """Match ``incoming`` against the opposite side, then rest any remainder at its limit."""
        if incoming.key in self._orders:
            raise AuctionError(f"order {incoming.key}: already in the book")
        if self._max_seq is not None and self._max_seq >= incoming.seq:
            raise AuctionError(f"seq: the incoming order's seq ({incoming.seq}) must be later than every resting order's")
        other = "sell" if incoming.side == "buy" else "buy"
        remaining = incoming.remaining_wh
        fills: list[Fill] = []
        for price in self._best_prices(other):
            if remaining == 0:
                break
            if (incoming.side == "buy" and price > incoming.price_per_kwh_minor) or (
                    incoming.side == "sell" and price < incoming.price_per_kwh_minor):
                break
            queue = self._levels[other][price]
            skipped: list[tuple[str, int]] = []  # own orders: skipped, they keep their place
            while queue and remaining:  # only the head of the queue is touched, not the whole level
                key = queue[0]
                maker = self._orders[key]
                if maker.device_id == incoming.device_id:
                    skipped.append(queue.popleft())
                    continue
                quantity = min(remaining, maker.remaining_wh)
                fills.append(Fill(maker=maker, energy_wh=quantity, price_per_kwh_minor=maker.price_per_kwh_minor))
                remaining -= quantity
                if quantity == maker.remaining_wh:
                    queue.popleft()
                    del self._orders[key]
                    self._count(maker, -1, -quantity)
                else:  # partly taken: stays at the head with the rest (remaining is now 0)
                    self._count(maker, 0, -quantity)
                    self._orders[key] = replace(maker, remaining_wh=maker.remaining_wh - quantity)
            if skipped:
                queue.extendleft(reversed(skipped))
            if not queue:
                self._drop_level(other, price)
        rested = None
        if remaining > 0:
            rested = incoming if remaining == incoming.remaining_wh else replace(incoming, remaining_wh=remaining)  # frozen: shared
            self._rest(rested)
        elif self._max_seq is None or incoming.seq > self._max_seq:
            self._max_seq = incoming.seq
        return MatchResult(
            fills=tuple(fills),
            filled_wh=incoming.remaining_wh - remaining,
            remaining_wh=remaining,
            rested=rested,
        )

    def cancel(self, device_id: str, order_nonce: int) -> BookOrder | None:
        """Remove a resting order; returns it (with the quantity removed) or None if not resting."""
        order = self._orders.pop((device_id, order_nonce), None)
        if order is None:
            return None
        self._count(order, -1, -order.remaining_wh)
        queue = self._levels[order.side][order.price_per_kwh_minor]
        queue.remove(order.key)
        if not queue:
            self._drop_level(order.side, order.price_per_kwh_minor)
        return order

    def device_keys(self, device_id: str) -> list[tuple[str, int]]:
        return [key for key in self._orders if key[0] == device_id]
