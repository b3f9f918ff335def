"""Unit and property tests of firmware/policy.py: reservation prices and ramps from the tariffs,
quantities in whole lots within the router and order caps, the battery schedule, one side per
slot, reconciling, and the kept baseline."""

from __future__ import annotations


import pytest
from hypothesis import given, settings, strategies as st

from firmware.config import PolicyConfig
from firmware.forecast import SlotForecast
from firmware.market import MarketRules
from firmware.policy import (
    Battery, CancelOrder, DesiredOrder, PlaceOrder, PriceRamp, Tariffs, allocate_delivered, battery_schedule,
    desired_orders, price_range, ramp_price, reconcile_market,
)

from tests.policy_support import MARKET, POLICY, RULES, TARIFFS, Order, at  # noqa: E402


def test_ramp_goes_from_initial_to_reservation_over_the_reviews():
    ramp = PriceRamp(ramp_seconds=900, step_seconds=300)
    buy = [ramp_price("buy", MARKET, at(t), tariffs=TARIFFS, rules=RULES, ramp=ramp) for t in (3600, 900, 600, 300, 60)]
    sell = [ramp_price("sell", MARKET, at(t), tariffs=TARIFFS, rules=RULES, ramp=ramp) for t in (3600, 900, 600, 300, 60)]
    assert buy == [850, 850, 1925, 3000, 3000]  # feed-in -> retail, the reservation at the last review
    assert sell == [3000, 3000, 1925, 850, 850]  # retail -> feed-in
    assert buy == sorted(buy) and sell == sorted(sell, reverse=True)


def test_subsidy_and_band():
    """Seed 001: the seller receives mu x price; prices stay within F_min..F_max."""
    mu = Tariffs(subsidy_percent=125)
    assert price_range("sell", mu, RULES) == (3000, 680)  # 680 x 1.25 = 850 = feed-in
    band = Tariffs(band_min_per_kwh_minor=1200, band_max_per_kwh_minor=2500)
    assert price_range("buy", band, RULES) == (1200, 2500)
    assert price_range("sell", band, RULES) == (2500, 1200)
    assert price_range("sell", Tariffs(band_max_per_kwh_minor=800), RULES) is None  # below feed-in: do not sell
    assert price_range("buy", Tariffs(band_min_per_kwh_minor=3100), RULES) is None  # above retail: do not buy
    assert price_range("sell", TARIFFS, RULES, POLICY) == (3000, 2000)  # owner's floor, when asked for
    with pytest.raises(ValueError, match="feed-in"):
        Tariffs(retail_per_kwh_minor=800, feed_in_per_kwh_minor=850)


def fc(point_net: int, spread: int = 0, market: int = MARKET) -> SlotForecast:
    """A forecast whose net is point_net +- spread (uniform samples)."""
    if point_net >= 0:
        return SlotForecast(market, 200, point_net + 200, (200,),
                            tuple(range(point_net + 200 - spread, point_net + 201 + spread, max(1, spread // 5 or 1))))
    return SlotForecast(market, -point_net, 0, tuple(range(-point_net - spread, -point_net + spread + 1, max(1, spread // 5 or 1))), (0,))


def test_sells_a_conservative_quantile_and_buys_the_median_shortfall():
    d = desired_orders({MARKET: fc(1000, 500)}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60))
    assert d[MARKET].side == "sell" and d[MARKET].energy_wh == 700  # 25% quantile of 500..1500 = 750 -> lots
    assert d[MARKET].price_per_kwh_minor == 850
    d = desired_orders({MARKET: fc(-1000, 500)}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), buy_quantile_percent=50)
    assert d[MARKET].side == "buy" and d[MARKET].energy_wh == 1000 and d[MARKET].price_per_kwh_minor == 3000
    d = desired_orders({MARKET: fc(-1000, 500)}, RULES, POLICY, tariffs=TARIFFS, now_s=at(60))  # default: 60%
    assert d[MARKET].energy_wh == 1100  # 60% quantile of a 500..1500 shortage = 1100


def test_router_rating_and_max_order_cap_quantities():
    big = {MARKET: fc(5000)}
    assert desired_orders(big, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), router_power_w=3000)[MARKET].energy_wh == 1500
    small = PolicyConfig(max_order_wh=450)
    assert desired_orders(big, RULES, small, tariffs=TARIFFS, now_s=at(60))[MARKET].energy_wh == 400


def test_battery_plan_keeps_what_it_stores_out_of_the_market():
    bat = Battery(capacity_wh=7000, soc_wh=3500, reserve_wh=700, power_w=3000)
    markets = [MARKET + i * 1800 for i in range(3)]
    forecast = {markets[0]: fc(1200), markets[1]: fc(-800), markets[2]: fc(-2000)}
    d = desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=bat)
    assert markets[0] not in d and markets[1] not in d  # surplus stored, shortage covered from the battery
    plan = battery_schedule([(m, f.net_wh) for m, f in forecast.items()], bat, 1800)
    assert plan[markets[0]] == 1200 and plan[markets[1]] == -800 and plan[markets[2]] == -1500  # power limit
    assert d[markets[2]].energy_wh == 500 and d[markets[2]].side == "buy"


@settings(max_examples=200, deadline=None)
@given(
    nets=st.lists(st.integers(-6000, 6000), min_size=1, max_size=48),
    capacity=st.integers(0, 20_000), soc_percent=st.integers(0, 100), reserve_percent=st.integers(0, 100),
    power=st.integers(0, 6000), eta=st.integers(50, 100), slot=st.sampled_from([900, 1800, 3600]),
)
def test_battery_schedule_respects_soc_power_and_efficiency(nets, capacity, soc_percent, reserve_percent, power, eta, slot):
    bat = Battery(capacity, capacity * soc_percent // 100, capacity * reserve_percent // 100, power, eta, eta)
    plan = battery_schedule(list(enumerate(nets)), bat, slot)
    stored = float(bat.soc_wh)
    step = bat.max_step_wh(slot)
    for i, net in enumerate(nets):
        flow = plan[i]
        assert abs(flow) <= step + 1e-9
        assert flow == 0 or (flow > 0) == (net > 0)  # charge from surplus, discharge into shortage
        assert abs(flow) <= abs(net)
        before = stored
        stored += flow * eta / 100 if flow > 0 else flow / (eta / 100)
        assert stored <= capacity + 1e-6
        assert flow >= 0 or stored >= min(bat.reserve_wh, before) - 1e-6


slot_forecasts = st.builds(
    lambda load, pv, ls, ps: SlotForecast(MARKET, load, pv, tuple(sorted(ls + [load])), tuple(sorted(ps + [pv]))),
    st.integers(0, 8000), st.integers(0, 8000),
    st.lists(st.integers(0, 8000), max_size=10), st.lists(st.integers(0, 8000), max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    forecast=slot_forecasts,
    seconds_to_gate=st.integers(-100, 20_000),
    retail=st.integers(500, 5000), feed_in=st.integers(1, 5000),
    band_min=st.integers(0, 6000), band_max=st.integers(0, 6000), mu=st.integers(50, 200),
    router_w=st.integers(0, 10_000), max_order=st.integers(1, 10_000), lot=st.sampled_from([10, 100, 250]),
    q=st.integers(0, 50), ramp_s=st.integers(0, 3600),
)
def test_orders_are_whole_lots_within_caps_and_never_beyond_the_tariffs(
        forecast, seconds_to_gate, retail, feed_in, band_min, band_max, mu, router_w, max_order, lot, q, ramp_s):
    feed_in = min(feed_in, retail)
    if band_max and band_min > band_max:
        band_min, band_max = band_max, band_min
    tariffs = Tariffs(retail, feed_in, band_min, band_max, mu)
    rules = MarketRules(lot_wh=lot)
    policy = PolicyConfig(max_order_wh=max_order)
    d = desired_orders({MARKET: forecast}, rules, policy, tariffs=tariffs, now_s=at(seconds_to_gate),
                       ramp=PriceRamp(ramp_s, 300), sell_quantile_percent=q, router_power_w=router_w)
    for order in d.values():
        assert order.energy_wh > 0 and order.energy_wh % lot == 0
        assert order.energy_wh <= max_order
        if router_w:
            assert order.energy_wh <= router_w * 1800 // 3600
        if order.side == "buy":
            assert order.price_per_kwh_minor <= retail  # a buyer never pays above retail
            assert order.energy_wh <= -forecast.net_quantile_wh(0) + lot // 2  # the largest shortage, nearest lot
        else:
            assert order.price_per_kwh_minor * mu >= feed_in * 100  # never below feed-in (after the subsidy)
            assert order.energy_wh <= forecast.net_wh  # never sell more than the forecast surplus
        if band_min:
            assert order.price_per_kwh_minor >= band_min
        if band_max:
            assert order.price_per_kwh_minor <= band_max


order_states = st.sampled_from(["sending", "open", "cancelling", "filled", "cancelled", "rejected"])
orders_st = st.lists(
    st.builds(Order, nonce=st.integers(1, 10_000), side=st.sampled_from(["buy", "sell"]),
              price_per_kwh_minor=st.sampled_from([850, 1925, 3000]), state=order_states,
              energy_wh=st.integers(100, 3000), filled_wh=st.integers(0, 3000)),
    max_size=6, unique_by=lambda o: o.nonce)


@settings(max_examples=400, deadline=None)
@given(
    orders=orders_st,
    desired=st.none() | st.builds(DesiredOrder, st.just(MARKET), st.sampled_from(["buy", "sell"]),
                                  st.integers(0, 5000), st.sampled_from([850, 1925, 3000])),
    traded_buy=st.integers(0, 2000), traded_sell=st.integers(0, 2000),
)
def test_never_both_sides_in_one_slot(orders, desired, traded_buy, traded_sell):
    """Issue 7 m: a net-only interchange meter cannot split import and export in one slot, so the
    policy never adds exposure on a side while the other side has a trade or an order that may fill."""
    traded = {"buy": traded_buy, "sell": traded_sell}
    actions = reconcile_market(MARKET, desired, orders, traded, 100)
    for a in actions:
        if isinstance(a, PlaceOrder):
            other = "sell" if a.side == "buy" else "buy"
            assert traded[other] == 0
            assert not any(o.side == other and o.state in ("sending", "open", "cancelling") and o.remaining_wh > 0
                           for o in orders)
            assert a.energy_wh % 100 == 0 and a.energy_wh > 0
            assert a.energy_wh <= desired.energy_wh - traded[a.side]
        else:
            assert any(o.nonce == a.order_nonce and o.state in ("sending", "open") for o in orders)


def test_side_flip_cancels_first_and_places_only_once_the_other_side_is_clear():
    sell = Order(1, "sell", 1925, "open", 500)
    want_buy = DesiredOrder(MARKET, "buy", 400, 1925)
    first = reconcile_market(MARKET, want_buy, [sell], {}, 100)
    assert first == [CancelOrder(MARKET, 1, "forecast turned to buy")]
    sell.state = "cancelling"
    assert reconcile_market(MARKET, want_buy, [sell], {}, 100) == []
    sell.state = "cancelled"
    assert reconcile_market(MARKET, want_buy, [sell], {}, 100) == [PlaceOrder(MARKET, "buy", 400, 1925)]
    assert reconcile_market(MARKET, want_buy, [sell], {"sell": 100}, 100) == []  # a sale happened: no buy


def test_reconcile_reprices_and_corrects_near_the_gate():
    old = Order(1, "buy", 850, "open", 500)
    actions = reconcile_market(MARKET, DesiredOrder(MARKET, "buy", 500, 1925), [old], {}, 100)
    assert actions == [CancelOrder(MARKET, 1, "price changed"), PlaceOrder(MARKET, "buy", 500, 1925)]
    kept = Order(2, "buy", 1925, "open", 500, filled_wh=200)
    # forecast grew: buy the gap; shrank: cancel the excess beyond one lot
    assert reconcile_market(MARKET, DesiredOrder(MARKET, "buy", 900, 1925), [kept], {"buy": 200}, 100) == [
        PlaceOrder(MARKET, "buy", 400, 1925)]
    assert reconcile_market(MARKET, DesiredOrder(MARKET, "buy", 300, 1925), [kept], {"buy": 200}, 100) == [
        CancelOrder(MARKET, 2, "forecast lower"), PlaceOrder(MARKET, "buy", 100, 1925)]  # the gap left, newly


def test_baseline_policy_is_unchanged():
    """Without tariffs: fixed limits and the one-shot battery budget of the previous firmware."""
    policy = PolicyConfig(battery_capacity_wh=5000, battery_reserve_percent=30)
    d = desired_orders({MARKET: -800, MARKET + 1800: -2000, MARKET + 3600: 1234}, RULES, policy, 50)
    assert MARKET not in d  # 1000 Wh above reserve covers the nearest shortage first
    assert d[MARKET + 1800] == DesiredOrder(MARKET + 1800, "buy", 1800, 3000)
    assert d[MARKET + 3600] == DesiredOrder(MARKET + 3600, "sell", 1200, 2000)
    assert desired_orders({MARKET: fc(-800)}, RULES, POLICY)[MARKET].energy_wh == 800  # forecast objects work too


def test_allocate_delivered():
    assert allocate_delivered(250, [100, 100, 100]) == [100, 100, 50]
    assert allocate_delivered(-5, [100]) == [0]


def test_a_battery_backs_a_sale_of_the_median_surplus():
    forecast = {MARKET: fc(1000, 500)}
    alone = desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60))
    full = Battery(capacity_wh=7000, soc_wh=7000, reserve_wh=700, power_w=3000)
    backed = desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=full)
    empty = Battery(capacity_wh=7000, soc_wh=700, reserve_wh=700, power_w=3000)
    charging = desired_orders(forecast, RULES, POLICY, tariffs=TARIFFS, now_s=at(60), battery=empty)
    assert alone[MARKET].energy_wh == 700  # the 25% quantile, rounded down
    assert backed[MARKET].energy_wh == 1000  # the point: the full battery covers a cloud
    assert MARKET not in charging  # an empty battery stores the whole surplus
