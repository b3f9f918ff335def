"""The demo on fixture houses (issue 8 part 5): price discovery, and every PV house trades.

The first test is pure (the bench house model replaying the demo's houses over the demo's
compressed hours); the second runs the real demo (bench ledger, emulators, `dgc run` daemons
over real HTTP and virtual serial lines) on a short market day (4 slots, ~2.5 min).
"""

from __future__ import annotations

import re

from host_tools.community.loader import load_community
from host_tools.demo import run_demo
from host_tools.emulators.house_model import HouseModel, HouseParams
from host_tools.neighbourhood import fixture_houses


def test_the_demo_houses_replay_a_sunny_midday_of_the_fixture():
    """The bench day (48 slots of 30 s) maps slot for slot onto the fixture's 30-min slots from
    start_hour: every PV house exports and every consumer imports in each of the demo's slots,
    and the house meter sees exactly the fixture's net energy of those slots."""
    community = load_community()
    slot_s = 30
    specs = fixture_houses(4)
    assert [s.replay_house for s in specs if s.battery_capacity_wh] == ["p04", "p05"]
    need_wh: dict[str, float] = {}
    for spec in specs:
        # no battery here: the meter must then show the fixture's slots exactly
        params = HouseParams.from_sim({"start_hour": spec.start_hour, "replay_house": spec.replay_house,
                                       "replay_start_day": spec.replay_start_day}, slot_s)
        model = HouseModel(params)
        first = spec.replay_start_day * 48 + int(spec.start_hour * 2)
        for k in range(10):  # the demo's ~10 slots
            before = model.house_export_wh - model.house_import_wh
            model.advance((k + 1) * slot_s)
            net_wh = model.house_export_wh - model.house_import_wh - before
            expected = community.pv_wh[spec.replay_house][first + k] - community.load_wh[spec.replay_house][first + k]
            assert abs(net_wh - expected) < 0.5, (spec.name, k, net_wh, expected)
            if spec.battery_capacity_wh:
                assert net_wh >= 300, f"PV house {spec.name} has only {net_wh:.0f} Wh to sell in demo slot {k}"
            else:
                assert net_wh <= -50, f"consumer {spec.name} needs only {-net_wh:.0f} Wh in demo slot {k}"
                need_wh[spec.name] = need_wh.get(spec.name, 0) - net_wh
    # together the consumers need more than one PV house's worth of lots: both must sell
    assert sum(need_wh.values()) >= 6000, need_wh


def test_the_demo_discovers_prices_and_every_pv_house_sells(tmp_path, capsys):
    code = run_demo(tmp_path / "demo", houses=4, slots=4, timeout_s=300)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("summary: houses=4 "), lines[-1]
    prices = next(line for line in lines if re.match(r"demo: \d+ trades at \d+ prices", line))
    trades, distinct = map(int, re.match(r"demo: (\d+) trades at (\d+) prices", prices).groups())
    sellers = set(prices.split("sellers: ")[1].split(", "))
    assert distinct > 1, prices
    # On this 4-slot day at least one PV house sells and only PV houses sell; that every PV house
    # sells is shown by the 8-slot `make demo` (both sold in every run we measured), not asserted
    # here, where the split between the two sellers varies from run to run.
    assert sellers and sellers <= {"p04", "p05"}, prices
    assert f" trades={trades} " in lines[-1]
    # A failed delivery names its cause in the live log (a NAK, a late START, a short meter):
    # show those lines, not only the summary, so a failure here can be diagnosed from CI's output.
    failures = [line for line in lines if re.search(r" delivery\.(failed|missed) |outcome=failed", line)]
    assert code == 0, "\n".join(failures + lines[-12:])
