"""The benchmark's metrics on a hand-made two-house day, worked out by hand (issue 8: tests check
the metrics are computed correctly; they do not assert the targets)."""

from __future__ import annotations

import pytest

from host_tools.community.metrics import SkillCounter, SlotRecord, Tariff, ideal_local_wh, report

TARIFF = Tariff(retail_per_kwh_minor=3000, feed_in_per_kwh_minor=1000)
# House a has PV: 1000 Wh surplus at noon, 500 Wh shortage in the evening. House b only consumes.
GRID_ONLY = [
    SlotRecord("a", 0, load_wh=100, pv_wh=1100), SlotRecord("a", 1800, load_wh=500, pv_wh=0),
    SlotRecord("b", 0, load_wh=600, pv_wh=0), SlotRecord("b", 1800, load_wh=300, pv_wh=0),
]


def market(price: int) -> list[SlotRecord]:
    """a sold 700 Wh to b at noon but delivered only 600 Wh (a cloud): both settle on 600 Wh."""
    return [
        SlotRecord("a", 0, 100, 1100, sold_wh=700, delivered_wh=600, earned_milli=600 * price),
        SlotRecord("a", 1800, 500, 0),
        SlotRecord("b", 0, 600, 0, bought_wh=700, received_wh=600, paid_milli=600 * price),
        SlotRecord("b", 1800, 300, 0),
    ]


def skills() -> tuple[SkillCounter, SkillCounter]:
    load, net = SkillCounter(), SkillCounter()
    load.add(100, 150, 200)  # errors 50 vs 100
    load.add(600, 600, 500)  # 0 vs 100
    net.add(-500, -400, -300)  # 100 vs 200
    return load, net


def test_two_house_day():
    load, net = skills()
    rep = report(market(2000), GRID_ONLY, TARIFF, days=1, skill_load=load, skill_net=net)
    assert ideal_local_wh(GRID_ONLY) == 600  # noon: min(1000 surplus, 600 shortage); evening: no surplus
    assert rep.ideal_local_wh == 600 and rep.delivered_wh == 600 and rep.contracted_sell_wh == 700
    assert rep.delivered_pct_of_ideal == pytest.approx(100.0) and rep.used_pct_of_ideal == pytest.approx(100.0)
    assert rep.shortfall_pct == pytest.approx(100 * 100 / 700)
    assert rep.over_contract_pct == 0.0
    # self-sufficiency: load 1500 Wh; grid import 800 with the market (a 500, b 300), 1400 without
    assert rep.self_sufficiency_pct == pytest.approx(100 * (1 - 800 / 1500))
    assert rep.self_sufficiency_grid_only_pct == pytest.approx(100 * (1 - 1400 / 1500))
    # PV self-consumption: 1100 Wh PV; exported 400 with the market, 1000 without
    assert rep.self_consumption_pct == pytest.approx(100 * (1 - 400 / 1100))
    assert rep.self_consumption_grid_only_pct == pytest.approx(100 * (1 - 1000 / 1100))
    # bills (milli-minor): a: 500 x 3000 - 1000 x 1000 = 500,000 grid-only; 1,500,000 - 400,000 - 1,200,000 with it
    assert rep.bills == {"a": (-100_000, 500_000), "b": (2_100_000, 2_700_000)}
    assert rep.savings_milli == 1_200_000 and rep.ideal_savings_milli == 600 * 2000
    assert rep.savings_pct_of_ideal == pytest.approx(100.0)
    assert rep.avg_buyer_price_per_kwh_minor == 2000 and rep.avg_seller_price_per_kwh_minor == 2000
    assert rep.worse_off == 0
    assert rep.skill_load == pytest.approx(1 - 50 / 200) and rep.skill_net == pytest.approx(0.5)
    assert rep.final_line() == ("community: days=1 houses=2 skill_load=0.750 skill_net=0.500 delivered_pct_of_ideal=100.0 "
                                "shortfall_pct=14.3 self_sufficiency_pct=46.7 savings_pct_of_ideal=100.0 worse_off=0")


def test_a_buyer_paying_above_retail_is_worse_off():
    load, net = skills()
    rep = report(market(3100), GRID_ONLY, TARIFF, days=1, skill_load=load, skill_net=net)
    assert rep.bills["b"] == (900_000 + 600 * 3100, 2_700_000) and rep.worse_off == 1


def test_battery_and_over_contract_balance():
    # a charges 200 Wh at noon and gives back 180 Wh in the evening; b receives 300 Wh more than it lacks
    r = SlotRecord("a", 0, load_wh=100, pv_wh=1100, charge_wh=200, delivered_wh=600)
    assert r.grid_export_wh == 200 and r.grid_import_wh == 0
    e = SlotRecord("a", 1800, load_wh=500, pv_wh=0, discharge_wh=180)
    assert e.grid_import_wh == 320
    b = SlotRecord("b", 0, load_wh=300, pv_wh=0, bought_wh=600, received_wh=600)
    assert b.own_shortage_wh == 300 and b.grid_export_wh == 300
    load, net = skills()
    rep = report([r, e, b], [SlotRecord("a", 0, 100, 1100), SlotRecord("b", 0, 300, 0)], TARIFF, days=1,
                 skill_load=load, skill_net=net)
    assert rep.over_contract_pct == pytest.approx(50.0)
    assert rep.delivered_pct_of_ideal == pytest.approx(100 * 600 / 300)  # ideal: min(1000 surplus, 300 shortage)
    assert rep.used_pct_of_ideal == pytest.approx(100 * 300 / 300)


def test_the_pooled_self_sufficiency_gives_over_contracted_energy_to_importers():
    # noon: b receives 600 Wh but lacks 300 (300 flow on to the grid) while c imports 200 and d 400;
    # the pool gives the 300 to them (min(300, 600)). Evening: c imports 100, nothing over-contracted.
    rows = [SlotRecord("a", 0, load_wh=100, pv_wh=1100, sold_wh=600, delivered_wh=600),
            SlotRecord("b", 0, load_wh=300, pv_wh=0, bought_wh=600, received_wh=600),
            SlotRecord("c", 0, load_wh=200, pv_wh=0), SlotRecord("d", 0, load_wh=400, pv_wh=0),
            SlotRecord("c", 1800, load_wh=100, pv_wh=0)]
    load, net = skills()
    rep = report(rows, [SlotRecord(r.house, r.slot_start, r.load_wh, r.pv_wh) for r in rows], TARIFF, days=1,
                 skill_load=load, skill_net=net)
    # load 1100; import 200 + 400 + 100 = 700 with the market; 700 - 300 pooled
    assert rep.self_sufficiency_pct == pytest.approx(100 * (1 - 700 / 1100))
    assert rep.pooled_self_sufficiency_pct == pytest.approx(100 * (1 - 400 / 1100))
    # no over-contract: the pool changes nothing
    plain = report(market(2000), GRID_ONLY, TARIFF, days=1, skill_load=load, skill_net=net)
    assert plain.pooled_self_sufficiency_pct == pytest.approx(plain.self_sufficiency_pct)
