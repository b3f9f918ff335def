"""Owner policy: from a forecast to the orders the house wants, and from those to actions.

Rules (documented in README "Policy"):
- A forecast surplus is offered at the owner's ``sell_floor_per_kwh_minor``, a shortage is
  bid at ``buy_limit_per_kwh_minor`` (both clamped into the market's price band). In a
  continuous double auction an order that crosses trades at the *resting* order's price, so
  limit prices are what the owner accepts at worst, not what they usually get.
- Quantities are whole lots, rounded *down*: never sell energy the forecast does not cover.
  At most ``max_order_wh`` per market; ``min_margin_wh`` of the forecast is kept back.
- Battery: energy above the reserve covers shortages first (nearest markets first), so the
  house buys less. With ``prefer_renewables`` and a battery below its reserve, PV surplus refills
  the battery before it is sold.
- Reconciling with what is already in the market: contracted energy counts toward the goal;
  orders on the wrong side or at an outdated price are cancelled; a shortfall of one lot or
  more is bid at once, while an excess is cancelled only beyond one lot (hysteresis, so that
  forecast noise does not churn signed messages every review).

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from .market import MarketRules


@dataclass(frozen=True)
class DesiredOrder:
    market_id: int
    side: str  # buy | sell
    energy_wh: int
    price_per_kwh_minor: int


@dataclass(frozen=True)
class PlaceOrder:
    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int


@dataclass(frozen=True)
class CancelOrder:
    market_id: int
    order_nonce: int
    reason: str


class PolicySettings(Protocol):
    buy_limit_per_kwh_minor: int
    sell_floor_per_kwh_minor: int
    battery_capacity_wh: int
    battery_reserve_percent: int
    prefer_renewables: bool
    max_order_wh: int
    min_margin_wh: int


class OpenOrder(Protocol):
    nonce: int
    side: str
    price_per_kwh_minor: int
    state: str

    @property
    def remaining_wh(self) -> int: ...


def desired_orders(
    forecast_wh: dict[int, int],
    rules: MarketRules,
    policy: PolicySettings,
    battery_soc_percent: int | None = None,
) -> dict[int, DesiredOrder]:
    """The order the house wants in each forecast market (markets with nothing to trade are absent)."""
    battery_wh = 0
    if policy.battery_capacity_wh > 0 and battery_soc_percent is not None:
        battery_wh = policy.battery_capacity_wh * (battery_soc_percent - policy.battery_reserve_percent) // 100
    cap_wh = rules.whole_lots_wh(policy.max_order_wh)
    result: dict[int, DesiredOrder] = {}
    for market_id in sorted(forecast_wh):
        net = forecast_wh[market_id]
        if net < 0 and battery_wh > 0:
            cover = min(-net, battery_wh)
            net += cover
            battery_wh -= cover
        elif net > 0 and battery_wh < 0 and policy.prefer_renewables:
            charge = min(net, -battery_wh)
            net -= charge
            battery_wh += charge
        energy = min(cap_wh, rules.whole_lots_wh(abs(net) - policy.min_margin_wh))
        if energy <= 0:
            continue
        if net > 0:
            result[market_id] = DesiredOrder(market_id, "sell", energy, rules.clamp_price(policy.sell_floor_per_kwh_minor))
        else:
            result[market_id] = DesiredOrder(market_id, "buy", energy, rules.clamp_price(policy.buy_limit_per_kwh_minor))
    return result


LIVE_ORDER_STATES = ("sending", "open")


def reconcile_market(
    market_id: int,
    desired: DesiredOrder | None,
    orders: Iterable[OpenOrder],
    traded_wh: dict[str, int],
    lot_wh: int,
) -> list[PlaceOrder | CancelOrder]:
    """Actions that bring one market's live orders in line with the desired order."""
    actions: list[PlaceOrder | CancelOrder] = []
    kept = []
    for order in orders:
        if order.state not in LIVE_ORDER_STATES or order.remaining_wh <= 0:
            continue
        if desired is None:
            actions.append(CancelOrder(market_id, order.nonce, "no longer forecast"))
        elif order.side != desired.side:
            actions.append(CancelOrder(market_id, order.nonce, f"forecast turned to {desired.side}"))
        elif order.price_per_kwh_minor != desired.price_per_kwh_minor:
            actions.append(CancelOrder(market_id, order.nonce, "price changed"))
        else:
            kept.append(order)
    if desired is None:
        return actions
    want = max(0, desired.energy_wh - traded_wh.get(desired.side, 0))
    have = sum(o.remaining_wh for o in kept)
    if have - want > lot_wh:
        for order in sorted(kept, key=lambda o: o.nonce, reverse=True):  # newest first: oldest keep time priority
            if have - want <= lot_wh:
                break
            actions.append(CancelOrder(market_id, order.nonce, "forecast lower"))
            have -= order.remaining_wh
    missing = want - have
    if missing >= lot_wh:
        actions.append(PlaceOrder(market_id, desired.side, missing // lot_wh * lot_wh, desired.price_per_kwh_minor))
    return actions


def allocate_delivered(total_wh: int, contracted_wh: Sequence[int]) -> list[int]:
    """Split one direction's metered energy in a slot over that slot's trades, in trade order.

    The certified meter sees the sum of all transfers in a direction; each trade gets up to its
    contracted energy, earlier trades first, and any excess stays unallocated (not sold twice).
    """
    remaining = max(0, total_wh)
    shares = []
    for wanted in contracted_wh:
        share = min(wanted, remaining)
        shares.append(share)
        remaining -= share
    return shares
