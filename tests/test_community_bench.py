"""The trading benchmark end to end: `dgc-host bench community` prints its table and exactly the
issue's final line; and on a small community the run keeps the market's invariants (one side
per house and slot, prices within the tariffs, delivered within contracted, energy conserved)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from host_tools.community.bench import BenchSettings, CommunityBench
from host_tools.community.loader import load_community

FINAL = re.compile(r"^community: days=(\d+) houses=(\d+) skill_load=(-?\d+\.\d+) skill_net=(-?\d+\.\d+) "
                   r"delivered_pct_of_ideal=(\d+\.\d+) shortfall_pct=(\d+\.\d+) self_sufficiency_pct=(-?\d+\.\d+) "
                   r"savings_pct_of_ideal=(-?\d+\.\d+) worse_off=(\d+)$")


def small_community(tmp_path: Path, days: int = 4) -> Path:
    """Two PV houses with batteries and two consumers, deterministic, 30-min slots."""
    houses = "".join(
        f"[house.{n}]\npv_kwp = {kwp}\nbattery_wh = {bat}\nbattery_power_w = {pw}\nrouter_power_w = 3000\n\n"
        for n, kwp, bat, pw in (("a", 5.0, 7000, 3000), ("b", 4.0, 0, 0), ("c", 0, 0, 0), ("d", 0, 0, 0)))
    rows = ["slot_start,house,load_wh,pv_wh"]
    t0 = 1_735_689_600 + 120 * 86_400
    for i in range(days * 48):
        hour = (i % 48) / 2
        sun = max(0.0, math.sin(math.pi * (hour - 5) / 14)) if 5 < hour < 19 else 0.0
        for n, kwp in (("a", 5.0), ("b", 4.0), ("c", 0), ("d", 0)):
            load = 150 + (i * 37 + ord(n) * 11) % 250 + (400 if 17 <= hour < 21 else 0)
            pv = int(kwp * 400 * sun * (0.6 + 0.4 * ((i // 48) % 2)))
            rows.append(f"{t0 + i * 1800},{n},{load},{pv}")
    (tmp_path / "houses.toml").write_text(houses)
    (tmp_path / "slots.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_run_keeps_the_market_invariants(tmp_path):
    community = load_community(small_community(tmp_path))
    for baseline in (False, True):
        bench = CommunityBench(community, BenchSettings(days=2, start_day=2, baseline=baseline, site=None))
        rep = bench.run()
        retail, feed_in = bench.s.tariffs.retail_per_kwh_minor, bench.s.tariffs.feed_in_per_kwh_minor
        assert rep.houses == 4 and rep.days == 2
        for r in bench.market_records:
            assert not (r.sold_wh and r.bought_wh), r  # never both sides in one slot
            assert r.delivered_wh <= r.sold_wh and r.received_wh <= r.bought_wh
            assert r.delivered_wh <= 3000 * 1800 // 3600  # the router's rating
            assert r.charge_wh * r.discharge_wh == 0
        assert sum(r.delivered_wh for r in bench.market_records) == sum(r.received_wh for r in bench.market_records)
        assert sum(r.paid_milli for r in bench.market_records) == sum(r.earned_milli for r in bench.market_records)
        prices = [p for trades in bench.prices.values() for p, _ in trades]
        assert prices, "some trades happen"
        if not baseline:
            assert all(feed_in <= p <= retail for p in prices)
        assert 0 <= rep.delivered_pct_of_ideal and 0 <= rep.shortfall_pct <= 100


def test_same_arguments_same_figures(tmp_path):
    community = load_community(small_community(tmp_path, days=3))
    a = CommunityBench(community, BenchSettings(days=1, start_day=2, site=None)).run()
    b = CommunityBench(community, BenchSettings(days=1, start_day=2, site=None)).run()
    assert a.final_line() == b.final_line() and a.bills == b.bills


def test_cli_prints_the_table_and_the_final_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "host_tools.cli", "bench", "community", "--days", "1", "--start-day",
                          "2", "--community", str(small_community(tmp_path, days=3)), "--json", "--compare"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    m = FINAL.match(lines[-1])
    assert m, lines[-1]
    assert m.group(1) == "1" and m.group(2) == "4"
    figures = json.loads(lines[-2])
    assert set(figures) == {"baseline", "policy"}
    assert figures["policy"]["worse_off"] == int(m.group(9))
    assert any(line.startswith("community benchmark (baseline") for line in lines)


def test_cli_smoke_on_the_committed_fixture():
    """What `make test` runs: one day of the committed fixture through the CLI."""
    out = subprocess.run([sys.executable, "-m", "host_tools.cli", "bench", "community", "--days", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert FINAL.match(out.stdout.strip().splitlines()[-1])


def test_cli_refuses_a_bad_community_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "host_tools.cli", "bench", "community", "--community", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "houses.toml: missing" in out.stderr


def battery_community(tmp_path: Path, days: int = 5) -> Path:
    """A PV house whose 7-kWh battery is full by every noon (8 kWp, small load) and a consumer
    short all day and night: the battery's evening energy would only be spilled tomorrow."""
    houses = ("[house.a]\npv_kwp = 8.0\nbattery_wh = 7000\nbattery_power_w = 3000\nrouter_power_w = 3000\n\n"
              "[house.c]\npv_kwp = 0\nbattery_wh = 0\nbattery_power_w = 0\nrouter_power_w = 3000\n")
    rows = ["slot_start,house,load_wh,pv_wh"]
    t0 = 1_735_689_600 + 120 * 86_400
    for i in range(days * 48):
        hour = (i % 48) / 2
        sun = max(0.0, math.sin(math.pi * (hour - 6) / 12)) if 6 < hour < 18 else 0.0
        rows.append(f"{t0 + i * 1800},a,{100 + (i * 37) % 60},{int(8 * 450 * sun)}")
        rows.append(f"{t0 + i * 1800},c,{300 + (i * 53) % 200},0")
    (tmp_path / "houses.toml").write_text(houses)
    (tmp_path / "slots.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_a_battery_sells_in_the_evening_what_tomorrow_would_spill(tmp_path):
    community = load_community(battery_community(tmp_path))
    runs = {sales: CommunityBench(community, BenchSettings(days=3, start_day=2, site=None, battery_sales=sales))
            for sales in (True, False)}
    reps = {sales: bench.run() for sales, bench in runs.items()}
    evening = [r for r in runs[True].market_records if r.house == "a" and r.sold_wh and r.pv_wh < r.load_wh]
    assert evening, "the battery sells while the house itself is short"
    for r in evening:
        assert r.grid_import_wh == 0  # the house's own shortage stays covered
        assert r.delivered_wh + r.load_wh - r.pv_wh <= 3000 * 1800 // 3600  # within the battery's power
    assert not [r for r in runs[False].market_records if r.house == "a" and r.sold_wh and r.pv_wh < r.load_wh]
    with_sales, without = reps[True], reps[False]
    assert with_sales.self_sufficiency_pct > without.self_sufficiency_pct
    assert with_sales.savings_milli > without.savings_milli
    assert with_sales.worse_off == 0
    for house in ("a", "c"):  # both households gain from it
        assert with_sales.bills[house][0] < without.bills[house][0]


def test_cli_refuses_bad_policy_settings_with_one_line():
    out = subprocess.run([sys.executable, "-m", "host_tools.cli", "bench", "community", "--days", "1",
                          "--curve-steps", "101"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--curve-steps 0..100" in out.stderr


def test_a_router_runs_only_its_transfers_and_the_rest_is_the_sellers_shortfall():
    """A trade needs a transfer on both routers; one beyond either router's limit is refused and
    not delivered (as the DGR's NAK 35 does), in the order the trades were contracted."""
    from host_tools.community.bench import _Trade, _runnable

    trades = [_Trade("s1", "b1", 100, 2000), _Trade("s1", "b2", 200, 2000), _Trade("s2", "b1", 300, 2000),
              _Trade("s1", "b3", 400, 2000), _Trade("s2", "b2", 500, 2000)]
    assert _runnable(trades, 0) == trades  # no limit
    # limit 2: s1 runs its first two; b1 has two (s1, s2); s1's third (b3) is refused; s2 -> b2 runs
    # (s2 has one, b2 has one)
    assert _runnable(trades, 2) == [trades[0], trades[1], trades[2], trades[4]]
    assert _runnable(trades, 1) == [trades[0], trades[4]]  # s1 and b1 busy after the first; s2 -> b2 free
    for limit in (1, 2, 3):
        running: dict[str, int] = {}
        for t in _runnable(trades, limit):
            for house in (t.seller, t.buyer):
                running[house] = running.get(house, 0) + 1
        assert max(running.values()) <= limit


def test_a_transfer_limit_shows_as_shortfall_in_the_figures(tmp_path):
    community = load_community(small_community(tmp_path, days=4))
    free = CommunityBench(community, BenchSettings(days=2, start_day=2, router_max_transfers=0, site=None)).run()
    tight = CommunityBench(community, BenchSettings(days=2, start_day=2, router_max_transfers=1, site=None)).run()
    assert free.contracted_sell_wh > 0
    # two sellers and two buyers: with one transfer per router, a seller selling to both buyers in
    # a slot delivers to one only (the two runs trade alike until the first refused transfer)
    assert tight.shortfall_pct > free.shortfall_pct


def test_an_oracle_forecast_is_the_actual_energy_and_leaves_the_board_forecast_alone(tmp_path):
    """`--oracle` (a measuring aid) replaces the forecast's load, PV or both by the slot's actual
    energy: perfect skill for what it replaces, the board's forecast for the rest."""
    community = load_community(small_community(tmp_path, days=4))
    reps = {o: CommunityBench(community, BenchSettings(days=1, start_day=2, site=None, oracle=o)).run()
            for o in ("", "load", "all")}
    assert reps["all"].skill_load == 1.0 and reps["all"].skill_net == 1.0
    assert reps["all"].skill_net_next_market == 1.0
    assert reps["load"].skill_load == 1.0 and reps["load"].skill_net < 1.0
    assert reps[""].skill_load < 1.0
    bench = CommunityBench(community, BenchSettings(days=1, start_day=2, site=None, oracle="pv"))
    i = 2 * 48 + 24  # noon of the first day run
    for j in range(i):
        bench._observe(j)
    for name in ("b", "c"):
        h = bench.houses[name]
        t = community.slot_starts[i]
        f = bench._forecast(h, t - 1800, [t])[t]
        assert f.pv_wh == community.pv_wh[name][i] and f.pv_samples_wh in ((community.pv_wh[name][i],), (0,))
        assert f.load_wh != community.load_wh[name][i] or len(f.load_samples_wh) > 1  # the board's load forecast


def test_cli_refuses_an_unknown_oracle():
    out = subprocess.run([sys.executable, "-m", "host_tools.cli", "bench", "community", "--days", "1",
                          "--oracle", "weather"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--oracle" in out.stderr
