"""Owner policy: from a forecast to the orders the house wants, and from those to actions.

Two policies live here.

**Tariff policy** (``desired_orders(..., tariffs=Tariffs(...), now_s=...)``), the default on
boards whose config names its tariffs:

- *Reservation prices from the tariffs.* The grid is always there: a buyer can import at
  ``retail`` and a seller can export at ``feed_in``. So a buyer never pays more than retail
  and a seller never takes less than feed-in. With the second seed's renewable subsidy factor mu (``subsidy_percent``),
  a seller receives mu x price, so it accepts any price with mu x price >= feed-in. The
  owner's limits narrow this further when asked (``owner_limits``). A
  supervised band F_min..F_max (``band_min/max``) bounds every price; a band that leaves no
  price a side can accept means that side does not trade.
- *Price discovery by ramps* (Grid Singularity's initial rate / final rate / update interval):
  a bid starts at the seller's lowest acceptable price and rises toward the buyer's
  reservation; an offer starts at retail and falls toward the seller's reservation, in equal
  steps of one review (``step_seconds``, the 5-min review) over the last ``ramp_seconds``
  before the gate, reaching the reservation at the last review. Far markets wait at the
  initial rates, where bids and offers do not cross; they trade near the gate, when the
  forecast is best, at prices that depend on who moved first.
- *Curves* (``curve_steps`` > 0, the board's default): instead of one order per market, a bid
  or offer curve of 100-Wh lots, each priced by how likely it is to be used (buyer: at most
  ``feed_in + share x (retail - feed_in)``, its expected worth) or delivered (seller: down to
  ``floor + (1 - share) x (retail - floor)``); the quantile settings become the least share a lot
  needs (``curve_levels``, ``lot_fractions``). A battery-backed lot is deliverable but priced by
  the sun's share. On the fixture this buys much more of the likely shortage when surplus is
  plentiful, at lower prices, while doubtful lots trade only with buyers who value them.
- *Battery sales* (``battery_sales``): in a slot the battery covers, it also sells what a later
  surplus refills because the battery would be full (``battery_spare_wh``, on a cautious
  forecast): that energy would be exported at feed-in tomorrow, and saves a neighbour retail now.
- *Quantities* (``curve_steps = 0``). Sell a conservative quantile (``sell_quantile_percent``, the 25% quantile by
  default: there three times in four) of the surplus; buy the 60% quantile of the shortfall
  (an over- or under-bought kWh costs about the same, so about the median; a little above it
  because household loads are skewed: measured on the fixture, more local energy is used and
  no household ends worse off), rounded
  to the nearest lot (a household short of 70 Wh at noon is a buyer of one lot; rounding down
  would leave most small shortages out of the market); sales round down. Whole lots, at most
  ``max_order_wh`` and at most what the router's power rating moves in one slot.
- *Battery.* A schedule over the forecast's slots (``battery_plan``): surplus charges,
  shortage discharges, within state-of-charge and power limits, counting the charge and
  discharge efficiencies; what the battery plans to cover is not traded. A house whose battery
  can back a sale sells up to its median surplus (the battery delivers if the sun does not):
  on the fixture, 0% seller shortfall with batteries, against ~20% for an unbacked sale of
  the 40% quantile.

**Baseline** (``tariffs=None``): the firmware's previous policy, kept for comparison — fixed
limits (``buy_limit`` for bids, ``sell_floor`` for offers), a one-shot battery budget spent on
the nearest shortages.

Both obey the rules of reconciling (``reconcile_market``): contracted energy counts toward the
goal; orders on the wrong side or at an outdated price are cancelled; a shortfall of one lot or
more is bid at once, while an excess is cancelled only beyond one lot (hysteresis against
churn). **A slot is never contracted on both sides**: an interchange meter that sees only the
net flow cannot tell an import from an export in one slot, so no order is placed on a side
while the other side of that market has a trade or an order that could still fill (issue 7 m).

Pure: no I/O.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from .market import MarketRules


@dataclass(frozen=True)
class DesiredOrder:
    """What the house wants in one market: ``energy_wh`` in all at ``price_per_kwh_minor`` (the
    most eager price), or, with ``levels``, a bid or offer *curve*: (energy_wh, price) levels, most
    eager first (a buyer's highest price, a seller's lowest), whose energies sum to ``energy_wh``."""

    market_id: int
    side: str  # buy | sell
    energy_wh: int
    price_per_kwh_minor: int
    levels: tuple[tuple[int, int], ...] = ()

    def price_levels(self) -> tuple[tuple[int, int], ...]:
        return self.levels or ((self.energy_wh, self.price_per_kwh_minor),)


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


@dataclass(frozen=True)
class Tariffs:
    """The grid's prices and the market's supervision, in the ledger's minor unit per kWh.

    Japanese defaults (minor unit = 0.01 yen): retail about 30 yen/kWh (TEPCO's standard meter
    rate, tier 2, is 30.0 yen in 2024-25), and the post-FIT surplus buy-back of 8.5 yen/kWh
    (TEPCO's rate for PV whose 10-year FIT has ended). ``band_*`` = 0: no band.
    """

    retail_per_kwh_minor: int = 3000
    feed_in_per_kwh_minor: int = 850
    band_min_per_kwh_minor: int = 0
    band_max_per_kwh_minor: int = 0
    subsidy_percent: int = 100  # mu x 100: the seller receives price x mu

    def __post_init__(self) -> None:
        if not 0 < self.feed_in_per_kwh_minor <= self.retail_per_kwh_minor:
            raise ValueError(f"tariffs: need 0 < feed-in ({self.feed_in_per_kwh_minor}) <= retail ({self.retail_per_kwh_minor})")
        if self.subsidy_percent <= 0:
            raise ValueError(f"tariffs: subsidy_percent must be positive, found {self.subsidy_percent}")
        if self.band_min_per_kwh_minor < 0 or self.band_max_per_kwh_minor < 0 or (
                self.band_max_per_kwh_minor and self.band_min_per_kwh_minor > self.band_max_per_kwh_minor):
            raise ValueError(f"tariffs: band {self.band_min_per_kwh_minor}..{self.band_max_per_kwh_minor} is not a range")

    def seller_floor(self) -> int:
        """Lowest price a seller accepts: mu x price >= feed-in."""
        return -(-self.feed_in_per_kwh_minor * 100 // self.subsidy_percent)


@dataclass(frozen=True)
class PriceRamp:
    """gsy-e-style ramp: equal steps of ``step_seconds`` over the last ``ramp_seconds`` before the gate."""

    ramp_seconds: int = 900
    step_seconds: int = 300

    def __post_init__(self) -> None:
        if self.ramp_seconds < 0 or self.step_seconds <= 0:
            raise ValueError(f"price ramp: ramp_seconds >= 0 and step_seconds > 0, found {self.ramp_seconds}, {self.step_seconds}")

    def fraction(self, seconds_to_gate: int) -> float:
        """0 until the ramp starts, 1 from one review before the gate on, linear between.

        Linear in time rather than stepped on a common grid: each board reviews at its own
        instants, so boards post different prices at any moment and trades happen at several
        prices (price discovery), while each board still moves one step per review."""
        span = self.ramp_seconds - self.step_seconds
        if span <= 0 or seconds_to_gate <= self.step_seconds:
            return 1.0
        return min(1.0, max(0.0, (self.ramp_seconds - seconds_to_gate) / span))


def price_range(side: str, tariffs: Tariffs, rules: MarketRules, policy: PolicySettings | None = None
                ) -> tuple[int, int] | None:
    """(initial, final) price of a side, or None when no acceptable price exists.

    Buyer: from the seller's floor up to retail. Seller: from retail down to the seller's floor
    (feed-in / mu). Both within the band F_min..F_max and the market's price band. With
    ``policy`` the owner's ``buy_limit`` / ``sell_floor`` narrow the range further.
    """
    lo = max(tariffs.seller_floor(), rules.price_min_per_kwh_minor, tariffs.band_min_per_kwh_minor)
    hi = min(tariffs.retail_per_kwh_minor, rules.price_max_per_kwh_minor)
    if tariffs.band_max_per_kwh_minor:
        hi = min(hi, tariffs.band_max_per_kwh_minor)
    if side == "buy":
        floor = max(rules.price_min_per_kwh_minor, tariffs.band_min_per_kwh_minor)
        final = hi if policy is None else min(hi, policy.buy_limit_per_kwh_minor)
        if final < floor:
            return None
        return max(floor, min(lo, final)), final
    final = lo if policy is None else max(lo, policy.sell_floor_per_kwh_minor)
    if final > hi:
        return None
    return hi, final


def ramp_price(side: str, market_id: int, now_s: int, *, tariffs: Tariffs, rules: MarketRules,
               ramp: PriceRamp, policy: PolicySettings | None = None) -> int | None:
    """This review's price for a side in a market (None: the side cannot trade at any price)."""
    prices = price_range(side, tariffs, rules, policy)
    if prices is None:
        return None
    initial, final = prices
    f = ramp.fraction(market_id - rules.gate_closure_seconds - now_s)
    return int(round(initial + (final - initial) * f))


@dataclass(frozen=True)
class Battery:
    """The house battery as the policy sees it (Wh, W, percent)."""

    capacity_wh: int
    soc_wh: int
    reserve_wh: int = 0
    power_w: int = 0  # 0: C/2
    charge_efficiency_percent: int = 95
    discharge_efficiency_percent: int = 95

    def max_step_wh(self, slot_seconds: int) -> float:
        power = self.power_w if self.power_w > 0 else self.capacity_wh / 2
        return power * slot_seconds / 3600


def battery_schedule(net_wh: Sequence[tuple[int, int]], battery: Battery, slot_seconds: int) -> dict[int, int]:
    """See ``battery_plan``: the flows only."""
    return battery_plan(net_wh, battery, slot_seconds)[0]


def battery_plan(net_wh: Sequence[tuple[int, int]], battery: Battery, slot_seconds: int
                 ) -> tuple[dict[int, int], dict[int, int]]:
    """Planned battery flow per slot, at the house side: > 0 charges (takes surplus), < 0
    discharges (covers shortage). Chronological self-consumption within the limits:
    - stored energy stays within reserve..capacity;
    - no slot moves more than the power limit allows;
    - charging x Wh stores x * eta_charge; delivering y Wh draws y / eta_discharge.
    WHY self-consumption: a kWh kept for the evening saves retail (30) for about 0.9 x 30 = 27,
    more than it fetches sold at noon (at most the ~19 mid-price), and the neighbours are short
    at the same evening hours, so the community's self-sufficiency gains too.

    Also returns, per slot, the *backup*: what the battery could still give in that slot beyond
    the plan (power and stored energy above the reserve), which lets a sale rest on the median
    forecast instead of a conservative quantile: if the sun disappoints, the battery delivers.
    """
    eta_c = battery.charge_efficiency_percent / 100
    eta_d = battery.discharge_efficiency_percent / 100
    step = battery.max_step_wh(slot_seconds)
    stored = float(min(max(battery.soc_wh, 0), battery.capacity_wh))
    plan: dict[int, int] = {}
    backup: dict[int, int] = {}
    for market_id, net in sorted(net_wh):
        flow = 0
        backup[market_id] = int(min(step, max(0.0, stored - battery.reserve_wh) * eta_d))
        if net > 0:
            room = max(0.0, battery.capacity_wh - stored)
            flow = int(min(float(net), step, room / eta_c))  # whole Wh, rounded down: never beyond a limit
            stored += flow * eta_c
        elif net < 0:
            available = max(0.0, stored - battery.reserve_wh)
            flow = -int(min(float(-net), step, available * eta_d))
            stored += flow / eta_d
        plan[market_id] = flow
    return plan, backup


def _simulate(nets: Sequence[int], battery: Battery, slot_seconds: int, extra_index: int = -1, extra_wh: int = 0
              ) -> tuple[float, float]:
    """Chronological self-consumption over ``nets`` with an extra discharge of ``extra_wh`` (house
    side) in slot ``extra_index``: (own shortage covered in total, energy stored at the end)."""
    eta_c = battery.charge_efficiency_percent / 100
    eta_d = battery.discharge_efficiency_percent / 100
    step = battery.max_step_wh(slot_seconds)
    stored = float(min(max(battery.soc_wh, 0), battery.capacity_wh))
    covered = 0.0
    for i, net in enumerate(nets):
        extra = extra_wh if i == extra_index else 0
        if net > 0:
            room = max(0.0, battery.capacity_wh - stored)
            stored += min(float(net), step, room / eta_c) * eta_c
        elif net < 0 or extra:
            available = max(0.0, stored - battery.reserve_wh) * eta_d
            give = min(float(-min(net, 0)) + extra, step, available)
            own = max(0.0, give - extra)
            covered += own
            stored -= give / eta_d
    return covered, stored


def battery_spare_wh(net_wh: Sequence[tuple[int, int]], battery: Battery, slot_seconds: int, market_id: int,
                     lot_wh: int) -> int:
    """Whole lots the battery can sell in ``market_id`` (a slot it is not charging in) beyond the
    house's own needs, *for free*: energy that a later surplus, which the plan could not store
    because the battery would be full, puts back. With it sold, the plan still covers every
    planned own shortage of the horizon and ends with as much stored. WHY: a full battery at noon
    exports its surplus at feed-in, so a kWh of the evening before is worth only that to the house
    but saves a neighbour retail (issue 8: discharge into a sale at a good price). Pass
    conservative nets (a cloudier day, a higher load): what they still refill is what is sold."""
    ordered = sorted(net_wh)
    nets = [n for _, n in ordered]
    try:
        index = [m for m, _ in ordered].index(market_id)
    except ValueError:
        return 0
    if nets[index] > 0:
        return 0
    base_covered, base_end = _simulate(nets, battery, slot_seconds)
    power_left = battery.max_step_wh(slot_seconds) - (-nets[index])
    lots = int(max(0.0, power_left) // lot_wh)
    lo, hi = 0, lots  # binary search: selling more never helps the rest of the plan
    while lo < hi:
        mid = (lo + hi + 1) // 2
        covered, end = _simulate(nets, battery, slot_seconds, index, mid * lot_wh)
        if covered >= base_covered - 0.5 and end >= base_end - 0.5:
            lo = mid
        else:
            hi = mid - 1
    return lo * lot_wh


def lot_fractions(sorted_wh: Sequence[int], lot_wh: int, lots: int) -> list[float]:
    """For k = 0..lots-1, the expected share of the k-th lot (k x lot .. (k+1) x lot Wh) that a
    quantity X covers, X distributed as the sorted samples: E[clip(X - k lot, 0, lot)] / lot.

    For a buyer X is the shortage, and the share is how much of lot k the house will use; for a
    seller X is what it can deliver, and the share is how much of lot k will be delivered. Non-
    increasing in k, each in 0..1. O(lots x log n) with prefix sums."""
    n = len(sorted_wh)
    if n == 0 or lots <= 0:
        return []
    prefix = [0]
    for x in sorted_wh:
        prefix.append(prefix[-1] + x)

    def excess(a: int) -> float:  # E[(X - a)+]
        i = bisect_right(sorted_wh, a)
        return ((prefix[n] - prefix[i]) - a * (n - i)) / n

    out = []
    above = excess(0)
    for k in range(lots):
        below, above = above, excess((k + 1) * lot_wh)
        out.append(min(1.0, max(0.0, (below - above) / lot_wh)))
    return out


def curve_levels(side: str, fractions: Sequence[float], *, lot_wh: int, min_fraction: float, steps: int,
                 tariffs: Tariffs, initial: int, final: int, ramp_fraction: float,
                 price_fractions: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """A bid or offer curve from the lots' expected shares (``lot_fractions``): (energy, price)
    levels, most eager first.

    WHY a curve: a lot's worth depends on how likely it is to be used (buyer) or delivered
    (seller). A buyer's lot used with probability u saves retail when used and is passed on at
    feed-in when not, so it is worth ``feed_in + u x (retail - feed_in)`` to the buyer, and a bid
    up to that never loses in expectation; a seller's lot delivered with share a is offered down
    to ``floor + (1 - a) x (initial - floor)``, so the lots it is sure of sell to anyone and the
    doubtful ones only to a buyer who values them highly. A trade then happens when u + a >= 1,
    roughly, and a slot with plenty of surplus buys far more of its likely shortage than a single
    median order would (measured on the fixture: docs/community.md). Shares are rounded down to
    ``steps`` levels (fewer orders; each lot priced at or below its worth to the buyer, and at or
    above the seller's); lots below ``min_fraction`` are not traded. Each level ramps from
    ``initial`` to its own final price by ``ramp_fraction`` (0..1) like a single order does.
    ``price_fractions`` (optional, same length): the shares that set the price when they differ
    from those that decide whether a lot is traded (a battery-backed sale: see ``_curve_order``)."""
    by_price: dict[int, int] = {}
    for k, share in enumerate(fractions):
        if share < min_fraction - 1e-9 or share <= 0:
            break  # shares never grow with k: no later lot qualifies either
        if price_fractions is not None:
            share = min(share, price_fractions[k])
        q = math.floor(share * steps + 1e-9) / steps
        if side == "buy":
            worth = tariffs.feed_in_per_kwh_minor + q * (tariffs.retail_per_kwh_minor - tariffs.feed_in_per_kwh_minor)
            level_final = min(final, int(worth))
            if level_final < initial:
                break
        else:
            level_final = max(final, int(math.ceil(final + (1 - q) * (initial - final))))
            if level_final > initial:
                break
        price = int(round(initial + (level_final - initial) * ramp_fraction))
        by_price[price] = by_price.get(price, 0) + lot_wh
    return sorted(((e, p) for p, e in by_price.items()), key=lambda ep: -ep[1] if side == "buy" else ep[1])


def _cautious_net(forecast, sell_quantile_percent: int, buy_quantile_percent: int) -> int:
    """A slot's net on the cautious side: a surplus at the sell quantile, a shortage at the buy quantile."""
    if isinstance(forecast, int):
        return forecast
    if forecast.net_wh > 0:
        return max(0, forecast.net_quantile_wh(sell_quantile_percent))
    return min(forecast.net_wh, forecast.net_quantile_wh(100 - buy_quantile_percent))


def _net_samples(forecast) -> tuple[int, ...]:
    if isinstance(forecast, int):
        return (forecast,)
    return forecast.net_samples_wh


def _point_and_quantile(forecast, q_percent: int) -> tuple[int, int]:
    """A forecast value is an int (net Wh) or an object with ``net_wh``/``net_quantile_wh``."""
    if isinstance(forecast, int):
        return forecast, forecast
    return forecast.net_wh, forecast.net_quantile_wh(q_percent)


def desired_orders(
    forecast_wh: Mapping[int, object],
    rules: MarketRules,
    policy: PolicySettings,
    battery_soc_percent: int | None = None,
    *,
    tariffs: Tariffs | None = None,
    now_s: int | None = None,
    ramp: PriceRamp = PriceRamp(),
    sell_quantile_percent: int = 25,
    buy_quantile_percent: int = 60,
    router_power_w: int = 0,
    battery: Battery | None = None,
    owner_limits: bool = False,
    markets: Iterable[int] | None = None,
    curve_steps: int = 0,
    battery_sales: bool = False,
    battery_sell_quantile_percent: int | None = None,
) -> dict[int, DesiredOrder]:
    """The order the house wants in each forecast market (markets with nothing to trade are absent).

    ``forecast_wh``: market -> net Wh (int; the baseline's input) or a forecast object with
    quantiles (``firmware.forecast.SlotForecast``). Without ``tariffs`` this is the baseline
    policy. ``battery`` (tariff policy) overrides the battery derived from ``battery_soc_percent``
    and the settings. The owner's ``buy_limit``/``sell_floor`` apply only with ``owner_limits``:
    their defaults were set for the fixed-limit baseline (a 20.00 floor would keep a seller
    exporting at 8.50 rather than selling at 19). ``markets`` limits the orders to those markets
    (a review of the near ones) while the battery is still planned over the whole forecast.
    ``battery_sell_quantile_percent`` replaces ``sell_quantile_percent`` when a battery backs the
    house (None: the same for both). Why a battery may sell less cautiously: what the sun does not
    give, the battery can still deliver, so an offer of a higher quantile of the surplus costs a
    battery house a little stored energy where it costs a house without one a shortfall.
    """
    if tariffs is None:
        return _baseline_orders({m: (f if isinstance(f, int) else f.net_wh) for m, f in forecast_wh.items()},
                                rules, policy, battery_soc_percent)
    if now_s is None:
        raise ValueError("the tariff policy needs now_s (the ramp depends on the time to the gate)")
    cap_wh = rules.whole_lots_wh(policy.max_order_wh)
    if router_power_w > 0:
        cap_wh = min(cap_wh, rules.whole_lots_wh(router_power_w * rules.slot_seconds // 3600))
    if battery is None and policy.battery_capacity_wh > 0 and battery_soc_percent is not None:
        battery = Battery(policy.battery_capacity_wh, policy.battery_capacity_wh * battery_soc_percent // 100,
                          reserve_wh=policy.battery_capacity_wh * policy.battery_reserve_percent // 100)
    if battery is not None and battery_sell_quantile_percent is not None:
        sell_quantile_percent = battery_sell_quantile_percent
    points = {m: (f if isinstance(f, int) else f.net_wh) for m, f in forecast_wh.items()}
    plan, backup = battery_plan(list(points.items()), battery, rules.slot_seconds) if battery else ({}, {})
    result: dict[int, DesiredOrder] = {}
    wanted = sorted(forecast_wh) if markets is None else sorted(m for m in set(markets) if m in forecast_wh)
    cautious = None
    for market_id in wanted:
        net = points[market_id]
        flow = plan.get(market_id, 0)
        if battery_sales and battery and net <= 0 and flow == net:
            # the battery covers this slot's shortage: can it also sell to a neighbour for free?
            if cautious is None:
                cautious = [(m, _cautious_net(f, sell_quantile_percent, buy_quantile_percent)) for m, f in forecast_wh.items()]
            spare = min(cap_wh, battery_spare_wh([(m, (net if m == market_id else n)) for m, n in cautious], battery,
                                                 rules.slot_seconds, market_id, rules.lot_wh))
            if spare >= rules.lot_wh:
                price = ramp_price("sell", market_id, now_s, tariffs=tariffs, rules=rules, ramp=ramp,
                                   policy=policy if owner_limits else None)
                if price is not None:
                    result[market_id] = DesiredOrder(market_id, "sell", spare, price)
                continue
        if curve_steps > 0:
            order = _curve_order(market_id, forecast_wh[market_id], net, flow, backup.get(market_id, 0) if battery else 0,
                                 rules, policy, tariffs, now_s, ramp, owner_limits, cap_wh, curve_steps,
                                 sell_quantile_percent, buy_quantile_percent)
            if order is not None:
                result[market_id] = order
            continue
        if net > 0:
            side = "sell"  # the surplus there with probability 1 - q, never more than the point
            _, quantile = _point_and_quantile(forecast_wh[market_id], sell_quantile_percent)
            # flow >= 0: what the battery plans to store, not for sale. With a battery, the charge
            # it can forgo plus what it can give (backup) cover a sunless slot, up to the point.
            energy = min(net - flow, quantile + backup.get(market_id, 0)) if battery else min(quantile, net)
        elif net < 0:
            side = "buy"  # the q-quantile of the shortage is minus the (100 - q)-quantile of the net
            shortage = -net
            if buy_quantile_percent != 50:
                shortage = -_point_and_quantile(forecast_wh[market_id], 100 - buy_quantile_percent)[1]
            energy = max(0, shortage) + flow  # flow <= 0: what the battery plans to cover
        else:
            continue
        energy -= policy.min_margin_wh
        if side == "buy":
            energy += rules.lot_wh // 2  # nearest lot: a kWh bought too many or too few costs about the same
        energy = min(cap_wh, rules.whole_lots_wh(energy))
        if energy <= 0:
            continue
        price = ramp_price(side, market_id, now_s, tariffs=tariffs, rules=rules, ramp=ramp,
                           policy=policy if owner_limits else None)
        if price is None:
            continue
        result[market_id] = DesiredOrder(market_id, side, energy, price)
    return result


def _curve_order(market_id: int, forecast, net: int, flow: int, backup: int, rules: MarketRules,
                 policy: PolicySettings, tariffs: Tariffs, now_s: int, ramp: PriceRamp, owner_limits: bool,
                 cap_wh: int, steps: int, sell_quantile_percent: int, buy_quantile_percent: int) -> DesiredOrder | None:
    """One market's bid or offer curve (``curve_levels``). The quantile settings become the least
    share a lot must have: a buyer's lot is bid for when it will be used with a share of at least
    1 - buy quantile, a seller's offered when at least 1 - sell quantile of it will be delivered."""
    if net == 0:
        return None
    side = "sell" if net > 0 else "buy"
    samples = _net_samples(forecast)
    lot = rules.lot_wh
    price_shares = None
    if side == "sell":
        # what the house can deliver: its surplus less what the battery plans to store, plus what
        # the battery could still give; never more lots than the point surplus less the charge
        shift = -flow + backup - policy.min_margin_wh
        x = sorted(v + shift for v in samples)
        lots = min(cap_wh, rules.whole_lots_wh(net - flow - policy.min_margin_wh)) // lot
        min_fraction = (100 - sell_quantile_percent) / 100
        if backup:
            # the battery makes a lot deliverable, but a lot the sun may not give is priced as the
            # sun's: if the battery delivers it, that is evening energy worth retail to the house
            # (and to the community, unless the buyer would have passed it on to the grid)
            price_x = [v - flow - policy.min_margin_wh for v in samples]
            price_shares = lot_fractions(price_x, lot, lots)
    else:
        shift = flow - policy.min_margin_wh  # flow <= 0: what the battery plans to cover
        x = sorted(-v + shift for v in samples)
        lots = cap_wh // lot
        min_fraction = (100 - buy_quantile_percent) / 100
    if lots <= 0:
        return None
    prices = price_range(side, tariffs, rules, policy if owner_limits else None)
    if prices is None:
        return None
    initial, final = prices
    f = ramp.fraction(market_id - rules.gate_closure_seconds - now_s)
    levels = curve_levels(side, lot_fractions(x, lot, lots), lot_wh=lot, min_fraction=min_fraction, steps=steps,
                          tariffs=tariffs, initial=initial, final=final, ramp_fraction=f, price_fractions=price_shares)
    if not levels:
        return None
    return DesiredOrder(market_id, side, sum(e for e, _ in levels), levels[0][1], levels=tuple(levels))


def _baseline_orders(forecast_wh: Mapping[int, int], rules: MarketRules, policy: PolicySettings,
                     battery_soc_percent: int | None) -> dict[int, DesiredOrder]:
    """The previous firmware policy, unchanged (kept as the benchmark's ``--baseline``)."""
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
# An order being cancelled can still fill until the ledger has processed the cancel: for the
# one-side-per-slot rule it counts as exposure.
EXPOSED_ORDER_STATES = ("sending", "open", "cancelling")
OTHER_SIDE = {"buy": "sell", "sell": "buy"}


def reconcile_market(
    market_id: int,
    desired: DesiredOrder | None,
    orders: Iterable[OpenOrder],
    traded_wh: dict[str, int],
    lot_wh: int,
) -> list[PlaceOrder | CancelOrder]:
    """Actions that bring one market's live orders in line with the desired order."""
    orders = list(orders)
    actions: list[PlaceOrder | CancelOrder] = []
    levels = desired.price_levels() if desired is not None else ()
    prices = {price for _, price in levels}
    kept = []
    for order in orders:
        if order.state not in LIVE_ORDER_STATES or order.remaining_wh <= 0:
            continue
        if desired is None:
            actions.append(CancelOrder(market_id, order.nonce, "no longer forecast"))
        elif order.side != desired.side:
            actions.append(CancelOrder(market_id, order.nonce, f"forecast turned to {desired.side}"))
        elif order.price_per_kwh_minor not in prices:
            actions.append(CancelOrder(market_id, order.nonce, "price changed"))
        else:
            kept.append(order)
    if desired is None:
        return actions
    other = OTHER_SIDE.get(desired.side)
    if traded_wh.get(other, 0) > 0 or any(
            o.side == other and o.state in EXPOSED_ORDER_STATES and o.remaining_wh > 0 for o in orders):
        return actions  # net both sides: never contract import and export in one slot
    # Energy already traded counts toward the most eager levels first: they fill first in price priority.
    traded_left = traded_wh.get(desired.side, 0)
    for energy, price in levels:
        done = min(energy, traded_left)
        traded_left -= done
        want = energy - done
        mine = [o for o in kept if o.price_per_kwh_minor == price]
        have = sum(o.remaining_wh for o in mine)
        if have - want > lot_wh:
            for order in sorted(mine, key=lambda o: o.nonce, reverse=True):  # newest first: oldest keep time priority
                if have - want <= lot_wh:
                    break
                actions.append(CancelOrder(market_id, order.nonce, "forecast lower"))
                have -= order.remaining_wh
        missing = want - have
        if missing >= lot_wh:
            actions.append(PlaceOrder(market_id, desired.side, missing // lot_wh * lot_wh, price))
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
