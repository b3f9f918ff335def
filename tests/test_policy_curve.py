"""Tests of the bid/offer curves and battery sales of firmware/policy.py (issue 8, session 3):
``lot_fractions`` against a brute-force mean, ``curve_levels`` prices against each lot's worth,
``reconcile_market`` with several price levels, ``battery_spare_wh`` against a re-simulation, and
the invariants of ``desired_orders`` with curves and battery sales switched on."""

from __future__ import annotations


from hypothesis import given, settings, strategies as st

from firmware.config import PolicyConfig
from firmware.forecast import SlotForecast
from firmware.market import MarketRules
from firmware.policy import (
    Battery, CancelOrder, DesiredOrder, PlaceOrder, PriceRamp, Tariffs, _simulate, battery_plan, battery_spare_wh,
    curve_levels, desired_orders, lot_fractions, reconcile_market,
)

from tests.policy_support import MARKET, POLICY, RULES, TARIFFS, Order, at  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(samples=st.lists(st.integers(-3000, 3000), min_size=1, max_size=40), lot=st.sampled_from([10, 100, 250]),
       lots=st.integers(0, 30))
def test_lot_fractions_are_the_expected_covered_share_of_each_lot(samples, lot, lots):
    xs = sorted(samples)
    got = lot_fractions(xs, lot, lots)
    assert len(got) == lots
    for k, share in enumerate(got):
        brute = sum(min(max(x - k * lot, 0), lot) for x in xs) / len(xs) / lot
        assert abs(share - brute) < 1e-9
        assert 0.0 <= share <= 1.0
    assert all(a >= b - 1e-12 for a, b in zip(got, got[1:]))  # never grows with k


def test_lot_fractions_by_hand():
    # a shortage of 150 or 350 Wh, equally likely: lot 1 always used, lot 2 half + half, ...
    assert lot_fractions([150, 350], 100, 5) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lot_fractions([], 100, 3) == []


def test_a_buyer_bids_each_lot_up_to_its_worth_and_a_seller_offers_down_to_its_doubt():
    shares = [1.0, 0.75, 0.5, 0.25, 0.05]
    buy = curve_levels("buy", shares, lot_wh=100, min_fraction=0.2, steps=4, tariffs=TARIFFS, initial=850,
                       final=3000, ramp_fraction=1.0)
    # worth = feed-in + share x (retail - feed-in): 30.00, 24.62, 19.25, 13.87; the 5% lot is left out
    assert buy == [(100, 3000), (100, 2462), (100, 1925), (100, 1387)]
    sell = curve_levels("sell", shares, lot_wh=100, min_fraction=0.5, steps=4, tariffs=TARIFFS, initial=3000,
                        final=850, ramp_fraction=1.0)
    # the sure lot down to feed-in, the 75% lot down to 13.88, the 50% lot only at 19.25 or more
    assert sell == [(100, 850), (100, 1388), (100, 1925)]
    # far from the gate every level waits at the initial price: one level
    assert curve_levels("buy", shares, lot_wh=100, min_fraction=0.2, steps=4, tariffs=TARIFFS, initial=850,
                        final=3000, ramp_fraction=0.0) == [(400, 850)]


@settings(max_examples=150, deadline=None)
@given(shares=st.lists(st.floats(0, 1), max_size=20).map(lambda xs: sorted(xs, reverse=True)),
       side=st.sampled_from(["buy", "sell"]), steps=st.integers(1, 20), f=st.floats(0, 1),
       min_fraction=st.floats(0, 1), retail=st.integers(500, 5000), feed_in=st.integers(1, 5000))
def test_curve_prices_stay_between_the_tariffs_and_never_beyond_a_lots_worth(shares, side, steps, f, min_fraction,
                                                                            retail, feed_in):
    feed_in = min(feed_in, retail)
    tariffs = Tariffs(retail, feed_in)
    initial, final = (feed_in, retail) if side == "buy" else (retail, feed_in)
    levels = curve_levels(side, shares, lot_wh=100, min_fraction=min_fraction, steps=steps, tariffs=tariffs,
                          initial=initial, final=final, ramp_fraction=f)
    prices = [p for _, p in levels]
    assert len(set(prices)) == len(prices)
    assert prices == (sorted(prices, reverse=True) if side == "buy" else sorted(prices))  # most eager first
    assert sum(e for e, _ in levels) <= 100 * sum(1 for s in shares if s >= min_fraction - 1e-9 and s > 0)
    for energy, price in levels:
        assert energy > 0 and energy % 100 == 0
        assert feed_in <= price <= retail
    if side == "buy" and levels:
        # the most eager level is worth at most what the most likely lot saves
        assert prices[0] <= feed_in + shares[0] * (retail - feed_in) + 1


def test_a_battery_backed_lot_is_offered_but_priced_by_the_suns_share():
    # with the battery every lot is sure (1.0) and offered; priced by the sun's shares
    levels = curve_levels("sell", [1.0, 1.0, 1.0], lot_wh=100, min_fraction=0.8, steps=4, tariffs=TARIFFS,
                          initial=3000, final=850, ramp_fraction=1.0, price_fractions=[1.0, 0.5, 0.0])
    assert levels == [(100, 850), (100, 1925), (100, 3000)]
    bat = Battery(capacity_wh=7000, soc_wh=7000, reserve_wh=700, power_w=3000)
    d = desired_orders({MARKET: fc(1000, 500)}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=bat,
                       curve_steps=10, sell_quantile_percent=20)
    assert d[MARKET].energy_wh == 1000  # the point surplus: the full battery covers a cloud
    assert d[MARKET].levels[0][1] == 850 and d[MARKET].levels[-1][1] > 850  # the doubtful lots cost more


def test_reconcile_keeps_each_level_and_fills_the_eager_levels_first():
    want = DesiredOrder(MARKET, "buy", 500, 2500, levels=((300, 2500), (200, 1500)))
    assert reconcile_market(MARKET, want, [], {}, 100) == [PlaceOrder(MARKET, "buy", 300, 2500),
                                                           PlaceOrder(MARKET, "buy", 200, 1500)]
    resting = [Order(1, "buy", 2500, "open", 300), Order(2, "buy", 1500, "open", 200), Order(3, "buy", 900, "open", 100)]
    assert reconcile_market(MARKET, want, resting, {}, 100) == [CancelOrder(MARKET, 3, "price changed")]
    # 300 Wh bought (by the 2500 order): only the 1500 level is still wanted
    filled = [Order(2, "buy", 1500, "open", 200)]
    assert reconcile_market(MARKET, want, filled, {"buy": 300}, 100) == []
    assert reconcile_market(MARKET, want, [], {"buy": 400}, 100) == [PlaceOrder(MARKET, "buy", 100, 1500)]
    # one side per slot holds for curves too
    assert reconcile_market(MARKET, want, [Order(4, "sell", 900, "open", 100)], {}, 100) == [
        CancelOrder(MARKET, 4, "forecast turned to buy")]
    assert reconcile_market(MARKET, want, [], {"sell": 100}, 100) == []


levels_st = st.lists(st.tuples(st.integers(1, 20).map(lambda n: n * 100), st.sampled_from([850, 1200, 1925, 2500, 3000])),
                     min_size=1, max_size=4, unique_by=lambda ep: ep[1])
order_st = st.lists(
    st.builds(Order, nonce=st.integers(1, 10_000), side=st.sampled_from(["buy", "sell"]),
              price_per_kwh_minor=st.sampled_from([850, 1200, 1925, 2500, 3000]),
              state=st.sampled_from(["sending", "open", "cancelling", "filled", "cancelled"]),
              energy_wh=st.integers(100, 3000), filled_wh=st.integers(0, 3000)),
    max_size=6, unique_by=lambda o: o.nonce)


@settings(max_examples=200, deadline=None)
@given(levels=levels_st, side=st.sampled_from(["buy", "sell"]), orders=order_st,
       traded_buy=st.integers(0, 2000), traded_sell=st.integers(0, 2000))
def test_reconcile_curves_never_both_sides_and_never_more_than_wanted(levels, side, orders, traded_buy, traded_sell):
    levels = tuple(sorted(levels, key=lambda ep: -ep[1] if side == "buy" else ep[1]))
    desired = DesiredOrder(MARKET, side, sum(e for e, _ in levels), levels[0][1], levels=levels)
    traded = {"buy": traded_buy, "sell": traded_sell}
    actions = reconcile_market(MARKET, desired, orders, traded, 100)
    placed = [a for a in actions if isinstance(a, PlaceOrder)]
    cancelled = {a.order_nonce for a in actions if isinstance(a, CancelOrder)}
    for a in placed:
        other = "sell" if side == "buy" else "buy"
        assert a.side == side and traded[other] == 0
        assert not any(o.side == other and o.state in ("sending", "open", "cancelling") and o.remaining_wh > 0
                       for o in orders)
        assert a.price_per_kwh_minor in {p for _, p in levels} and a.energy_wh % 100 == 0
    assert sum(a.energy_wh for a in placed) <= max(0, desired.energy_wh - traded[side])  # never more than the gap
    for a in actions:
        if isinstance(a, CancelOrder):
            assert any(o.nonce == a.order_nonce and o.state in ("sending", "open") for o in orders)
    assert len(cancelled) == len([a for a in actions if isinstance(a, CancelOrder)])


def test_a_battery_that_will_be_full_tomorrow_sells_tonight():
    bat = Battery(capacity_wh=7000, soc_wh=6000, reserve_wh=700, power_w=3000)
    # evening shortage 300, a night of 6 x -200, then a sunny morning of 6 x +2000 (12 kWh: fills any battery)
    nets = [(MARKET, -300)] + [(MARKET + i * 1800, -200) for i in range(1, 7)] + \
        [(MARKET + i * 1800, 2000) for i in range(7, 13)]
    spare = battery_spare_wh(nets, bat, 1800, MARKET, 100)
    assert spare == 1200  # the 1.5 kWh power limit less the house's own 300 Wh
    # a dull morning refills nothing: nothing is spare
    dull = nets[:7] + [(MARKET + i * 1800, 100) for i in range(7, 13)]
    assert battery_spare_wh(dull, bat, 1800, MARKET, 100) == 0
    # a charging slot sells from its surplus, not from the battery
    assert battery_spare_wh([(MARKET, 500)] + nets[1:], bat, 1800, MARKET, 100) == 0


@settings(max_examples=200, deadline=None)
@given(nets=st.lists(st.integers(-2000, 3000), min_size=1, max_size=30), capacity=st.integers(0, 12_000),
       soc_percent=st.integers(0, 100), reserve_percent=st.integers(0, 50), power=st.integers(0, 5000),
       eta=st.integers(70, 100), index=st.integers(0, 29))
def test_battery_spare_never_costs_the_house_its_own_coverage(nets, capacity, soc_percent, reserve_percent, power,
                                                              eta, index):
    bat = Battery(capacity, capacity * soc_percent // 100, capacity * reserve_percent // 100, power, eta, eta)
    index = index % len(nets)
    pairs = [(MARKET + i * 1800, n) for i, n in enumerate(nets)]
    spare = battery_spare_wh(pairs, bat, 1800, pairs[index][0], 100)
    assert spare >= 0 and spare % 100 == 0
    if spare:
        assert nets[index] <= 0
        assert spare - nets[index] <= bat.max_step_wh(1800) + 1e-6  # within the power limit with the own load
        covered, end = _simulate(nets, bat, 1800)
        covered_s, end_s = _simulate(nets, bat, 1800, index, spare)
        assert covered_s >= covered - 0.5 and end_s >= end - 0.5


def fc(point_net: int, spread: int = 0, market: int = MARKET) -> SlotForecast:
    if point_net >= 0:
        return SlotForecast(market, 200, point_net + 200, (200,),
                            tuple(range(point_net + 200 - spread, point_net + 201 + spread, max(1, spread // 5 or 1))))
    return SlotForecast(market, -point_net, 0,
                        tuple(range(-point_net - spread, -point_net + spread + 1, max(1, spread // 5 or 1))), (0,))


def test_desired_orders_with_a_curve_and_battery_sales():
    # a buyer's curve: the likely lots at high prices, the doubtful ones lower, at the last review
    d = desired_orders({MARKET: fc(-300, 200)}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), curve_steps=10,
                       buy_quantile_percent=80)
    order = d[MARKET]
    assert order.side == "buy" and order.energy_wh == sum(e for e, _ in order.levels)
    assert order.levels[0][1] == 3000 and [p for _, p in order.levels] == sorted((p for _, p in order.levels), reverse=True)
    assert order.energy_wh > 300  # more than the median: the 4th and 5th lots are worth their low bids
    # a battery that tomorrow's sun refills sells in the evening, at the offer ramp's price
    markets = [MARKET + i * 1800 for i in range(13)]
    forecast = {markets[0]: fc(-300)} | {m: fc(-200, market=m) for m in markets[1:7]} | \
        {m: fc(2000, market=m) for m in markets[7:]}
    bat = Battery(capacity_wh=7000, soc_wh=6000, reserve_wh=700, power_w=3000)
    d = desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=bat, battery_sales=True,
                       markets=[markets[0]])
    assert d[markets[0]] == DesiredOrder(markets[0], "sell", 1200, 850)
    assert markets[0] not in desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=bat,
                                            markets=[markets[0]])  # off by default
    plan, _ = battery_plan([(m, f.net_wh) for m, f in forecast.items()], bat, 1800)
    assert plan[markets[0]] == -300  # the house's own shortage stays covered


slot_forecasts = st.builds(
    lambda load, pv, ls, ps: SlotForecast(MARKET, load, pv, tuple(sorted(ls + [load])), tuple(sorted(ps + [pv]))),
    st.integers(0, 8000), st.integers(0, 8000),
    st.lists(st.integers(0, 8000), max_size=10), st.lists(st.integers(0, 8000), max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(forecast=slot_forecasts, seconds_to_gate=st.integers(-100, 20_000), retail=st.integers(500, 5000),
       feed_in=st.integers(1, 5000), router_w=st.integers(0, 10_000), max_order=st.integers(1, 10_000),
       lot=st.sampled_from([10, 100, 250]), sq=st.integers(0, 50), bq=st.integers(50, 100), steps=st.integers(1, 20),
       soc=st.integers(0, 7000), with_battery=st.booleans())
def test_curve_orders_are_whole_lots_within_caps_and_the_tariffs(forecast, seconds_to_gate, retail, feed_in, router_w,
                                                                 max_order, lot, sq, bq, steps, soc, with_battery):
    feed_in = min(feed_in, retail)
    tariffs = Tariffs(retail, feed_in)
    rules = MarketRules(lot_wh=lot)
    bat = Battery(7000, soc, 700, 3000) if with_battery else None
    d = desired_orders({MARKET: forecast}, rules, PolicyConfig(max_order_wh=max_order), tariffs=tariffs,
                       now_s=at(seconds_to_gate), ramp=PriceRamp(900, 300), sell_quantile_percent=sq,
                       buy_quantile_percent=bq, router_power_w=router_w, curve_steps=steps, battery=bat,
                       battery_sales=True)
    for order in d.values():
        assert order.energy_wh > 0 and order.energy_wh % lot == 0 and order.energy_wh <= max_order
        assert order.energy_wh == sum(e for e, _ in order.price_levels())
        if router_w:
            assert order.energy_wh <= router_w * 1800 // 3600
        for energy, price in order.price_levels():
            assert energy > 0 and energy % lot == 0
            assert feed_in <= price <= retail  # a buyer never above retail, a seller never below feed-in
        if order.side == "sell" and not with_battery:
            assert order.energy_wh <= forecast.net_wh  # never more than the point surplus without a battery


def test_a_battery_house_sells_its_own_quantile_and_a_house_without_one_the_cautious_one():
    """[policy] battery_sell_quantile_percent (30) replaces sell_quantile_percent (20) when a battery
    backs the house: a charging battery's house offers 900 Wh of a doubtful 3 kWh surplus, not 600."""
    surplus = fc(3000, 1500)
    empty = Battery(capacity_wh=7000, soc_wh=700, reserve_wh=700, power_w=3000)

    def offered(battery, **kw):
        d = desired_orders({MARKET: surplus}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=battery,
                           curve_steps=10, **kw)
        return d[MARKET].energy_wh if MARKET in d else 0

    assert offered(empty, sell_quantile_percent=20) == 600
    assert offered(empty, sell_quantile_percent=20, battery_sell_quantile_percent=30) == 900
    assert offered(None, sell_quantile_percent=20, battery_sell_quantile_percent=30) == offered(None, sell_quantile_percent=20)
    # the board's defaults are these two
    assert (PolicyConfig().sell_quantile_percent, PolicyConfig().battery_sell_quantile_percent) == (20, 30)


@settings(max_examples=100, deadline=None)
@given(forecast=slot_forecasts, seconds_to_gate=st.integers(-100, 20_000), sq=st.integers(0, 50),
       bsq=st.integers(0, 50), soc=st.integers(0, 7000), with_battery=st.booleans(), steps=st.sampled_from([0, 4, 10]))
def test_the_battery_quantile_applies_exactly_when_a_battery_backs_the_house(forecast, seconds_to_gate, sq, bsq, soc,
                                                                            with_battery, steps):
    bat = Battery(7000, soc, 700, 3000) if with_battery else None

    def orders(**kw):
        return desired_orders({MARKET: forecast, MARKET + 1800: forecast}, RULES, POLICY, tariffs=TARIFFS,
                              now_s=at(seconds_to_gate), ramp=PriceRamp(900, 300), curve_steps=steps, battery=bat,
                              battery_sales=True, **kw)

    assert orders(sell_quantile_percent=sq, battery_sell_quantile_percent=bsq) == \
        orders(sell_quantile_percent=bsq if with_battery else sq)
