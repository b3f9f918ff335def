"""`dgc-host bench community`: does trading pay the households? A deterministic month.

WHAT RUNS (this increment): the board's real decision code — ``firmware.forecast`` and
``firmware.policy`` (``desired_orders`` + ``reconcile_market``), or with ``--baseline`` the
forecast and policy the board had before issue 8 — and the bench ledger's real continuous
double auction (``host_tools.bench_ledger.auction.OrderBook``), on a virtual clock, for every
house of a community directory. Every board reviews the near market every 5 min at its own
phase (boards are not synchronised), exactly the cadence the daemon runs. Deliveries use the
firmware's allocation (``allocate_delivered``) and a DGR model: a trade moves at most the
router's power rating, and a seller's router delivers only what its house has (surplus plus
what the battery can give), never grid energy. Batteries run self-consumption behind the house
meter within their power, state-of-charge and efficiency limits.

WHAT DOES NOT RUN YET: the journal, signing, the outbox and the daemon's job wiring — the
full-stack run on helper B's deterministic simulation (``host_tools/sim``) is the next step;
this module's metrics (``metrics.py``) are meant to be fed by it unchanged.

The same run also simulates every house without a market (grid only, same batteries), which
the bills and savings are measured against. Pure computation: no I/O except the community
files; the same arguments always give the same figures.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from dataclasses import dataclass, field, replace

from firmware.config import PolicyConfig
from firmware.forecast import Site, SlotForecast, forecast_net_wh, forecast_slots
from firmware.market import MarketRules
from firmware.policy import (Battery, DesiredOrder, PriceRamp, Tariffs, allocate_delivered, desired_orders,
                             reconcile_market, PlaceOrder, CancelOrder)
from host_tools.bench_ledger.auction import BookOrder, OrderBook

from .loader import Community
from .metrics import Report, SkillCounter, SlotRecord, Tariff, report

FIXTURE_SITE = Site(51.4, 6.97)
HISTORY_DAYS = 42  # the forecast's default
BASELINE_BUY = 2600  # the limits of board_configs/*.toml before issue 8
BASELINE_SELL = 1900
RESERVE_PERCENT = 10
BOARD_POLICY = PolicyConfig()
EFFICIENCY_PERCENT = 95


@dataclass(frozen=True)
class BenchSettings:
    days: int = 28
    start_day: int = 91  # 1 April in the fixture: a month of spring, neither the darkest nor the brightest
    baseline: bool = False
    batteries: bool = True
    tariffs: Tariffs = Tariffs()
    gate_seconds: int = 900
    review_seconds: int = 300
    ramp_seconds: int = 900
    # the board's [policy] defaults (firmware/config.py)
    sell_quantile_percent: int = BOARD_POLICY.sell_quantile_percent
    battery_sell_quantile_percent: int = BOARD_POLICY.battery_sell_quantile_percent
    buy_quantile_percent: int = BOARD_POLICY.buy_quantile_percent
    curve_steps: int = BOARD_POLICY.curve_steps
    battery_sales: bool = BOARD_POLICY.battery_sales
    lot_wh: int = 100
    markets_ahead: int = 48
    # A trade is one transfer on the seller's router and one on the buyer's, and a router runs
    # only so many at once (the DGR emulator's max_xfers: 8); a START beyond that is refused and
    # the trade is not delivered (the seller's shortfall). 0 = no limit.
    router_max_transfers: int = 8
    site: Site | None = FIXTURE_SITE
    # A measuring aid, never a board setting: "load", "pv" or "all" replaces that part of the
    # board's forecast by the slot's actual energy (a perfect forecast, samples = the actual
    # value), so a run shows what any forecast could reach with this policy and market.
    oracle: str = ""


@dataclass
class _Order:
    nonce: int
    side: str
    price_per_kwh_minor: int
    energy_wh: int
    filled_wh: int = 0
    state: str = "open"

    @property
    def remaining_wh(self) -> int:
        return self.energy_wh - self.filled_wh


@dataclass
class _Policy:
    """The [policy] table the board would have (PolicySettings)."""

    buy_limit_per_kwh_minor: int
    sell_floor_per_kwh_minor: int
    battery_capacity_wh: int
    battery_reserve_percent: int
    prefer_renewables: bool = True
    max_order_wh: int = 10_000
    min_margin_wh: int = 0


@dataclass
class _Trade:
    seller: str
    buyer: str
    energy_wh: int
    price_per_kwh_minor: int


@dataclass
class _House:
    name: str
    capacity_wh: int
    power_w: int
    router_power_w: int
    soc_wh: float
    soc_grid_wh: float
    phase_s: int
    orders: dict[int, list[_Order]] = field(default_factory=dict)
    traded: dict[int, dict[str, int]] = field(default_factory=dict)
    forecast: dict[int, object] = field(default_factory=dict)
    load_hist: dict[int, int] = field(default_factory=dict)
    pv_hist: dict[int, int] = field(default_factory=dict)
    net_hist: dict[int, int] = field(default_factory=dict)
    nonce: int = 0


def _battery_step(house: _House, soc: float, balance: int, slot_s: int) -> tuple[int, int, float]:
    """Greedy self-consumption on one slot's balance: (charge, discharge, new SOC)."""
    if house.capacity_wh <= 0:
        return 0, 0, soc
    eta = EFFICIENCY_PERCENT / 100
    step = house.power_w * slot_s / 3600
    reserve = house.capacity_wh * RESERVE_PERCENT / 100
    if balance > 0:
        charge = int(min(balance, step, max(0.0, house.capacity_wh - soc) / eta))
        return charge, 0, soc + charge * eta
    if balance < 0:
        discharge = int(min(-balance, step, max(0.0, soc - reserve) * eta))
        return 0, discharge, soc - discharge / eta
    return 0, 0, soc


def _runnable(trades: list, max_transfers: int) -> list:
    """The slot's trades whose transfers both routers can run, in the order they were contracted
    (a router starts its transfers in trade order and refuses one beyond ``max_transfers``)."""
    if max_transfers <= 0:
        return list(trades)
    running: dict[str, int] = {}
    result = []
    for t in trades:
        if running.get(t.seller, 0) < max_transfers and running.get(t.buyer, 0) < max_transfers:
            running[t.seller] = running.get(t.seller, 0) + 1
            running[t.buyer] = running.get(t.buyer, 0) + 1
            result.append(t)
    return result


def _max_discharge(house: _House, soc: float, slot_s: int) -> int:
    if house.capacity_wh <= 0:
        return 0
    reserve = house.capacity_wh * RESERVE_PERCENT / 100
    return int(min(house.power_w * slot_s / 3600, max(0.0, soc - reserve) * EFFICIENCY_PERCENT / 100))


class CommunityBench:
    def __init__(self, community: Community, settings: BenchSettings):
        self.c = community
        self.s = settings
        slot_s = community.slot_seconds
        self.slot_s = slot_s
        self.per_day = community.slots_per_day
        self.day_s = self.per_day * slot_s
        if settings.start_day < 1 or settings.start_day + settings.days > community.days:
            raise ValueError(f"days {settings.start_day}..{settings.start_day + settings.days} do not fit the "
                             f"community's {community.days} days (the first day is history)")
        self.rules = MarketRules(slot_seconds=slot_s, markets_ahead=settings.markets_ahead, lot_wh=settings.lot_wh,
                                 gate_closure_seconds=settings.gate_seconds, price_min_per_kwh_minor=1,
                                 price_max_per_kwh_minor=100_000)
        self.ramp = PriceRamp(settings.ramp_seconds, settings.review_seconds)
        self.houses: dict[str, _House] = {}
        for i, (name, spec) in enumerate(sorted(community.houses.items())):
            cap = spec.battery_wh if settings.batteries else 0
            self.houses[name] = _House(name, cap, spec.battery_power_w, spec.router_power_w, cap * 0.5, cap * 0.5,
                                       phase_s=(37 * i + 11) % settings.review_seconds)
        self.books: dict[int, OrderBook] = {}
        self.owner: dict[tuple[str, int], _Order] = {}
        self.trades: dict[int, list[_Trade]] = {}
        self.seq = 0
        self.market_records: list[SlotRecord] = []
        self.grid_records: list[SlotRecord] = []
        self.skill_load, self.skill_net, self.skill_next = SkillCounter(), SkillCounter(), SkillCounter()
        self.forecast_ms: list[float] = []
        self.prices: dict[int, list[tuple[int, int]]] = {}  # market -> (price, energy) of each trade
        self.next_forecast: dict[tuple[str, int], int] = {}  # (house, slot) -> net forecast for the next market
        self.soc_trace: dict[tuple[str, int], int] = {}  # (house, slot) -> stored Wh at the slot's end

    # -- history ------------------------------------------------------------------------------

    def _observe(self, index: int) -> None:
        """Slot ``index`` is complete: every board's meters have it (a sliding window of history)."""
        start = self.c.slot_starts[index]
        old = start - (HISTORY_DAYS + 2) * self.day_s
        for name, h in self.houses.items():
            load, pv = self.c.load_wh[name][index], self.c.pv_wh[name][index]
            h.load_hist[start] = load
            h.net_hist[start] = pv - load
            if self.c.houses[name].has_pv:
                h.pv_hist[start] = pv
            for d in (h.load_hist, h.net_hist, h.pv_hist):
                d.pop(old, None)

    def _forecast(self, h: _House, now: int, targets: list[int]):
        t0 = time.perf_counter()
        if self.s.baseline:
            result = forecast_net_wh(h.net_hist, targets, slot_seconds=self.slot_s, history_days=7, smoothing_percent=50)
        else:
            result = forecast_slots(h.load_hist, h.pv_hist, targets, now_s=now, slot_seconds=self.slot_s,
                                    day_seconds=self.day_s, history_days=HISTORY_DAYS, site=self.s.site)
        self.forecast_ms.append((time.perf_counter() - t0) * 1000)
        if self.s.oracle and not self.s.baseline:
            result = self._oracle(h, result)
        return result

    def _oracle(self, h: _House, forecast: dict) -> dict:
        """The forecast with its load, PV or both replaced by what the slot really had (see
        ``BenchSettings.oracle``); a target beyond the community's data keeps the board's value."""
        first, n = self.c.slot_starts[0], len(self.c.slot_starts)
        load_too, pv_too = self.s.oracle in ("load", "all"), self.s.oracle in ("pv", "all")
        out = {}
        for t, f in forecast.items():
            i = (t - first) // self.slot_s
            if 0 <= i < n:
                if load_too:
                    load = self.c.load_wh[h.name][i]
                    f = replace(f, load_wh=load, load_samples_wh=(load,))
                if pv_too and self.c.houses[h.name].has_pv:
                    pv = self.c.pv_wh[h.name][i]
                    f = replace(f, pv_wh=pv, pv_samples_wh=(pv,))
            out[t] = f
        return out

    # -- the market ---------------------------------------------------------------------------

    def _policy(self, h: _House) -> _Policy:
        return _Policy(BASELINE_BUY, BASELINE_SELL, h.capacity_wh, 30 if self.s.baseline else RESERVE_PERCENT)

    def _desired(self, h: _House, now: int, markets: list[int]) -> dict[int, DesiredOrder]:
        policy = self._policy(h)
        if self.s.baseline:
            soc_pct = int(h.soc_wh * 100 // h.capacity_wh) if h.capacity_wh else None
            return desired_orders(h.forecast, self.rules, policy, soc_pct)
        battery = None
        if h.capacity_wh:
            battery = Battery(h.capacity_wh, int(h.soc_wh), h.capacity_wh * RESERVE_PERCENT // 100, h.power_w,
                              EFFICIENCY_PERCENT, EFFICIENCY_PERCENT)
        return desired_orders(h.forecast, self.rules, policy, tariffs=self.s.tariffs, now_s=now, ramp=self.ramp,
                              sell_quantile_percent=self.s.sell_quantile_percent,
                              buy_quantile_percent=self.s.buy_quantile_percent, router_power_w=h.router_power_w,
                              battery=battery, markets=markets, curve_steps=self.s.curve_steps,
                              battery_sales=self.s.battery_sales,
                              battery_sell_quantile_percent=self.s.battery_sell_quantile_percent)

    def _review(self, h: _House, now: int, markets: list[int]) -> None:
        desired = self._desired(h, now, markets)
        for m in markets:
            if not self.rules.gate_open(m, now):
                continue
            traded = h.traded.setdefault(m, {"buy": 0, "sell": 0})
            live = h.orders.setdefault(m, [])
            for action in reconcile_market(m, desired.get(m), live, traded, self.rules.lot_wh):
                if isinstance(action, CancelOrder):
                    self.books.setdefault(m, OrderBook()).cancel(h.name, action.order_nonce)
                    for o in live:
                        if o.nonce == action.order_nonce:
                            o.state = "cancelled"
                elif isinstance(action, PlaceOrder):
                    self._place(h, action)
            h.orders[m] = [o for o in live if o.state == "open" and o.remaining_wh > 0]

    def _place(self, h: _House, action: PlaceOrder) -> None:
        h.nonce += 1
        self.seq += 1
        order = _Order(h.nonce, action.side, action.price_per_kwh_minor, action.energy_wh)
        h.orders.setdefault(action.market_id, []).append(order)
        self.owner[(h.name, h.nonce)] = order
        book = self.books.setdefault(action.market_id, OrderBook())
        result = book.submit(BookOrder(h.name, h.nonce, action.side, action.price_per_kwh_minor, action.energy_wh,
                                       self.seq))
        for fill in result.fills:
            maker = self.owner[fill.maker.key]
            maker.filled_wh += fill.energy_wh
            order.filled_wh += fill.energy_wh
            other = self.houses[fill.maker.device_id]
            for house, side in ((h, action.side), (other, fill.maker.side)):
                house.traded.setdefault(action.market_id, {"buy": 0, "sell": 0})[side] += fill.energy_wh
            seller, buyer = (h.name, other.name) if action.side == "sell" else (other.name, h.name)
            self.trades.setdefault(action.market_id, []).append(
                _Trade(seller, buyer, fill.energy_wh, fill.price_per_kwh_minor))
            self.prices.setdefault(action.market_id, []).append((fill.price_per_kwh_minor, fill.energy_wh))
            if maker.remaining_wh <= 0:
                maker.state = "filled"

    # -- delivery -------------------------------------------------------------------------------

    def _deliver(self, index: int) -> None:
        start = self.c.slot_starts[index]
        trades = self.trades.pop(start, [])
        self.books.pop(start, None)
        sold: dict[str, int] = {}
        bought: dict[str, int] = {}
        for t in trades:
            sold[t.seller] = sold.get(t.seller, 0) + t.energy_wh
            bought[t.buyer] = bought.get(t.buyer, 0) + t.energy_wh
        runnable = _runnable(trades, self.s.router_max_transfers)
        delivered: dict[str, int] = {}
        received: dict[str, int] = {}
        paid: dict[str, int] = {}
        earned: dict[str, int] = {}
        for name, contracted in sold.items():
            h = self.houses[name]
            net = self.c.pv_wh[name][index] - self.c.load_wh[name][index]
            router_wh = h.router_power_w * self.slot_s // 3600 if h.router_power_w else contracted
            mine = [t for t in runnable if t.seller == name]
            able = min(sum(t.energy_wh for t in mine), max(0, net) + _max_discharge(h, h.soc_wh, self.slot_s), router_wh)
            for t, share in zip(mine, allocate_delivered(able, [t.energy_wh for t in mine])):
                delivered[name] = delivered.get(name, 0) + share
                received[t.buyer] = received.get(t.buyer, 0) + share
                paid[t.buyer] = paid.get(t.buyer, 0) + share * t.price_per_kwh_minor
                earned[name] = earned.get(name, 0) + share * t.price_per_kwh_minor
        for name, h in self.houses.items():
            load, pv = self.c.load_wh[name][index], self.c.pv_wh[name][index]
            balance = pv - load - delivered.get(name, 0) + received.get(name, 0)
            charge, discharge, h.soc_wh = _battery_step(h, h.soc_wh, balance, self.slot_s)
            self.soc_trace[(name, start)] = int(h.soc_wh)
            self.market_records.append(SlotRecord(name, start, load, pv, charge, discharge, sold.get(name, 0),
                                                  bought.get(name, 0), delivered.get(name, 0), received.get(name, 0),
                                                  paid.get(name, 0), earned.get(name, 0)))
            g_charge, g_discharge, h.soc_grid_wh = _battery_step(h, h.soc_grid_wh, pv - load, self.slot_s)
            self.grid_records.append(SlotRecord(name, start, load, pv, g_charge, g_discharge))

    # -- skill ----------------------------------------------------------------------------------

    def _point(self, f) -> tuple[int, int | None]:
        """(net, load) of a forecast value: the baseline forecasts only net."""
        if isinstance(f, SlotForecast):
            return f.net_wh, f.load_wh
        return int(f), None

    def _score_day_ahead(self, h: _House, index: int) -> None:
        starts = self.c.slot_starts
        targets = list(starts[index: index + self.per_day])
        now = starts[index]
        fc = self._forecast(h, now, targets)
        base_load = forecast_net_wh(h.load_hist, targets, slot_seconds=self.slot_s, history_days=7,
                                    smoothing_percent=50) if self.s.baseline else None
        for j, t in enumerate(targets):
            i = index + j
            load, pv = self.c.load_wh[h.name][i], self.c.pv_wh[h.name][i]
            y_load, y_pv = self.c.load_wh[h.name][i - self.per_day], self.c.pv_wh[h.name][i - self.per_day]
            net_f, load_f = self._point(fc[t])
            if load_f is None:
                load_f = base_load[t]
            self.skill_load.add(load, load_f, y_load)
            self.skill_net.add(pv - load, net_f, y_pv - y_load)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> Report:
        s = self.s
        first = s.start_day * self.per_day
        last = (s.start_day + s.days) * self.per_day
        for i in range(max(0, first - (HISTORY_DAYS + 1) * self.per_day), first):
            self._observe(i)
        starts = self.c.slot_starts
        for i in range(first, last):
            t0 = starts[i]
            if i % self.per_day == 0:
                for h in self.houses.values():
                    self._score_day_ahead(h, i)
            ahead = [t0 + k * self.slot_s for k in range(1, s.markets_ahead + 1)]
            for h in self.houses.values():
                h.forecast = self._forecast(h, t0, ahead)
                if i + 1 < last:
                    net_f, _ = self._point(h.forecast[ahead[0]])
                    self.next_forecast[(h.name, ahead[0])] = net_f
                    y = i + 1 - self.per_day
                    actual = self.c.pv_wh[h.name][i + 1] - self.c.load_wh[h.name][i + 1]
                    self.skill_next.add(actual, net_f, self.c.pv_wh[h.name][y] - self.c.load_wh[h.name][y])
            events = []
            for h in self.houses.values():
                for k in range(self.slot_s // s.review_seconds):
                    events.append((t0 + h.phase_s + k * s.review_seconds, h.name))
            events.sort()
            for j, (now, name) in enumerate(events):
                h = self.houses[name]
                if s.baseline and now - t0 < s.review_seconds:
                    markets = [m for m in ahead if m < starts[-1] and self.rules.gate_open(m, now)]  # the full bid
                else:
                    markets = [m for m in ahead[:2] if self.rules.gate_open(m, now)
                               and m - now <= s.ramp_seconds + s.gate_seconds]
                if markets:
                    self._review(h, now, markets)
            self._deliver(i)
            self._observe(i)
        return self._report()

    def _report(self) -> Report:
        t = self.s.tariffs
        peak_kib = self._forecast_peak_kib()
        return report(self.market_records, self.grid_records, Tariff(t.retail_per_kwh_minor, t.feed_in_per_kwh_minor),
                      days=self.s.days, skill_load=self.skill_load, skill_net=self.skill_net, skill_next=self.skill_next,
                      forecast_ms=self.forecast_ms, forecast_peak_kib=peak_kib)

    def _forecast_peak_kib(self) -> int:
        """Peak memory of one refresh (tracemalloc) for the house with the most to compute."""
        h = next((x for x in self.houses.values() if x.pv_hist), next(iter(self.houses.values())))
        now = max(h.load_hist) + self.slot_s
        targets = [now + k * self.slot_s for k in range(1, self.s.markets_ahead + 1)]
        tracemalloc.start()
        try:
            self._forecast(h, now, targets)
            return math.ceil(tracemalloc.get_traced_memory()[1] / 1024)
        finally:
            tracemalloc.stop()
            self.forecast_ms.pop()  # tracemalloc slows it: not a timing sample


def run_bench(community: Community, settings: BenchSettings) -> Report:
    return CommunityBench(community, settings).run()
